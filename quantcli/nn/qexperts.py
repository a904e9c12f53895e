"""`QuantExperts`: the experts of a mixture-of-experts layer, weights held as integers.

transformers 5 keeps an MoE layer's experts as one module with two fused 3-D parameters,
``gate_up_proj`` ``(experts, 2 * intermediate, hidden)`` (gate rows, then up rows) and
``down_proj`` ``(experts, hidden, intermediate)``, called as
``experts(hidden_states, top_k_index, top_k_weights)``. `QuantExperts` takes its place with
the same call and the same numbers, its weights as the checkpoint stores them per expert
(compressed-tensors ``pack-quantized``: int32 words packed along the input dimension),
stacked:

- ``<proj>_packed`` int32 ``(experts, rows, ceil(cols * bits / 32))``;
- ``<proj>_scale`` ``(experts, rows, groups)`` in the scale dtype (one group for
  per-channel; a per-tensor scale is repeated over its rows, as gate and up each have one);
- asymmetric: ``<proj>_zero_point`` int8 ``(experts, rows, groups)``, unpacked.

A forward dequantizes only the experts its tokens were routed to (at decode: top-k of them),
one at a time, so memory never holds a float copy of the experts.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from quantcli.config import Granularity, QuantConfig
from quantcli.errors import CheckpointError
from quantcli.tensor.packing import packed_length, unpack_int32
from quantcli.tensor.quantize import dequantize, groups_per_row, int_range

#: The fused parameters of transformers' experts modules, in forward order.
PROJECTIONS = ("gate_up_proj", "down_proj")


class QuantExperts(nn.Module):
    """Quantized experts with transformers' experts call: ``(hidden, top_k_index, weights)``."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        config: QuantConfig,
        act_fn: nn.Module,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.hidden = hidden
        self.intermediate = intermediate
        self.config = config
        self.act_fn = act_fn
        self.shapes = {
            "gate_up_proj": (2 * intermediate, hidden),
            "down_proj": (hidden, intermediate),
        }
        for proj, (rows, cols) in self.shapes.items():
            groups = self._groups(cols)
            words = packed_length(cols, config.bits)
            self.register_buffer(
                f"{proj}_packed",
                torch.empty((num_experts, rows, words), dtype=torch.int32, device=device),
            )
            self.register_buffer(
                f"{proj}_scale",
                torch.empty((num_experts, rows, groups), dtype=dtype, device=device),
            )
            if not config.symmetric:
                self.register_buffer(
                    f"{proj}_zero_point",
                    torch.empty((num_experts, rows, groups), dtype=torch.int8, device=device),
                )
        self._filled = {proj: set() for proj in PROJECTIONS}

    @classmethod
    def like(cls, experts: nn.Module, config: QuantConfig, dtype: torch.dtype) -> QuantExperts:
        """An empty (meta) `QuantExperts` in place of transformers' fused `experts`."""
        num_experts, double, hidden = experts.gate_up_proj.shape
        return cls(num_experts, hidden, double // 2, config, experts.act_fn, dtype, "meta")

    def _groups(self, cols: int) -> int:
        if self.config.granularity is Granularity.GROUP:
            return groups_per_row(cols, self.config.group_size)
        return 1

    def piece_shape(self, proj: str, parts: int) -> tuple[int, int]:
        """``(out, in)`` of one expert's matrix in the checkpoint (gate or up: half the rows)."""
        rows, cols = self.shapes[proj]
        return rows // parts, cols

    def set_piece(
        self,
        proj: str,
        expert: int,
        part: int,
        parts: int,
        state: dict[str, torch.Tensor],
        name: str,
    ) -> None:
        """Store one expert matrix from its checkpoint tensors (``weight_packed``,
        ``weight_scale``, ``weight_shape``, ``weight_zero_point``), after checking them."""
        rows, cols = self.piece_shape(proj, parts)
        if not 0 <= expert < self.num_experts or not 0 <= part < parts:
            raise CheckpointError(f"{name}: no expert {expert} in this model.")
        expected = {"weight_packed", "weight_scale", "weight_shape"}
        if not self.config.symmetric:
            expected.add("weight_zero_point")
        if set(state) != expected:
            missing = sorted(expected - set(state)) or sorted(set(state) - expected)
            raise CheckpointError(
                f"{name}: expected {', '.join(sorted(expected))} for a "
                f"{self.config.bits}-bit expert, not {', '.join(sorted(state))} ({missing[0]})."
            )
        packed, scale = state["weight_packed"], state["weight_scale"]
        shape = state["weight_shape"]
        if shape.tolist() != [rows, cols]:
            raise CheckpointError(
                f"{name}.weight_shape holds {shape.tolist()}, not {[rows, cols]}."
            )
        scale_shape = self._file_scale_shape(rows, cols)
        if (
            tuple(packed.shape) != (rows, packed_length(cols, self.config.bits))
            or tuple(scale.shape) != scale_shape
        ):
            raise CheckpointError(
                f"{name}: weight_packed {list(packed.shape)} and weight_scale "
                f"{list(scale.shape)} do not fit a {rows}x{cols} expert of this config."
            )
        bad = ~(torch.isfinite(scale) & (scale > 0))
        if bad.any():
            raise CheckpointError(
                f"{name}.weight_scale holds {int(bad.sum())} value(s) that are not finite and "
                "positive: the checkpoint is corrupt."
            )
        block = slice(part * rows, (part + 1) * rows)
        self._materialize(packed.device, scale.dtype)
        getattr(self, f"{proj}_packed")[expert, block] = packed
        # per tensor, the file's one scale (and zero point) is broadcast over the rows;
        # assignment casts to the buffer's dtype
        getattr(self, f"{proj}_scale")[expert, block] = scale
        if not self.config.symmetric:
            zero = state["weight_zero_point"]
            if self.config.granularity is not Granularity.TENSOR:  # packed along the rows
                zero = unpack_int32(zero, self.config.bits, rows, dim=0)
            low, high = int_range(self.config.bits)
            if int(zero.min()) < low or int(zero.max()) > high:
                raise CheckpointError(
                    f"{name}.weight_zero_point holds values outside {low}..{high}."
                )
            getattr(self, f"{proj}_zero_point")[expert, block] = zero
        self._filled[proj].add((expert, part, parts))

    def _file_scale_shape(self, rows: int, cols: int) -> tuple[int, ...]:
        if self.config.granularity is Granularity.TENSOR:
            return (1,)
        return (rows, self._groups(cols))

    def _materialize(self, device: torch.device, scale_dtype: torch.dtype) -> None:
        """Give the meta buffers memory when the first expert arrives; the scales take the
        dtype the loader gives the file's scales (as `QuantLinear`'s assigned ones do)."""
        for name, buffer in list(self.named_buffers(recurse=False)):
            if buffer.is_meta:
                dtype = scale_dtype if name.endswith("_scale") else buffer.dtype
                setattr(self, name, torch.empty_like(buffer, dtype=dtype, device=device))

    def missing_pieces(self) -> list[str]:
        """``proj[expert]`` entries no checkpoint tensor has filled."""
        missing = []
        for proj in PROJECTIONS:
            filled = self._filled[proj]
            parts = {p for _, _, p in filled} or {1}
            for expert in range(self.num_experts):
                for count in parts:
                    for part in range(count):
                        if (expert, part, count) not in filled:
                            missing.append(f"{proj}[{expert}]")
        return sorted(set(missing))

    def expert_weight(self, proj: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """The float ``(rows, cols)`` matrix of one expert (dequantized now, not kept)."""
        rows, cols = self.shapes[proj]
        qdata = unpack_int32(getattr(self, f"{proj}_packed")[expert], self.config.bits, cols)
        scale = getattr(self, f"{proj}_scale")[expert]
        zero = getattr(self, f"{proj}_zero_point")[expert] if not self.config.symmetric else None
        return dequantize(qdata, scale, zero, dtype)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """transformers' eager experts loop, each routed expert dequantized in turn."""
        compute = torch.float32 if hidden_states.device.type == "cpu" else hidden_states.dtype
        final = torch.zeros_like(hidden_states, dtype=compute)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            mask = mask.permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for (expert,) in hit.tolist():
            if expert >= self.num_experts:  # expert-parallel sentinel: not on this rank
                continue
            position, token = torch.where(mask[expert])
            state = hidden_states[token].to(compute)
            gate_up = nn.functional.linear(
                state, self.expert_weight("gate_up_proj", expert, compute)
            )
            gate, up = gate_up.chunk(2, dim=-1)
            out = nn.functional.linear(
                self.act_fn(gate) * up, self.expert_weight("down_proj", expert, compute)
            )
            out = out * top_k_weights[token, position, None].to(compute)
            final.index_add_(0, token, out)
        return final.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden}, "
            f"intermediate={self.intermediate}, {self.config.fields}"
        )


def experts_layout_problem(module: nn.Module) -> str | None:
    """Why `module` is not an experts module `QuantExperts` can stand in for, or None.

    Known: transformers' fused experts with exactly ``gate_up_proj`` ``(E, 2I, H)`` (gate
    rows first, as ``_default_apply_gate`` splits them) and ``down_proj`` ``(E, H, I)``, no
    biases, not transposed, no norm after the experts (``has_post_expert_norm``, MuseSpark),
    an ``act_fn``, called ``(hidden_states, top_k_index, top_k_weights)``.
    """
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(PROJECTIONS):
        return f"parameters {sorted(params)}, not gate_up_proj and down_proj"
    gate_up, down = params["gate_up_proj"].shape, params["down_proj"].shape
    if len(gate_up) != 3 or len(down) != 3:
        return f"gate_up_proj {list(gate_up)} and down_proj {list(down)} are not 3-D"
    experts, double, hidden = gate_up
    if double % 2 or tuple(down) != (experts, hidden, double // 2):
        return f"gate_up_proj {list(gate_up)} and down_proj {list(down)} do not fit together"
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        return "transposed or biased expert weights"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm after each expert (post_expert_norm)"
    if getattr(module, "is_concatenated", True) is False:
        return "gate and up rows interleaved"
    if getattr(module, "has_gate", True) is False or not isinstance(
        getattr(module, "act_fn", None), nn.Module
    ):
        return "no gated activation"
    apply_gate = getattr(type(module), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        return f"its own gating ({type(module).__name__}._apply_gate)"
    forward = inspect.unwrap(type(module).forward)
    names = list(inspect.signature(forward).parameters)[1:4]
    if names != ["hidden_states", "top_k_index", "top_k_weights"]:
        return f"a forward taking ({', '.join(names)})"
    return None
