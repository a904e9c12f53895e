"""Quantized modules."""

from quantcli.nn.qlinear import QuantLinear

__all__ = ["QuantLinear"]
