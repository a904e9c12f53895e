"""Matmul kernels for `QuantLinear`, and the rule that picks one for each call.

Measured on a 2-core AVX2 CPU without bf16 hardware (see docs/benchmarks.md):

- ``int8pack``: PyTorch's fused W8A16 kernel (`torch._weight_int8pack_mm`) reads the int8
  weight directly; with bf16 activations it is about 13x faster than dequantizing at
  decode sizes. It needs per-channel (or per-tensor) symmetric int8, and it crashes the
  process for M >= 2 when K % 8 != 0, so that case never reaches it.
- ``fp32-dequant``: from M ~ 32 tokens (prefill) an fp32 matmul on the dequantized weight
  beats every int8 kernel here (bf16 matmuls are slow on CPUs without bf16 units).
- ``dequant``: the reference for everything else (2/4-bit, fp32 activations, GPUs for
  now): dequantize to the activation dtype and `F.linear`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from quantcli.config import Granularity

#: Below this many rows of activations (tokens), decode kernels win; from it, fp32 matmul.
PREFILL_MIN_M = 32


def select_kernel(layer, x: torch.Tensor) -> str:
    """The name of the kernel to use for `layer` on input `x`."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return "dequant"
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows >= PREFILL_MIN_M:
        return "fp32-dequant"
    config = layer.config
    if (
        x.dtype == torch.bfloat16
        and config.bits == 8
        and config.symmetric
        and config.granularity is not Granularity.GROUP
        and layer.in_features % 8 == 0  # else _weight_int8pack_mm crashes for M >= 2
        and hasattr(torch, "_weight_int8pack_mm")
    ):
        return "int8pack"
    return "dequant"


def _bias(layer, dtype: torch.dtype) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(dtype)


def dequant(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dequantize_weight(x.dtype), _bias(layer, x.dtype))


def fp32_dequant(layer, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize_weight(torch.float32)
    return F.linear(x.float(), weight, _bias(layer, torch.float32)).to(x.dtype)


def int8pack(layer, x: torch.Tensor) -> torch.Tensor:
    scales = layer.weight_scale.to(torch.bfloat16).reshape(-1).expand(layer.out_features)
    rows = x.reshape(-1, layer.in_features).contiguous()
    out = torch._weight_int8pack_mm(rows, layer.weight, scales.contiguous())
    out = out.reshape(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


KERNELS: dict[str, Callable] = {
    "dequant": dequant,
    "fp32-dequant": fp32_dequant,
    "int8pack": int8pack,
}
