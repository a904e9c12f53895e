"""Matmul kernels for `QuantLinear`, and the rule that picks one for each call.

Measured on a 2-core AVX2 CPU without bf16 hardware (see docs/benchmarks.md):

- ``int8pack``: PyTorch's fused W8A16 kernel (`torch._weight_int8pack_mm`) reads the int8
  weight directly; with bf16 activations it is about 13x faster than dequantizing at
  decode sizes on CPU (on CUDA it is no faster than dequantizing, so it is not used there).
  It needs per-channel (or per-tensor) symmetric int8, and on CPU it crashes the process
  for M >= 2 when K % 8 != 0, so that case never reaches it.
- ``int4pack``: PyTorch's fused W4A16 kernels (tinygemm on CUDA, its CPU port otherwise)
  read 4-bit groups of 32..256 with bf16 activations. They want their own weight layout,
  made once per layer and device on first use and cached (`int4pack_weight`).
- ``fp32-dequant``: on CPU, from M ~ 32 tokens (prefill) an fp32 matmul on the dequantized
  weight beats every int8/int4 kernel here (bf16 matmuls are slow on CPUs without bf16
  units).
- ``dequant``: the reference for everything else (2-bit, fp32 activations, odd shapes):
  dequantize to the activation dtype and `F.linear`.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F

from quantcli.config import Granularity

#: On CPU, from this many rows of activations (tokens) an fp32 matmul beats the fused kernels.
PREFILL_MIN_M = 32
#: Group sizes the int4 kernels accept.
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)
#: tinygemm's inner K tiles on CUDA: K must be a multiple of 16 times this.
CUDA_INNER_K_TILES = 8
#: On CUDA, from this many rows dequantize-then-matmul beats tinygemm int4.
CUDA_INT4PACK_MAX_M = 256


def select_kernel(layer, x: torch.Tensor) -> str:
    """The name of the kernel to use for `layer` on input `x`."""
    rows = math.prod(x.shape[:-1])
    return choose_kernel(layer, x.device.type, x.dtype, rows)


def choose_kernel(layer, device: str, dtype: torch.dtype, rows: int) -> str:
    """The kernel for `rows` tokens of `dtype` activations on a `device` ("cpu", "cuda")."""
    if device == "cpu":
        return _choose_on_cpu(layer, dtype, rows)
    if device == "cuda":
        return _choose_on_cuda(layer, dtype, rows)
    return "dequant"


def _choose_on_cpu(layer, dtype: torch.dtype, rows: int) -> str:
    if rows >= PREFILL_MIN_M or dtype == torch.float32:
        return "fp32-dequant"
    if dtype == torch.bfloat16:
        kernel = fused_kernel(layer.config)
        if kernel == "int8pack" and _int8pack_fits(layer):
            return kernel
        if kernel == "int4pack" and _int4pack_fits_cpu(layer):
            return kernel
    return "dequant"


def _choose_on_cuda(layer, dtype: torch.dtype, rows: int) -> str:
    """On an H100, tinygemm int4 is 1.6-1.8x a bf16 matmul at decode and loses to
    dequantize-then-matmul by 512 rows; PyTorch's int8pack is no faster than dequantizing
    at 1 row and 3x slower at 8, so int8 layers always dequantize there."""
    if (
        dtype == torch.bfloat16
        and rows < CUDA_INT4PACK_MAX_M
        and fused_kernel(layer.config) == "int4pack"
        and _int4pack_fits_cuda(layer)
    ):
        return "int4pack"
    return "dequant"


def fused_kernel(config) -> str | None:
    """The fused decode kernel for layers of this config, if any (before their shapes)."""
    if config.bits == 8 and config.symmetric and config.granularity is not Granularity.GROUP:
        return "int8pack"
    if (
        config.bits == 4
        and config.granularity is Granularity.GROUP
        and config.group_size in INT4PACK_GROUP_SIZES
    ):
        return "int4pack"
    return None


def preferred_dtype(config, device: str) -> torch.dtype:
    """The activation dtype that runs these layers fastest on `device`.

    GPUs: bf16 (fp16 where bf16 is missing). CPUs: bf16 where a fused kernel takes the
    decode steps (prefill runs in fp32 either way), else fp32, because bf16 arithmetic is
    slow on CPUs without bf16 units.
    """
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if fused_kernel(config) else torch.float32


def kernel_plan(model: torch.nn.Module, device: str, dtype: torch.dtype, rows: int) -> Counter:
    """How many quantized layers of `model` each kernel serves for `rows` tokens."""
    return Counter(choose_kernel(layer, device, dtype, rows) for layer in _quantized_layers(model))


def prepare_kernels(model: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
    """Make now the weight layouts the decode kernels will want (int4pack's), once.

    Done at load time so that the first token does not pay for it, and so that a compiled
    decode step finds them ready instead of retracing around the cache.
    """
    for layer in _quantized_layers(model):
        if choose_kernel(layer, device, dtype, 1) == "int4pack":
            int4pack_weight(layer)


def _quantized_layers(model: torch.nn.Module):
    """The `QuantLinear`s of a model (known by their buffers: qlinear imports this module)."""
    return (m for m in model.modules() if hasattr(m, "weight_scale") and hasattr(m, "config"))


def _int8pack_fits(layer) -> bool:
    # on CPU, _weight_int8pack_mm crashes for M >= 2 when K % 8 != 0
    return layer.in_features % 8 == 0 and hasattr(torch, "_weight_int8pack_mm")


def _int4pack_fits_cpu(layer) -> bool:
    return layer.out_features % 16 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu")


def _int4pack_fits_cuda(layer) -> bool:
    return (
        layer.out_features % 8 == 0
        and layer.in_features % (16 * CUDA_INNER_K_TILES) == 0
        and hasattr(torch, "_weight_int4pack_mm")
    )


def _bias(layer, dtype: torch.dtype) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(dtype)


def _rows(layer, x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, layer.in_features).contiguous()


def _finish(layer, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    out = out.reshape(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(out.dtype)


def dequant(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dequantize_weight(x.dtype), _bias(layer, x.dtype))


def fp32_dequant(layer, x: torch.Tensor) -> torch.Tensor:
    weight = layer.dequantize_weight(torch.float32, _workspace(layer, x.device))
    return F.linear(x.float(), weight, _bias(layer, torch.float32)).to(x.dtype)


_workspaces = threading.local()


def _workspace(layer, device: torch.device) -> torch.Tensor:
    """A reused float32 ``(out, in)`` buffer for the dequantized weight, per thread.

    A fresh buffer of a large layer costs more in page faults than the dequantization
    itself (17 of 27 ms for 4096x4096 here); keeping the largest one costs its size once.
    """
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    size = layer.out_features * layer.in_features
    buffer = buffers.get(device)
    if buffer is None or buffer.numel() < size:
        buffers[device] = buffer = torch.empty(size, dtype=torch.float32, device=device)
    return buffer[:size].view(layer.out_features, layer.in_features)


def int8pack(layer, x: torch.Tensor) -> torch.Tensor:
    scales = layer.weight_scale.to(x.dtype).reshape(-1).expand(layer.out_features)
    out = torch._weight_int8pack_mm(_rows(layer, x), layer.weight, scales.contiguous())
    return _finish(layer, out, x)


def int4pack(layer, x: torch.Tensor) -> torch.Tensor:
    packed, scales_and_zeros = int4pack_weight(layer)
    group_size = layer.config.group_size
    on_cpu = x.device.type == "cpu"
    matmul = torch._weight_int4pack_mm_for_cpu if on_cpu else torch._weight_int4pack_mm
    return _finish(layer, matmul(_rows(layer, x), packed, group_size, scales_and_zeros), x)


def int4pack_weight(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight in the int4 kernel's layout, made on first use and cached.

    The kernels compute ``w = (u - 8) * scale + zero`` with unsigned nibbles ``u``; ours is
    ``w = s * (q - z)`` with signed ``q``, so ``u = q + 8``, ``scale = s``, ``zero = -s * z``.
    The cache is tied to the `weight_packed` tensor, so loading or moving the layer renews it.
    """
    cached = layer.__dict__.get("_int4pack")
    if cached is not None and cached[0] is layer.weight_packed:
        return cached[1], cached[2]
    signed, zero_point = layer.integers()
    unsigned = signed.to(torch.int32) + 8
    if layer.weight_packed.device.type == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(unsigned.contiguous(), 2)
    else:
        nibbles = (unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8)
        packed = torch._convert_weight_to_int4pack(nibbles.contiguous(), CUDA_INNER_K_TILES)
    scale = layer.weight_scale.float()
    zero = torch.zeros_like(scale) if zero_point is None else -scale * zero_point.float()
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    scales_and_zeros = scales_and_zeros.to(torch.bfloat16)  # (groups, out, 2)
    layer.__dict__["_int4pack"] = (layer.weight_packed, packed, scales_and_zeros)
    return packed, scales_and_zeros


KERNELS: dict[str, Callable] = {
    "dequant": dequant,
    "fp32-dequant": fp32_dequant,
    "int8pack": int8pack,
    "int4pack": int4pack,
}
