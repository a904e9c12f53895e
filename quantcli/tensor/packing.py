"""Packing 8-, 4- and 2-bit integers into bytes, lowest bits first.

PyTorch has no int4 or int2 storage, so values share bytes. A signed value ``q`` is first
shifted to its unsigned code ``q - q_min``; the first code of a byte goes into its lowest
bits: 2-bit codes ``[1, 0, 3, 2]`` become ``0b10_11_00_01 = 177``. 8-bit values take a
byte each, as the code ``q + 128``.

Because bytes fill from the low bits, the same bytes read as little-endian int32 words are
compressed-tensors' ``pack-quantized`` layout (32 / bits values a word, the first in the
lowest bits; its writer packs weight-only int8 this way too); `pack_int32` /
`unpack_int32` give that view.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from quantcli.errors import UsageError

PACKABLE_BITS = (1, 2, 4, 8)


def pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed `bits`-bit integers into uint8 along the last dimension.

    The last dimension is padded with zero codes to a multiple of ``8 // bits``; pass its
    true length to `unpack` to get the values back.
    """
    per_byte = _values_per_byte(bits)
    offset = 2 ** (bits - 1)
    checkable = values.numel() and values.device.type != "meta"
    if checkable and (int(values.min()) < -offset or int(values.max()) >= offset):
        raise UsageError(f"values outside the signed {bits}-bit range cannot be packed.")
    if bits == 8:  # q + 128 overflows int8: flipping the sign bit is the same code
        codes = values.to(torch.int8).view(torch.uint8) ^ 0x80
        return codes.contiguous().flatten().view(values.shape)  # plain strides, for .view
    codes = (values.to(torch.int8) + offset).view(torch.uint8)  # in range: no overflow
    codes = F.pad(codes, (0, -codes.shape[-1] % per_byte)).unflatten(-1, (-1, per_byte))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=values.device)
    return (codes << shifts).sum(-1, dtype=torch.uint8)  # disjoint bits: sum is bitwise or


def unpack(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of `pack`: int8 values, the last dimension cut back to `length`."""
    _values_per_byte(bits)
    if bits == 8:
        values = (packed ^ 0x80).view(torch.int8)
        return values if values.shape[-1] == length else values[..., :length]
    mask = 2**bits - 1
    codes = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)
    values = codes.flatten(-2).view(torch.int8).sub_(2 ** (bits - 1))  # codes < 128
    return values if values.shape[-1] == length else values[..., :length]


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack a 2-D tensor into int32 words along `dim` (compressed-tensors layout).

    Weights are packed along the input dimension (``dim=1``): ``(out, ceil(in * bits / 32))``;
    asymmetric zero points along the output dimension (``dim=0``).
    """
    require_little_endian()
    rows = values.transpose(0, 1) if dim == 0 else values
    packed = pack(rows, bits)
    words = F.pad(packed, (0, -packed.shape[-1] % 4)).view(torch.int32)
    return words.transpose(0, 1).contiguous() if dim == 0 else words


def unpack_int32(words: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of `pack_int32`: int8 values with `length` entries along `dim`."""
    require_little_endian()
    rows = words.transpose(0, 1) if dim == 0 else words
    if rows.stride(-1) != 1:  # `contiguous` keeps a (n, 1) transpose's strides, `view` won't
        rows = rows.clone(memory_format=torch.contiguous_format)
    values = unpack(rows.contiguous().view(torch.uint8), bits, length)
    return values.transpose(0, 1).contiguous() if dim == 0 else values


def packed_length(length: int, bits: int) -> int:
    """How many int32 words hold `length` values of `bits` bits."""
    per_word = 32 // bits
    return -(-length // per_word)


def _values_per_byte(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise UsageError(f"cannot pack {bits}-bit values: packing supports 1, 2, 4 and 8 bits.")
    return 8 // bits


def require_little_endian() -> None:
    """Byte views (int32 words, safetensors data) match the file formats on little-endian hosts."""
    if sys.byteorder != "little":
        raise RuntimeError("quantcli needs a little-endian machine: its file formats are.")
