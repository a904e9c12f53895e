"""`QuantLinear`: a linear layer whose weight is stored as integers (W8A16, W4A16, W2A16).

Its state_dict is the checkpoint's layout, compressed-tensors' ``pack-quantized`` (what its
own writer uses for weight-only int of any width, and what vLLM serves):

- ``weight_packed`` int32 ``(out, ceil(in * bits / 32))`` and ``weight_shape`` int64
  ``[out, in]``;
- ``weight_scale`` (``(1,)``, ``(out, 1)`` or ``(out, in // group_size)``) in the scale
  dtype, and ``bias`` when the layer has one;
- asymmetric: ``weight_zero_point``, packed into int32 along the output dimension, or per
  tensor int8 ``(1,)``.

In memory, 4/2-bit layers keep that layout; 8-bit layers keep ``weight`` int8 ``(out, in)``
(and int8 zero points), the operand of the fused int8 kernels, converted once when a state
dict is loaded or saved. Checkpoints that store 8-bit weights as ``int-quantized`` (plain
int8 ``weight``, quantcli before format 2 and other writers) load as they are.

Everything is a buffer (inference only, no gradients). `forward` runs the kernel
`quantcli.nn.kernels` chose for the call's device, dtype and size class (fused int8 or int4
at decode, fp32 matmul at prefill, dequantize otherwise), chosen and prepared on the first
such call and kept in the layer (`_kernels`, not in the state dict) until its tensors
change: assigned, loaded or moved (`forget_kernels`).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from quantcli.config import Granularity, QuantConfig
from quantcli.errors import CheckpointError
from quantcli.nn.kernels import plan
from quantcli.tensor.packing import pack_int32, packed_length, unpack_int32
from quantcli.tensor.quantize import (
    QuantizedTensor,
    dequantize,
    groups_per_row,
    int_range,
    quantize,
)


class QuantLinear(nn.Module):
    """``y = x @ dequantize(W).T + b`` with W held as int8 or packed 4/2-bit integers."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        config: QuantConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self._kernels: dict = {}  # what `forward` runs, per device and dtype (kernels.plan)
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        scale_shape = self._scale_shape()
        empty = partial(torch.empty, device=device)  # free on meta

        if config.packed:
            self.register_buffer(
                "weight_packed",
                empty((out_features, packed_length(in_features, config.bits)), dtype=torch.int32),
            )
            self.register_buffer("weight_shape", empty((2,), dtype=torch.int64))
        else:
            self.register_buffer("weight", empty((out_features, in_features), dtype=torch.int8))
        self.register_buffer("weight_scale", empty(scale_shape, dtype=dtype))
        if not config.symmetric:
            if config.packed and packs_zero_point(config):
                zero_shape = (packed_length(out_features, config.bits), scale_shape[1])
                self.register_buffer("weight_zero_point", empty(zero_shape, dtype=torch.int32))
            else:
                self.register_buffer("weight_zero_point", empty(scale_shape, dtype=torch.int8))
        self.register_buffer("bias", empty((out_features,), dtype=dtype) if bias else None)
        # how an 8-bit layer's state dict stores its integers (set to "int-quantized" to
        # read or write the plain int8 layout of older checkpoints)
        self.checkpoint_format = "pack-quantized"

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig
    ) -> QuantLinear:
        """Quantize a float ``(out, in)`` weight; on the meta device, only shape the layer."""
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
        out_features, in_features = weight.shape
        dtype = config.dtype or weight.dtype
        layer = cls(in_features, out_features, bias is not None, config, dtype, weight.device)
        if weight.device.type != "meta":
            layer.load_quantized(quantize_weight(weight, config, dtype), bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig) -> QuantLinear:
        return cls.from_weight(linear.weight, linear.bias, config)

    def load_quantized(self, qweight: QuantizedTensor, bias: torch.Tensor | None) -> None:
        """Store an already quantized weight (and the float bias) in this layer's layout."""
        zero = qweight.zero_point
        if self.config.packed:
            state = compressed_state(qweight.qdata, qweight.scale, zero, self.config)
        else:
            state = {"weight": qweight.qdata, "weight_scale": qweight.scale}
            if zero is not None:
                state["weight_zero_point"] = zero
        for name, tensor in state.items():
            setattr(self, name, tensor)
        if bias is not None:
            self.bias = bias.to(qweight.scale.dtype)

    def dequantize_weight(
        self,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
        rows: slice | torch.Tensor = slice(None),
    ) -> torch.Tensor:
        """The float weight ``(out, in)`` these integers stand for (written into `out`), or
        its output rows `rows`: a step-1 slice (the tiled kernels' tiles) or indices (an
        embedding's lookups)."""
        qdata, zero = self.integers(rows)
        scale = self.weight_scale
        if self.config.granularity is not Granularity.TENSOR:
            scale = scale[rows]
        return dequantize(qdata, scale, zero, dtype, out)

    def integers(
        self, rows: slice | torch.Tensor = slice(None)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The int8 values ``(out, in)`` and zero points (None when symmetric), unpacked: all
        of them, or those of output rows `rows` (a step-1 slice or indices), only the words
        those rows are in unpacked."""
        bits = self.config.bits
        if self.config.packed:
            qdata = unpack_int32(self.weight_packed[rows], bits, self.in_features)
        else:
            qdata = self.weight[rows]
        zero = getattr(self, "weight_zero_point", None)
        if zero is None or self.config.granularity is Granularity.TENSOR:
            return qdata, zero
        if not (self.config.packed and packs_zero_point(self.config)):
            return qdata, zero[rows]
        per_word = 32 // bits  # zero points are packed along the rows: unpack the words read
        if isinstance(rows, torch.Tensor):  # the word holding each row, each unpacked
            words = unpack_int32(zero[rows // per_word], bits, len(rows) * per_word, dim=0)
            first = torch.arange(len(rows), device=rows.device) * per_word
            return qdata, words[first + rows % per_word]
        start, stop, _ = rows.indices(self.out_features)
        first = start // per_word
        words = zero[first : -(-stop // per_word)]
        values = unpack_int32(words, bits, max(stop - first * per_word, 0), dim=0)
        return qdata, values[start - first * per_word :]

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        """8-bit layers save their int8 weight as the checkpoint's packed words."""
        if self.config.packed or self.checkpoint_format == "int-quantized":
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        zero = getattr(self, "weight_zero_point", None)
        state = compressed_state(self.weight, self.weight_scale, zero, self.config)
        if self.bias is not None:
            state["bias"] = self.bias
        for name, tensor in state.items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """Refuse tensors that would compute garbage; 8-bit layers take the checkpoint's
        packed words (or older plain int8) as int8."""
        self._check_state(state_dict, prefix)
        packed = state_dict.get(prefix + "weight_packed")
        if not self.config.packed and packed is not None:
            state_dict = dict(state_dict)
            del state_dict[prefix + "weight_packed"]
            state_dict.pop(prefix + "weight_shape", None)  # checked above when present
            state_dict[prefix + "weight"] = unpack_int32(packed, 8, self.in_features)
            zero = state_dict.get(prefix + "weight_zero_point")
            if zero is not None and packs_zero_point(self.config):
                state_dict[prefix + "weight_zero_point"] = unpack_int32(
                    zero, 8, self.out_features, dim=0
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.forget_kernels()  # without assign=True, the tensors were copied in place

    def _check_state(self, state_dict, prefix: str) -> None:
        """Scales finite and positive, ``weight_shape`` this layer's, int8 zero points within
        the bit width (packed codes cannot leave it): a checkpoint breaking these loads, then
        generates garbage (NaN logits, ``<unk>``). Costs one pass over the scales."""
        shape = state_dict.get(prefix + "weight_shape")
        expected = [self.out_features, self.in_features]
        if shape is not None and not shape.is_meta and shape.tolist() != expected:
            raise CheckpointError(f"{prefix}weight_shape holds {shape.tolist()}, not {expected}.")
        scale = state_dict.get(prefix + "weight_scale")
        if scale is not None and not scale.is_meta:
            bad = ~(torch.isfinite(scale) & (scale > 0))
            if bad.any():
                raise CheckpointError(
                    f"{prefix}weight_scale holds {int(bad.sum())} value(s) that are not "
                    f"finite and positive (e.g. {scale[bad][0].item()}): the checkpoint is "
                    "corrupt."
                )
        zero = state_dict.get(prefix + "weight_zero_point")
        if zero is not None and not zero.is_meta and zero.dtype == torch.int8 and zero.numel():
            low, high = int_range(self.config.bits)
            if int(zero.min()) < low or int(zero.max()) > high:
                raise CheckpointError(
                    f"{prefix}weight_zero_point holds values outside {low}..{high}, the "
                    f"{self.config.bits}-bit range: the checkpoint is corrupt."
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        limit, decode, prefill = self._kernels.get((x.device, x.dtype)) or plan(
            self, x.device, x.dtype
        )
        run, operands = decode if x.numel() < limit else prefill
        return run(self, x, *operands)

    def forget_kernels(self) -> None:
        """Drop the kernels chosen and the operands made for them (the tensors changed)."""
        self._kernels.clear()
        self.__dict__.pop("_int4pack", None)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in self._buffers:
            self.forget_kernels()

    def _apply(self, fn, recurse: bool = True):
        """``to``, ``cuda``, ``half``...: the moved or converted tensors are new ones."""
        result = super()._apply(fn, recurse)
        self.forget_kernels()
        return result

    def __getattr__(self, name: str):
        """Packed layers answer ``.weight`` with a meta tensor: model code (T5, for one) reads
        the weight's dtype and shape; it holds no data, so nothing can use it by mistake."""
        if name == "weight" and self.config.packed:
            dtype = self.weight_scale.dtype
            return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.config.fields}"
        )

    def _scale_shape(self) -> tuple[int, ...]:
        c = self.config
        if c.granularity is Granularity.TENSOR:
            return (1,)
        if c.granularity is Granularity.CHANNEL:
            return (self.out_features, 1)
        return (self.out_features, groups_per_row(self.in_features, c.group_size))


def quantize_weight(weight: torch.Tensor, config: QuantConfig, dtype: torch.dtype | None):
    """`quantize` with the settings of `config`, scales in `dtype`."""
    return quantize(
        weight,
        config.bits,
        config.scheme,
        config.granularity,
        config.group_size,
        dtype,
        optimize=config.optimize,
    )


def packs_zero_point(config: QuantConfig) -> bool:
    """compressed-tensors packs zero points per channel and per group, not per tensor."""
    return config.granularity is not Granularity.TENSOR


def compressed_state(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, config: QuantConfig
) -> dict[str, torch.Tensor]:
    """Integers ``(out, in)``, scales and zero points as the checkpoint's tensors, bias aside:
    exactly what compressed-tensors' pack-quantized compressor writes."""
    state = {
        "weight_packed": pack_int32(qdata, config.bits),
        "weight_shape": torch.tensor(qdata.shape, dtype=torch.int64, device=qdata.device),
        "weight_scale": scale,
    }
    if zero is not None:
        state["weight_zero_point"] = (
            pack_int32(zero, config.bits, dim=0) if packs_zero_point(config) else zero
        )
    return state
