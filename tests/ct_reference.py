"""compressed-tensors as the independent reference for scales, zero points and codes.

quantcli and compressed-tensors agree on everything but two documented points, which the
helpers here state once so every test applies them the same way:

- Symmetric scale: compressed-tensors divides the absmax by ``(q_max - q_min) / 2`` (127.5
  at 8 bits), quantcli by ``q_max`` (127). quantcli's grid is then symmetric: ``±absmax``
  land exactly on ``±q_max`` and ``q_min`` is never produced, so a weight and its negation
  round alike; compressed-tensors' ``+absmax`` maps to 127.5 and is clamped to 127 (an
  error of a full half step beyond its grid). The two scales differ by exactly the factor
  ``(q_max - q_min) / (2 * q_max)``: 1.0039 (8 bits), 1.0714 (4), 1.5 (2).
- Scale dtype: compressed-tensors rounds a scale to its storage dtype to nearest;
  quantcli rounds *up*, so ``|w / s| <= q_max`` holds with the stored scale and no value is
  clamped. The stored scale is therefore at most one step (ulp) of its dtype above the
  reference, never below it. (All-zero groups: both use the dtype's epsilon and
  dequantize to exact zeros.)
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

__all__ = [
    "args",
    "ct_dequantize",
    "ct_dequantized",
    "ct_quantize",
    "reference_qparams",
    "reference_step",
]


def args(bits: int, scheme: str, granularity: str, group_size: int | None) -> QuantizationArgs:
    return QuantizationArgs(
        num_bits=bits,
        symmetric=scheme == "sym",
        strategy=granularity,
        group_size=group_size if granularity == "group" else None,
    )


def group_ranges(weight: torch.Tensor, granularity: str, group_size: int | None):
    """Min and max of every group of a float32 weight, in the scale's shape."""
    w = weight.float()
    if granularity == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if granularity == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    groups = w.unflatten(1, (-1, group_size))
    return groups.amin(-1), groups.amax(-1)


def reference_qparams(weight, bits, scheme, granularity, group_size=None):
    """compressed-tensors' own float32 scale and int8 zero point for this weight."""
    low, high = group_ranges(weight, granularity, group_size)
    return calculate_qparams(low, high, args(bits, scheme, granularity, group_size))


def sym_ratio(bits: int) -> float:
    """quantcli's symmetric scale over compressed-tensors': (q_max - q_min) / (2 q_max)."""
    q_max = 2 ** (bits - 1) - 1
    return (2**bits - 1) / (2 * q_max)


def reference_step(weight, bits, scheme, granularity, group_size=None) -> torch.Tensor:
    """The step quantcli should use, per element ``(out, in)``, in float64: compressed-tensors'
    scale, times the documented symmetric factor. Never read from quantcli's output."""
    scale, _ = reference_qparams(weight, bits, scheme, granularity, group_size)
    scale = scale.double() * (sym_ratio(bits) if scheme == "sym" else 1.0)
    out_features, in_features = weight.shape
    if scale.ndim == 2:
        scale = scale.repeat_interleave(in_features // scale.shape[1], dim=1)
    return scale.expand(out_features, in_features)


def ct_dequantized(files: dict, name: str, bits: int, shape) -> torch.Tensor:
    """A quantized table or weight from its files, by compressed-tensors' unpacking and
    formula ``scale * (q - zero)``: no quantcli code."""
    codes = unpack_from_int32(files[f"{name}.weight_packed"], bits, torch.Size(shape)).float()
    scale = files[f"{name}.weight_scale"].float()
    zero = files.get(f"{name}.weight_zero_point")
    if zero is not None and zero.dtype == torch.int32:
        zero = unpack_from_int32(zero, bits, torch.Size(scale.shape), packed_dim=0)
    width = shape[1] // scale.shape[1] if scale.ndim == 2 else shape[1]
    scale = scale.repeat_interleave(width, dim=1) if scale.ndim == 2 else scale
    if zero is None:
        return scale * codes
    zero = zero.float().repeat_interleave(width, dim=1) if zero.ndim == 2 else zero.float()
    return scale * (codes - zero)
