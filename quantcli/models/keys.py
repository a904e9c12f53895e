"""Checkpoint keys and model keys, through transformers' own conversion mapping.

transformers 5 does not load every checkpoint key into the model parameter of the same name.
On load it *renames* keys (``WeightRenaming``: ``LayerNorm.gamma`` -> ``LayerNorm.weight``,
Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``, ViT's legacy ``attention.query`` ->
``q_proj``...) and *converts* some (``WeightConverter``: the per-expert 2-D matrices of a
mixture of experts, ``experts.N.w1|w3.weight``, merged into the model's fused 3-D parameter
``experts.gate_up_proj``); ``save_pretrained`` applies the reverse, so checkpoints (and
vLLM, and llm-compressor) keep the legacy names. quantcli never builds the model with
weights, so it needs the same correspondence key by key. `KeyLayout` gives it, from the
mapping transformers itself registers for the model's classes and ``model_type``
(`transformers.conversion_mapping.get_model_conversion_mapping`), not from a list per model:

- `KeyLayout.slot`: where a checkpoint key lands in the model: a state-dict key, and for a
  key merged into a stacked parameter, which expert and which row block (gate or up) of it;
- `KeyLayout.saved`: the keys and shapes ``save_pretrained`` writes for the model (the
  reverse mapping, run on the ``meta`` skeleton: no data), which quantize writes too;
- `KeyLayout.saved_module`: a model module's name in those saved keys.

Converters quantcli understands are the expert merges (``MergeModulelist(dim=0)``, optionally
followed by ``Concatenate(dim=1)``); a checkpoint key that needs any other conversion is
refused with `UnknownLayoutError` (a `CheckpointError`, exit 4) naming it, rather than
loaded wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from quantcli.errors import CheckpointError, first_line


class UnknownLayoutError(CheckpointError):
    """A key or module whose layout quantcli cannot map to the model."""


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor goes in the model.

    `key` is a state-dict key. For a tensor merged into a stacked expert parameter
    ``(experts, rows, cols)``, `expert` is its index and the tensor fills rows
    ``part * rows / parts`` up to the next block (``parts`` is 2 for gate and up fused).
    """

    key: str
    expert: int | None = None
    part: int = 0
    parts: int = 1

    @property
    def stacked(self) -> bool:
        return self.expert is not None


class KeyLayout:
    """The correspondence between checkpoint keys and the keys of `model` (a skeleton)."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        self.model = model
        self.expected: dict[str, torch.Tensor] = model.state_dict()
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        conversions = _conversions(model, add_legacy=True)
        self._renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self._converters = [c for c in conversions if isinstance(c, WeightConverter)]

    def slot(self, key: str) -> Slot:
        """Where checkpoint key `key` lands in the model (its own name when nothing maps it)."""
        from transformers.core_model_loading import apply_renamings, rename_source_key

        renamed = apply_renamings(key, self._renamings)
        expert = None
        part, parts = 0, 1
        for converter in self._converters:
            converted, pattern = converter.rename_source_key(renamed)
            if pattern is None:
                continue
            part, parts = _merge_position(converter, pattern, key)
            expert = _expert_index(pattern, renamed, key)
            renamed = converted
            break
        # the base model prefix added or stripped as transformers does (base-model checkpoints)
        if self.prefix:
            renamed, _ = rename_source_key(renamed, [], [], self.prefix, self.expected)
        return Slot(renamed, expert, part, parts)

    @cached_property
    def saved(self) -> dict[str, tuple[int, ...]]:
        """The keys ``save_pretrained`` writes for this model, and their shapes."""
        from transformers.core_model_loading import revert_weight_conversion

        try:
            reverted = revert_weight_conversion(self.model, dict(self.expected))
        except Exception as error:  # noqa: BLE001 - any failure means: a layout we cannot write
            raise UnknownLayoutError(
                f"transformers cannot name the saved tensors of {type(self.model).__name__} "
                f"({type(error).__name__}: {first_line(error)}): quantcli does not know this "
                "checkpoint layout."
            ) from None
        return {key: tuple(tensor.shape) for key, tensor in reverted.items()}

    @cached_property
    def saved_slots(self) -> dict[str, Slot]:
        """`saved`'s keys with their slots; each slot of the model is named once."""
        slots = {key: self.slot(key) for key in self.saved}
        by_slot: dict[Slot, str] = {}
        for key, slot in slots.items():
            if slot in by_slot:
                raise UnknownLayoutError(
                    f"transformers saves both {by_slot[slot]} and {key} for {slot.key}: "
                    "quantcli does not know this checkpoint layout."
                )
            by_slot[slot] = key
        return slots

    @cached_property
    def saved_names(self) -> dict[Slot, str]:
        return {slot: key for key, slot in self.saved_slots.items()}

    @cached_property
    def stacked(self) -> dict[str, list[str]]:
        """Per module holding stacked parameters (an experts module), the saved keys of its
        blocks (``...experts.3.w1.weight``), in saved order."""
        stacked: dict[str, list[str]] = {}
        for key, slot in self.saved_slots.items():
            if slot.stacked:
                stacked.setdefault(slot.key.rpartition(".")[0], []).append(key)
        return stacked

    def saved_name(self, slot: Slot) -> str:
        """The saved key of a slot; a key transformers does not map keeps its name."""
        return self.saved_names.get(slot, slot.key)

    def saved_module(self, module: str) -> str:
        """The name under which `module`'s ``weight`` is saved, less ``.weight``."""
        name = self.saved_name(Slot(f"{module}.weight"))
        return name.removesuffix(".weight")

    def model_module(self, saved_module: str) -> Slot:
        """The slot of a saved module's ``weight`` (its model module when not stacked)."""
        return self.slot(f"{saved_module}.weight")


def _conversions(model: nn.Module, add_legacy: bool) -> list:
    from transformers.conversion_mapping import get_model_conversion_mapping

    try:
        return list(get_model_conversion_mapping(model, add_legacy=add_legacy) or [])
    except Exception as error:  # noqa: BLE001 - a mapping transformers cannot build for it
        raise UnknownLayoutError(
            f"transformers has no usable key mapping for {type(model).__name__} "
            f"({type(error).__name__}: {first_line(error)})."
        ) from None


def _merge_position(converter, pattern: str, key: str) -> tuple[int, int]:
    """(part, parts) of a key merged by a converter: experts stacked along dim 0, then
    gate and up concatenated along dim 1 (rows). Any other conversion is refused."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    merges = len(ops) >= 1 and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    single = len(ops) == 1 and len(converter.source_patterns) == 1
    concatenated = len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim == 1
    if not merges or not (single or concatenated) or len(converter.target_patterns) != 1:
        names = ", ".join(type(op).__name__ for op in ops)
        raise UnknownLayoutError(
            f"tensor '{key}' is converted by transformers with {names}: quantcli does not "
            "know this checkpoint layout."
        )
    return converter.source_patterns.index(pattern), len(converter.source_patterns)


def _expert_index(pattern: str, renamed: str, key: str) -> int:
    """The expert number where the converter's pattern has ``*`` (``experts.*.w1.weight``)."""
    pieces = pattern.replace("\\.", ".").split("*")
    if len(pieces) == 2:
        regex = re.escape(pieces[0]) + r"(\d+)" + re.escape(pieces[1]) + r"(?!\w)"
        match = re.search(regex, renamed)
        if match:
            return int(match.group(1))
    raise UnknownLayoutError(
        f"tensor '{key}' is merged by transformers without an expert number quantcli can "
        f"read ({pattern}): quantcli does not know this checkpoint layout."
    )
