"""Bit-exact packing, and agreement with compressed-tensors' int32 layout."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcli.errors import UsageError
from quantcli.tensor import pack, pack_int32, packing, unpack, unpack_int32
from quantcli.tensor.packing import packed_length


def signed(codes, bits):
    return torch.tensor(codes, dtype=torch.int16).sub(2 ** (bits - 1)).to(torch.int8)


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (2, [1, 0, 3, 2], [0b10_11_00_01]),  # = 177, the notes' example
        (2, [3, 3, 3, 3, 1], [255, 1]),  # a partial last byte is padded with zero bits
        (4, [0x1, 0x2, 0xF, 0x0], [0x21, 0x0F]),
        (4, [7], [7]),
        (1, [1, 0, 1, 1, 0, 0, 0, 1, 1], [0b1000_1101, 1]),
        (8, [0, 255, 128, 1], [0, 255, 128, 1]),  # 8-bit: the code q + 128 is the byte
    ],
)
def test_pack_matches_hand_computed_bytes(bits, codes, expected):
    values = signed(codes, bits)
    packed = pack(values, bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert torch.equal(unpack(packed, bits, len(codes)), values)


@settings(max_examples=200, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 4, 8]),
    rows=st.integers(0, 5),
    length=st.integers(1, 70),
    seed=st.integers(0, 2**16),
)
def test_unpack_inverts_pack(bits, rows, length, seed):
    generator = torch.Generator().manual_seed(seed)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    values = torch.randint(low, high, (rows, length), generator=generator, dtype=torch.int8)
    packed = pack(values, bits)
    assert packed.shape == (rows, -(-length * bits // 8))
    assert torch.equal(unpack(packed, bits, length), values)


@settings(max_examples=100, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 9),
    length=st.integers(1, 80),
    dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**16),
)
def test_int32_words_are_compressed_tensors_layout(bits, rows, length, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1)
    values = torch.randint(low, high, (rows, length), generator=generator, dtype=torch.int8)
    words = pack_int32(values, bits, dim=dim)
    assert words.dtype == torch.int32
    assert torch.equal(words, pack_to_int32(values, bits, packed_dim=dim))
    packed_size = packed_length(values.shape[dim], bits)
    assert words.shape[dim] == packed_size and words.shape[1 - dim] == values.shape[1 - dim]
    assert torch.equal(unpack_int32(words, bits, values.shape[dim], dim=dim), values)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_one_row_of_words_unpacks_along_the_rows_whatever_its_strides(bits):
    """Zero points packed along the rows, one word row read alone (a one-token embedding
    lookup, a tile of a layer's rows): its (1, n) slice has plain strides, which the
    transposed (n, 1) view keeps, and a byte view refused them (a crash at decode)."""
    values = torch.tensor([[-1, 0], [1, -2]], dtype=torch.int8)
    words = pack_int32(values, bits, dim=0)
    one_row = torch.empty(1, 2, dtype=torch.int32).copy_(words[:1])  # as indexing gives
    assert one_row.stride() == (2, 1)
    assert torch.equal(unpack_int32(one_row, bits, 2, dim=0), values)


def test_int32_word_holds_first_value_in_lowest_bits():
    values = signed(list(range(16)) * 2, 4).reshape(1, 32)
    words = pack_int32(values, 4)
    assert words.tolist() == [[0x76543210, 0xFEDCBA98 - 2**32, 0x76543210, 0xFEDCBA98 - 2**32]]


def test_int8_word_holds_four_codes_offset_by_128():
    """compressed-tensors packs weight-only int8 as q + 128, four a word, first lowest:
    [-128, -1, 0, 127] are the codes [0x00, 0x7F, 0x80, 0xFF]."""
    values = torch.tensor([[-128, -1, 0, 127, 5]], dtype=torch.int8)
    words = pack_int32(values, 8)
    assert words.tolist() == [[0xFF807F00 - 2**32, 0x85]]
    assert torch.equal(unpack_from_int32(words, 8, values.shape), values)
    assert torch.equal(unpack_int32(words, 8, 5), values)


def test_values_outside_the_range_are_refused():
    with pytest.raises(UsageError, match="signed 4-bit range"):
        pack(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(UsageError, match="signed 8-bit range"):
        pack(torch.tensor([128], dtype=torch.int16), 8)


def test_unpackable_bit_width_is_refused():
    with pytest.raises(UsageError, match="1, 2, 4 and 8 bits"):
        pack(torch.zeros(8, dtype=torch.int8), 3)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64], ids=str)
def test_wider_integer_inputs_pack_like_int8(dtype):
    values = signed([1, 0, 3, 2, 2, 1], 2)
    assert torch.equal(pack(values.to(dtype), 2), pack(values, 2))


def test_big_endian_hosts_are_refused_with_the_reason(monkeypatch):
    monkeypatch.setattr(packing.sys, "byteorder", "big")
    with pytest.raises(RuntimeError) as error:
        pack_int32(torch.zeros(1, 8, dtype=torch.int8), 4)
    assert str(error.value) == "quantcli needs a little-endian machine: its file formats are."
