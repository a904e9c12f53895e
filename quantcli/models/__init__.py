"""Glue between quantcli's modules and whole (transformers) models."""

from quantcli.models.replace import (
    ReplacementReport,
    output_head_names,
    plan_replacement,
    replace_linear_layers,
)

__all__ = ["ReplacementReport", "output_head_names", "plan_replacement", "replace_linear_layers"]
