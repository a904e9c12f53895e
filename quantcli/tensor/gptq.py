"""GPTQ (Frantar et al., 2022): round a weight column by column, feeding each column's
rounding error into the columns not yet rounded, weighted by the inverse Hessian of the
layer's inputs, so that the layer's *outputs* on those inputs move least.

Pure tensor math, like `quantcli.tensor.quantize`, and in its exact format: scales and zero
points come from `quantize()` (so rounding up to the storage dtype, the asymmetric range
widened to contain 0, all-zero groups...), only the integers differ. With an identity
Hessian the error feedback vanishes and the result is round-to-nearest bit for bit.

Per tensor and per channel the scales are computed once from the whole weight up front;
per group, from the error-updated weights of the group at the moment its first column is
reached (the paper's and AutoGPTQ's default).

`act_order` (the paper's "act-order", AutoGPTQ's ``desc_act``): the columns are rounded in
decreasing order of H's diagonal (the inputs with the most energy first, while the most
columns are left to absorb their error). With groups this is AutoGPTQ's ``static_groups``
variant: each group's scales are computed up front from the original (dead-zeroed) weights
in the original column order, and a column uses its own group's scales whenever it is
reached. The checkpoint is then an ordinary group-quantized one (no ``g_idx``): the
reordering only changes which integers are written, never the layout.
"""

from __future__ import annotations

import torch

from quantcli.config import Granularity, Scheme
from quantcli.errors import InvalidTensorError, UsageError
from quantcli.tensor.quantize import QuantizedTensor, groups_per_row, int_range, quantize

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128


class Hessian:
    """``H = 2/n · Σ x xᵀ`` over the n input rows a layer has seen, summed in float32 in
    place, as AutoGPTQ and llm-compressor do: no batch's product is held besides the sum,
    so the widest layer's Hessian (5632 inputs: 127 MB) is in memory once, where a float64
    sum and a float32 product took three times that."""

    def __init__(self, in_features: int) -> None:
        self.sum = torch.zeros(in_features, in_features)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``(..., in)``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.rows += x.shape[0]

    def value(self) -> torch.Tensor:
        """H, made from the sum in place: the accumulator is spent (call it once)."""
        if not self.rows:
            raise UsageError("no calibration input reached this layer.")
        h, self.sum = self.sum.mul_(2 / self.rows), None
        return h


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    scheme: Scheme | str = Scheme.SYM,
    granularity: Granularity | str = Granularity.CHANNEL,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    *,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK_SIZE,
    optimize: bool = False,
    act_order: bool = False,
    prepared: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> QuantizedTensor:
    """GPTQ-quantize a float weight ``(out, in)`` given ``H`` ``(in, in)`` of its inputs.

    `damp`: the fraction of the mean of H's diagonal added to the diagonal before inverting
    (keeps the inverse well conditioned); `block_size`: columns whose updates to the columns
    after them are applied at once (the paper's lazy batches: the same result, faster).
    Columns with a zero diagonal (inputs always zero: dead) are set to zero, as in the
    paper: any value there leaves the outputs unchanged on the calibration data.
    `act_order`: round the columns in decreasing order of H's diagonal, with static group
    scales (module docstring).
    `prepared`: `prepare_hessian(hessian, damp, act_order)` already computed (layers that
    read the same inputs share it); `hessian` is then not read (None will do).
    """
    scheme, granularity = Scheme(scheme), Granularity(granularity)
    q_min, q_max = int_range(bits)
    shape = tuple((hessian if prepared is None else prepared[2]).shape)
    if weight.ndim != 2 or shape != (weight.shape[1], weight.shape[1]):
        raise InvalidTensorError(
            f"GPTQ needs a 2-D weight and a square Hessian of its input width; got "
            f"{tuple(weight.shape)} and {shape}."
        )
    if not damp > 0:
        raise UsageError(f"damp={damp} must be positive.")
    if block_size < 1:
        raise UsageError(f"block_size={block_size} must be a positive integer.")
    dtype = dtype or weight.dtype
    rows, columns = weight.shape
    if granularity is Granularity.GROUP:
        groups_per_row(columns, group_size)

    # tensor and channel scales: once, from the whole float weight (quantize() checks it)
    upfront = None
    if granularity is not Granularity.GROUP:
        upfront = quantize(weight, bits, scheme, granularity, None, dtype, optimize)
    elif not torch.isfinite(weight).all():
        quantize(weight, bits, scheme, granularity, group_size, dtype)  # raises its message

    w = weight.detach().float().clone()
    dead, order, u = prepared or prepare_hessian(hessian, damp, act_order)
    w[:, dead] = 0
    if order is not None and granularity is Granularity.GROUP:
        # static groups: every group's scales from the original weights, original order
        upfront = quantize(w, bits, scheme, granularity, group_size, dtype, optimize)
    if order is not None:
        w = w[:, order]
    original = order.tolist() if order is not None else range(columns)

    qdata = torch.empty(weight.shape, dtype=torch.int8)
    scales, zeros = [], []
    scale = zero = None
    if upfront is not None:
        all_scales = _per_row(upfront.scale, rows)
        all_zeros = None if upfront.zero_point is None else _per_row(upfront.zero_point, rows)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        u_block = u[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if upfront is not None:
                group = original[column] // group_size if granularity is Granularity.GROUP else 0
                scale = all_scales[:, group]
                zero = None if all_zeros is None else all_zeros[:, group]
            elif column % group_size == 0:
                current = _current_group(w, block, errors, u, start, i, group_size)
                group = quantize(current, bits, scheme, Granularity.CHANNEL, None, dtype, optimize)
                scales.append(group.scale)
                zeros.append(group.zero_point)
                scale = group.scale.float()[:, 0]
                zero = None if group.zero_point is None else group.zero_point.float()[:, 0]
            values = block[:, i]
            # quantize()'s own order of operations: the same integers on the same values
            shifted = values / scale
            if zero is not None:
                shifted = shifted + zero
            q = shifted.round().clamp(q_min, q_max)
            qdata[:, original[column]] = q.to(torch.int8)
            restored = (q - zero) * scale if zero is not None else q * scale
            error = (values - restored) / u_block[i, i]
            block[:, i:].addr_(error, u_block[i, i:], alpha=-1)
            errors[:, i] = error
        w[:, end:].addmm_(errors, u[start:end, end:], alpha=-1)

    if upfront is not None:
        return QuantizedTensor(
            qdata,
            upfront.scale,
            upfront.zero_point,
            bits,
            scheme,
            granularity,
            group_size if granularity is Granularity.GROUP else None,
        )
    return QuantizedTensor(
        qdata=qdata,
        scale=torch.cat(scales, dim=1),
        zero_point=None if scheme is Scheme.SYM else torch.cat(zeros, dim=1),
        bits=bits,
        scheme=scheme,
        granularity=granularity,
        group_size=group_size,
    )


def prepare_hessian(
    hessian: torch.Tensor | Hessian, damp: float, act_order: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The dead columns (zero diagonal), the order to round the columns in (None: as they
    are; with `act_order`, decreasing diagonal, ties in column order) and the upper Cholesky
    factor of the damped H⁻¹ in that order.

    Given the `Hessian` accumulator rather than H, its sum is spent in place: H is then
    held here only, and freed once converted to float64, so the widest layer's peak is one
    float32 and one float64 copy at the conversion, one float64 copy after it.
    """
    h = hessian.value() if isinstance(hessian, Hessian) else hessian.detach().float().clone()
    del hessian
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    order = None
    if act_order:
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        rows = torch.index_select(h, 0, order)  # permuted back into h: one copy at a time
        torch.index_select(rows, 1, order, out=h)
        del rows
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    h64 = h.double()
    del h
    return dead, order, _inverse_cholesky_upper(h64)


def _inverse_cholesky_upper(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU) from a float64 H, in its storage:
    row i of U holds, scaled, how the error of column i spreads over the columns after it
    once columns before i are fixed. Every step in place (LAPACK's own way), where a copy
    per step made four float64 copies of H (5632 inputs: 254 MB each)."""
    try:
        torch.linalg.cholesky(h, out=h)
    except torch.linalg.LinAlgError:
        raise UsageError(
            "the Hessian of a layer's inputs is not positive definite even after damping: "
            "raise --damp (e.g. 0.1) or give more calibration text."
        ) from None
    torch.cholesky_inverse(h, out=h)
    return torch.linalg.cholesky(h, upper=True, out=h).float()


def _per_row(param: torch.Tensor, rows: int) -> torch.Tensor:
    """A scale or zero point as ``(rows, groups)``: one per tensor is broadcast to every row."""
    return param.float().reshape(-1, param.shape[-1] if param.ndim == 2 else 1).expand(rows, -1)


def _current_group(w, block, errors, u, start, i, group_size) -> torch.Tensor:
    """The group starting at column ``start + i`` as the rounding so far has updated it:
    columns inside the block carry every update; those past it still owe the updates of
    this block's columns already rounded (applied lazily at the block's end)."""
    end = start + block.shape[1]
    column = start + i
    inside = block[:, i : i + group_size]
    beyond = min(column + group_size, w.shape[1])
    if beyond <= end:
        return inside
    pending = w[:, end:beyond] - errors[:, :i] @ u[start : start + i, end:beyond]
    return torch.cat([inside, pending], dim=1)
