"""Matmul kernels for `QuantLinear`, and the rule that picks one for each call.

Measured on a 2-core AVX2 EPYC without bf16 hardware and a 2-core Xeon with AMX (see
docs/benchmarks.md):

- ``int8pack``: PyTorch's fused W8A16 kernel (`torch._weight_int8pack_mm`) reads the int8
  weight directly; with bf16 activations it is 2.5-13x faster than dequantizing at decode
  sizes on CPU (on CUDA it is no faster than dequantizing, so it is not used there).
  It needs per-channel (or per-tensor) symmetric int8, and on CPU it crashes the process
  for M >= 2 when K % 8 != 0, so that case never reaches it.
- ``int8-native``: quantcli's own W8A16 kernel for CPUs with AVX2 (`quantcli.nn.native`,
  compiled on first use): reads the int8 weight at the memory's rate where int8pack reaches
  about 60% of it, 1.0-1.9x int8pack's speed from 1 to 40 rows (2.4-2.8x bf16 at one row,
  measured on the AMX Xeon). It replaces int8pack on CPU, for float32 activations too,
  wherever it could be built.
- ``int4pack``: PyTorch's fused W4A16 kernels (tinygemm on CUDA, its CPU port otherwise)
  read 4-bit groups of 32..256 with bf16 activations. They want their own weight layout,
  made once per layer and device and cached (`int4pack_weight`).
- ``fp32-dequant`` and ``bf16-dequant``: on CPU, for everything the fused kernels don't
  take and from `decode_rows` tokens (prefill, where their cost grows with the rows while
  dequantizing costs the same), the weight dequantized in cache-sized tiles and multiplied
  in float32, or in bf16 on CPUs with bf16 matmul hardware (`bf16_matmul_hardware`: 6x
  faster than float32 at 512 rows there, several times slower elsewhere).
- ``dequant``: the reference, and what other devices run outside the fused kernels:
  dequantize the whole weight to the activation dtype and `F.linear`.

A layer decides once per device, activation dtype and size class (decode: fewer rows than
`decode_rows` says; prefill: the rest) which kernel runs, and prepares once what that
kernel takes (`prepared`: scales and bias in the activation dtype, int4pack's layout), so
a decode call is the kernel and a few tensor views (`plan`; `QuantLinear.forward`).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from functools import cache, partial

import torch
import torch.nn.functional as F

from quantcli.config import Granularity
from quantcli.nn import native

#: On CPU, from this many rows of activations (tokens) a dequantized float32 matmul beats the
#: fused kernels (measured on the AVX2 EPYC).
PREFILL_MIN_M = 32
#: The same, against bf16 tiles on CPUs with bf16 matmul hardware, per fused kernel: where
#: the fused kernel's time (which grows with the rows) passes the tiles' (measured on the
#: AMX Xeon, one core: int8pack 0.9x at 32 rows and 1.25x at 48, int4pack 0.68x at 64 and
#: 1.0x at 96, the same on 576- to 5632-wide layers).
BF16_HARDWARE_PREFILL_MIN_M = {"int8pack": 40, "int4pack": 96}
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


def decode_rows(layer, device: str) -> int:
    """The rows from which a call of `layer` on a `device` ("cpu", "cuda") is prefill-sized:
    the only threshold `choose_kernel` compares rows with (0 where every call is one class)."""
    if device == "cuda":
        return CUDA_INT4PACK_MAX_M
    if device != "cpu":
        return 0
    if bf16_matmul_hardware():
        return BF16_HARDWARE_PREFILL_MIN_M.get(fused_kernel(layer.config), PREFILL_MIN_M)
    return PREFILL_MIN_M


def _choose_on_cpu(layer, dtype: torch.dtype, rows: int) -> str:
    prefill = rows >= decode_rows(layer, "cpu")
    kernel = fused_kernel(layer.config)
    if kernel == "int8pack" and not prefill and dtype in _NATIVE_DTYPES and native_int8():
        return "int8-native"
    if dtype == torch.bfloat16 and not prefill:
        if kernel == "int8pack" and _int8pack_fits(layer):
            return kernel
        if kernel == "int4pack" and _int4pack_fits_cpu(layer):
            return kernel
    if dtype == torch.bfloat16 and prefill and bf16_matmul_hardware():
        return "bf16-dequant"
    return "fp32-dequant"


#: Activation dtypes `native.int8_gemv` takes.
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_int8() -> bool:
    """Whether quantcli's int8 kernel runs here (built, and the CPU has AVX2)."""
    return bool(native.int8_gemv_isa())


@cache
def bf16_matmul_hardware() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16): there a
    512-row bf16 matmul is 6x float32's (Xeon with AMX), elsewhere several times slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


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
    decode steps or bf16 matmuls have hardware (`bf16_matmul_hardware`), else fp32, because
    bf16 arithmetic is slow on CPUs without bf16 units.
    """
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast = fused_kernel(config) or bf16_matmul_hardware()
    return torch.bfloat16 if fast else torch.float32


def kernel_plan(model: torch.nn.Module, device: str, dtype: torch.dtype, rows: int) -> Counter:
    """How many quantized layers of `model` each kernel serves for `rows` tokens."""
    return Counter(choose_kernel(layer, device, dtype, rows) for layer in _quantized_layers(model))


def prepare_kernels(model: torch.nn.Module, device: str, dtype: torch.dtype) -> None:
    """Choose now every layer's kernels and make what they take (int4pack's layouts), once.

    Done at load time so that the first token does not pay for it, and so that a compiled
    decode step finds them ready instead of retracing around the cache.
    """
    for layer in _quantized_layers(model):
        plan(layer, _device(layer, device), dtype)


def _device(layer, device_type: str) -> torch.device:
    """The device the layer's tensors are on (with its index), if of `device_type`."""
    held = layer.weight_scale.device
    return held if held.type == device_type else torch.device(device_type)


def plan(layer, device: torch.device, dtype: torch.dtype) -> tuple:
    """``(limit, decode, prefill)`` for `layer` and `dtype` activations on `device`: calls
    with fewer than `limit` input elements (`decode_rows` rows) run ``decode``, the others
    ``prefill``, each a ``(function, operands)`` pair from `prepared`. Made once per layer,
    device and dtype, and kept in the layer until its tensors change."""
    key = (device, dtype)
    found = layer._kernels.get(key)
    if found is None:
        rows = decode_rows(layer, device.type)
        decode = choose_kernel(layer, device.type, dtype, rows - 1) if rows else None
        prefill = choose_kernel(layer, device.type, dtype, rows)
        found = layer._kernels[key] = (
            rows * layer.in_features,
            prepared(layer, decode or prefill, device, dtype),
            prepared(layer, prefill, device, dtype),
        )
    return found


def prepared(layer, name: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """Kernel `name`'s function and the operands it takes after ``(layer, x)``, made for
    `dtype` activations on `device` once and kept in the layer."""
    key = (name, device, dtype)
    found = layer._kernels.get(key)
    if found is None:
        run, prepare = _KERNELS[name]
        found = layer._kernels[key] = (run, prepare(layer, dtype))
    return found


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


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _finish(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The kernel's ``(rows, out)`` result shaped like `x`, plus the bias (in place: the
    result is the kernel's own fresh tensor)."""
    out = out.view(*x.shape[:-1], -1)  # a third of the time of joining the two shapes
    return out if bias is None else out.add_(bias)


def _nothing(layer, dtype: torch.dtype) -> tuple:
    """The dequantizing kernels take nothing prepared: they dequantize the whole weight per
    call anyway (nothing smaller can be kept), and the bias's conversion is negligible
    beside that."""
    return ()


def dequant(layer, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dequantize_weight(x.dtype), _bias(layer, x.dtype))


def fp32_dequant(layer, x: torch.Tensor) -> torch.Tensor:
    return _tiled_dequant(layer, x, torch.float32)


def bf16_dequant(layer, x: torch.Tensor) -> torch.Tensor:
    return _tiled_dequant(layer, x, torch.bfloat16)


#: Weight elements per tile of `_tiled_dequant`: 1 MiB in float32, so that a tile's passes
#: (unpack, convert, scale, matmul) stay in a core's L2 cache.
TILE_ELEMENTS = 2**18


def _tiled_dequant(layer, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x @ W.T + b`` computed in `dtype`, the weight dequantized a tile of output rows at a
    time into a reused float32 buffer (rounded to `dtype` when narrower) and multiplied at
    once.

    Dequantizing the whole weight first streams it through memory once per step (unpack,
    convert, subtract, scale): 28 ms for a 5632x2048 int4 layer on one Xeon core, where the
    same work in 1 MiB tiles takes 11-16 ms (a 512-row bf16 matmul: 11 ms); tiles also keep
    the buffer small whatever the layer's size. The arithmetic is float32's (bf16's is slower
    on CPUs and, for 2-bit groups, 2.5x slower), then one rounding.
    """
    rows = _rows(x).to(dtype)
    tile_rows = min(max(1, TILE_ELEMENTS // layer.in_features), layer.out_features)
    # under autograd (a forward outside no_grad) each tile is kept for the backward: fresh
    # tiles, joined at the end; otherwise reused buffers and the output written in place
    graph = torch.is_grad_enabled() and rows.requires_grad
    tile = None if graph else _workspace(x.device, torch.float32, tile_rows, layer.in_features)
    narrow = None if graph or dtype == torch.float32 else _workspace(x.device, dtype, *tile.shape)
    out = torch.empty(rows.shape[0], layer.out_features, dtype=dtype, device=x.device)
    pieces = []
    for start in range(0, layer.out_features, tile_rows):
        stop = min(start + tile_rows, layer.out_features)
        size = stop - start
        weight = layer.dequantize_weight(
            torch.float32, None if graph else tile[:size], slice(start, stop)
        )
        weight = weight.to(dtype) if narrow is None else narrow[:size].copy_(weight)
        if graph:
            pieces.append(rows @ weight.t())
        else:
            torch.mm(rows, weight.t(), out=out[:, start:stop])
    out = torch.cat(pieces, dim=1) if graph else out
    return _finish(out, x, _bias(layer, dtype)).to(x.dtype)  # one rounding, bias included


_workspaces = threading.local()


def _workspace(device: torch.device, dtype: torch.dtype, rows: int, columns: int) -> torch.Tensor:
    """A reused ``(rows, columns)`` buffer of `dtype` on `device`, per thread: one per device
    and dtype, grown to the largest asked for (a fresh one per call would cost page faults)."""
    buffers = _workspaces.__dict__.setdefault("buffers", {})
    size = rows * columns
    buffer = buffers.get((device, dtype))
    if buffer is None or buffer.numel() < size:
        buffers[device, dtype] = buffer = torch.empty(size, dtype=dtype, device=device)
    return buffer[:size].view(rows, columns)


def _int8pack_operands(layer, dtype: torch.dtype) -> tuple:
    """The int8 weight, one scale per output row in the activation dtype (what the kernel
    takes), the bias."""
    scales = layer.weight_scale.to(dtype).reshape(-1).expand(layer.out_features)
    return layer.weight, scales.contiguous(), _bias(layer, dtype)


def _int8pack(layer, x: torch.Tensor, weight, scales, bias) -> torch.Tensor:
    return _finish(torch._weight_int8pack_mm(_rows(x), weight, scales), x, bias)


def _native_int8_operands(layer, dtype: torch.dtype) -> tuple:
    """The int8 weight, one float32 scale per output row, the bias."""
    scales = layer.weight_scale.float().reshape(-1).expand(layer.out_features)
    return layer.weight, scales.contiguous(), _bias(layer, dtype)


def _native_int8(layer, x: torch.Tensor, weight, scales, bias) -> torch.Tensor:
    return _finish(native.int8_gemv(_rows(x), weight, scales), x, bias)


def _int4pack_operands(layer, dtype: torch.dtype) -> tuple:
    """The matmul of the layer's device, its layout and scales (`int4pack_weight`), the bias."""
    on_cpu = layer.weight_packed.device.type == "cpu"
    matmul = torch._weight_int4pack_mm_for_cpu if on_cpu else torch._weight_int4pack_mm
    packed, scales_and_zeros = int4pack_weight(layer)
    return matmul, packed, layer.config.group_size, scales_and_zeros, _bias(layer, dtype)


def _int4pack(layer, x, matmul, packed, group_size, scales_and_zeros, bias) -> torch.Tensor:
    return _finish(matmul(_rows(x), packed, group_size, scales_and_zeros), x, bias)


def int4pack_weight(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's weight in the int4 kernel's layout, made on first use and cached.

    The kernels compute ``w = (u - 8) * scale + zero`` with unsigned nibbles ``u``; ours is
    ``w = s * (q - z)`` with signed ``q``, so ``u = q + 8``, ``scale = s``, ``zero = -s * z``.
    The cache is tied to the `weight_packed` tensor and dropped by the layer whenever its
    tensors change (`QuantLinear.forget_kernels`), so loading or moving the layer renews it.
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


#: Each kernel's function ``(layer, x, *operands)`` and what makes its operands once.
_KERNELS: dict[str, tuple[Callable, Callable]] = {
    "dequant": (dequant, _nothing),
    "fp32-dequant": (fp32_dequant, _nothing),
    "bf16-dequant": (bf16_dequant, _nothing),
    "int8pack": (_int8pack, _int8pack_operands),
    "int8-native": (_native_int8, _native_int8_operands),
    "int4pack": (_int4pack, _int4pack_operands),
}


def _call(name: str, layer, x: torch.Tensor) -> torch.Tensor:
    run, operands = prepared(layer, name, x.device, x.dtype)
    return run(layer, x, *operands)


#: Every kernel by name, as ``kernel(layer, x)`` (whether or not the dispatch would pick it).
KERNELS: dict[str, Callable] = {name: partial(_call, name) for name in _KERNELS}
