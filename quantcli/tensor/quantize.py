"""Linear (affine) quantization of 2-D weight tensors: scale, zero point, round, clamp.

Pure tensor math: no modules, no files. Conventions (see docs/quantization.md):

- dequantize: ``w ≈ s * (q - z)``; quantize: ``q = clamp(round(w / s + z), q_min, q_max)``
  with signed integers ``q_min = -2^(n-1)``, ``q_max = 2^(n-1) - 1``.
- symmetric: ``s = absmax / q_max``, ``z = 0``; asymmetric: the range ``[min, max]`` is first
  widened to contain 0 (so a real zero is exact and ``z`` never leaves the integer range),
  then ``s = (max - min) / (q_max - q_min)``, ``z = round(q_min - min / s)``.
- scale shapes follow compressed-tensors: ``(1,)`` per tensor, ``(out, 1)`` per channel,
  ``(out, in // group_size)`` per group. Zero points are int8 of the same shape.
- scales are computed in float32, then rounded *up* to the storage dtype, and the integers
  are computed against that stored scale: no value then lands outside the integer range,
  so every element dequantizes within half a (stored) scale step of the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantcli.config import Granularity, Scheme
from quantcli.errors import InvalidTensorError, UsageError

MIN_BITS, MAX_BITS = 2, 8
BLOCK_ELEMENTS = 1 << 20
#: Fractions of each group's range tried by the clipping search (1.0: round to nearest).
CLIP_RATIOS = tuple(1 - 0.025 * i for i in range(21))


def int_range(bits: int) -> tuple[int, int]:
    """The signed integer range ``(q_min, q_max)`` of a `bits`-bit value."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise UsageError(f"bits={bits} is out of range: quantcli quantizes to 2..8 bits.")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedTensor:
    """Integers plus what is needed to turn them back into real numbers."""

    qdata: torch.Tensor  # int8, the weight's shape (out, in), values in int_range(bits)
    scale: torch.Tensor  # (1,), (out, 1) or (out, in // group_size), in the scale dtype
    zero_point: torch.Tensor | None  # int8, scale's shape; None when symmetric
    bits: int
    scheme: Scheme
    granularity: Granularity
    group_size: int | None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, self.zero_point, dtype)


def dequantize(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale * (qdata - zero_point)`` in `dtype` (default: the scale's dtype).

    The granularity is read from the scale's shape, so callers only pass tensors. The
    order of operations is compressed-tensors' own, so both give the same numbers. The
    work is done in place in one float buffer (`out` when given, reused by the kernels):
    fresh large buffers cost page faults that outweigh the arithmetic.
    """
    dtype = dtype or scale.dtype
    if out is None:
        out = torch.empty(qdata.shape, dtype=dtype, device=qdata.device)
    n_groups = scale.shape[-1] if scale.ndim == 2 else 1
    values = out.copy_(qdata).unflatten(-1, (n_groups, -1))
    if zero_point is not None:
        values.sub_(_per_group(zero_point, dtype))
    values.mul_(_per_group(scale, dtype))
    return out


def _per_group(param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Broadcast a scale or zero point against values viewed as (out, groups, size)."""
    param = param.to(dtype)
    return param.unsqueeze(-1) if param.ndim == 2 else param


def quantize(
    weight: torch.Tensor,
    bits: int,
    scheme: Scheme | str = Scheme.SYM,
    granularity: Granularity | str = Granularity.CHANNEL,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    optimize: bool = False,
) -> QuantizedTensor:
    """Quantize a 2-D float weight ``(out, in)``; scales are stored in `dtype`.

    `optimize`: instead of each group's full range, use the fraction of it (from
    `CLIP_RATIOS`) that gives the smallest squared reconstruction error of that group.
    Clipping a few outliers buys a finer step for all the other weights; without
    calibration data this is the error that can be measured. The full range is among the
    candidates, so no group gets worse than round-to-nearest. Channel and group only.

    Raises `InvalidTensorError` for NaN/Inf or a tensor that is not 2-D, and `UsageError`
    for a group size that does not divide the input dimension (compressed-tensors and
    vLLM require whole groups, so quantcli never writes a partial one).
    """
    scheme, granularity = Scheme(scheme), Granularity(granularity)
    q_min, q_max = int_range(bits)
    _check_weight(weight)
    dtype = dtype or weight.dtype
    if granularity is Granularity.GROUP:
        groups_per_row(weight.shape[1], group_size)
    blocks = _row_blocks(weight)

    # 1. the range of every group, block by block
    lows, highs = [], []
    for _, block in blocks:
        groups = _as_groups(block.float(), granularity, group_size)
        lows.append(groups.amin(-1))
        highs.append(groups.amax(-1))
    low, high = torch.cat(lows), torch.cat(highs)
    if granularity is Granularity.TENSOR:
        if optimize:
            raise UsageError("the clipping search works per channel or per group, not per tensor.")
        low, high = low.min().reshape(1, 1), high.max().reshape(1, 1)
    if optimize:
        ratio = _best_clip_ratios(blocks, low, high, bits, scheme, granularity, group_size, dtype)
        low, high = low * ratio, high * ratio

    # 2. scale and zero point per group, from float32 ranges
    scale, zero = _scale_and_zero(low, high, bits, scheme, dtype)

    # 3. the integers, block by block, against the stored scale
    qdata = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start, block in blocks:
        rows = (
            slice(None) if granularity is Granularity.TENSOR else slice(start, start + len(block))
        )
        shifted = _as_groups(block.float(), granularity, group_size) / scale[
            rows
        ].float().unsqueeze(-1)
        if zero is not None:
            shifted += zero[rows].unsqueeze(-1)
        qdata[start : start + len(block)] = (
            shifted.round_().clamp_(q_min, q_max).to(torch.int8).reshape(block.shape)
        )

    scale_shape = (1,) if granularity is Granularity.TENSOR else (weight.shape[0], -1)
    return QuantizedTensor(
        qdata=qdata,
        scale=scale.reshape(scale_shape),
        zero_point=None if zero is None else zero.to(torch.int8).reshape(scale_shape),
        bits=bits,
        scheme=scheme,
        granularity=granularity,
        group_size=group_size if granularity is Granularity.GROUP else None,
    )


def _scale_and_zero(
    low: torch.Tensor, high: torch.Tensor, bits: int, scheme: Scheme, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The stored scale and the (float, integral) zero point of float32 ranges."""
    q_min, q_max = int_range(bits)
    if scheme is Scheme.SYM:
        return _round_up(torch.maximum(low.abs(), high.abs()) / q_max, dtype), None
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = _round_up((high - low) / (q_max - q_min), dtype)
    return scale, torch.round(q_min - low / scale.float()).clamp(q_min, q_max)


def _best_clip_ratios(blocks, low, high, bits, scheme, granularity, group_size, dtype):
    """Per group, the entry of `CLIP_RATIOS` whose range reconstructs it best (least squares)."""
    q_min, q_max = int_range(bits)
    best_ratio = torch.ones_like(low)
    for start, block in blocks:
        rows = slice(start, start + len(block))
        groups = _as_groups(block.float(), granularity, group_size)
        best_error = torch.full(groups.shape[:2], torch.inf, device=groups.device)
        for ratio in CLIP_RATIOS:
            clipped = (low[rows] * ratio, high[rows] * ratio)
            scale, zero = _scale_and_zero(*clipped, bits, scheme, dtype)
            scale = scale.float().unsqueeze(-1)
            zero = 0.0 if zero is None else zero.unsqueeze(-1)
            q = (groups / scale + zero).round_().clamp_(q_min, q_max)
            error = ((q - zero) * scale - groups).square_().sum(-1)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best_ratio[rows] = torch.where(better, ratio, best_ratio[rows])
    return best_ratio


def _row_blocks(weight: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """Row slices of about `BLOCK_ELEMENTS` values: float32 temporaries stay ~4 MB each,
    whatever the matrix size. Rows are independent, so blocks change no result."""
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    return [(start, weight[start : start + rows]) for start in range(0, weight.shape[0], rows)]


def _check_weight(weight: torch.Tensor) -> None:
    if weight.ndim != 2:
        raise InvalidTensorError(
            f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight.shape)}."
        )
    if not weight.is_floating_point():
        raise InvalidTensorError(f"expected a floating-point weight, got {weight.dtype}.")
    if not torch.isfinite(weight).all():
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int(torch.isinf(weight).sum())
        raise InvalidTensorError(
            f"weight contains {n_nan} NaN and {n_inf} Inf values: repair the checkpoint "
            "or exclude this layer from quantization."
        )


def _as_groups(x: torch.Tensor, granularity: Granularity, group_size: int | None) -> torch.Tensor:
    """View the weight as (rows, groups, values per group): each group shares one scale."""
    if granularity is Granularity.TENSOR:
        return x.reshape(1, 1, -1) if x.shape[0] else x.reshape(0, 1, -1)
    if granularity is Granularity.CHANNEL:
        return x.unsqueeze(1)
    return x.unflatten(1, (groups_per_row(x.shape[1], group_size), group_size))


def groups_per_row(in_features: int, group_size: int | None) -> int:
    """How many groups of `group_size` inputs make a row; whole groups only."""
    if group_size is None or group_size < 1 or in_features % group_size:
        raise UsageError(
            f"group_size={group_size} does not divide in_features={in_features}: "
            "choose a group size that divides it, or exclude this layer."
        )
    return in_features // group_size


def _round_up(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, rounded up (never down), an all-zero group's 0 made the dtype's eps.

    Rounding up keeps every ``w / s`` inside the integer range. An all-zero group (a padding
    embedding row, a pruned channel) gets compressed-tensors' scale, ``finfo(dtype).eps``:
    nothing divides by zero, the group dequantizes to exact zeros, and the scale survives a
    cast to bf16 or fp16 at load (a subnormal would become 0 there, which loaders refuse).
    """
    stored = scale.to(dtype)
    too_small = stored.float() < scale
    next_up = torch.nextafter(stored, torch.full_like(stored, torch.inf))
    stored = torch.where(too_small, next_up, stored)
    stored = torch.where(stored == 0, torch.finfo(dtype).eps, stored)
    if not torch.isfinite(stored).all():
        raise InvalidTensorError(
            f"the scales overflow {dtype}: the weights are too large for it; "
            "store scales in float32 instead."
        )
    return stored
