"""`QuantEmbedding` and `QuantTiedHead` as modules, against references that are not quantcli's.

The reference table is compressed-tensors' unpacking and dequantization of the tensors the
table saves (`ct_dequantized`), served by torch's own float ``nn.Embedding`` (lookup) and
``nn.Linear`` (head). The lookup computes ``scale * (q - zero)`` once per element, as the
reference does: in float32 both are exact products of integers below 2**9 and scales (24-bit
mantissas hold 8 + 9 bits), and in bfloat16 the one rounding of that exact product is the
same on both sides; so the rows are compared bit for bit, and any wrong code, scale or zero
point (a 2x coarser step, a 1% scale, a neighbour's row or group) shows.

End-to-end checks of the shared table in a model live in test_tied_heads.py.
"""

from __future__ import annotations

import pytest
import torch
from ct_reference import ct_dequantized
from torch import nn

from quantcli import QuantConfig
from quantcli.nn.qembedding import QuantEmbedding, QuantTiedHead

VOCAB = 100  # not a multiple of a word's 4 (int8), 8 (int4) or 16 (int2) rows
#: name: (config, embedding_dim). 60 columns are not whole int32 words at 4 or 2 bits, so the
#: last word of each row is padding the unpacking must cut off.
SCHEMES = {
    "int8-sym-channel": (QuantConfig(bits=8), 60),
    "int8-asym-channel": (QuantConfig(bits=8, scheme="asym"), 60),  # int8 zero points, unpacked
    "int8-asym-g16": (QuantConfig(bits=8, scheme="asym", group_size=16), 64),
    "int4-asym-g32": (QuantConfig(bits=4), 64),
    "int4-sym-g32-bf16": (QuantConfig(bits=4, scheme="sym", dtype=torch.bfloat16), 64),
    "int4-asym-tensor": (QuantConfig(bits=4, granularity="tensor"), 60),
    "int2-asym-channel": (QuantConfig(bits=2, granularity="channel"), 60),
}
IDS = torch.tensor([[0, VOCAB - 1, 5, 5], [42, 1, VOCAB - 2, 17]])  # ends, repeats, a batch


def float_table(dim: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(VOCAB, dim, generator=generator)


def reference_table(table: QuantEmbedding, config: QuantConfig) -> torch.Tensor:
    """compressed-tensors' dequantization of what the table saves, in the scales' dtype."""
    files = table.state_dict(prefix="t.")
    shape = (table.num_embeddings, table.embedding_dim)
    return ct_dequantized(files, "t", config.bits, shape).to(files["t.weight_scale"].dtype)


@pytest.mark.parametrize("ids", [IDS, torch.tensor([[VOCAB - 3]])], ids=["batch", "one token"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_lookup_returns_compressed_tensors_rows_bit_for_bit(scheme, ids):
    """A batch, and the one-token lookup of every decode step (its one word row of zero
    points once crashed the unpacking)."""
    config, dim = SCHEMES[scheme]
    table = QuantEmbedding.from_weight(float_table(dim), None, config)
    reference = nn.Embedding.from_pretrained(reference_table(table, config))
    got = table(ids)
    assert got.shape == (*ids.shape, dim) and got.dtype == (config.dtype or torch.float32)
    assert torch.equal(got, reference(ids))
    # and the table is quantized: the float table's rows are not what comes back
    assert not torch.equal(got.float(), float_table(dim)[ids])


@pytest.mark.parametrize("scheme", ["int8-asym-channel", "int4-asym-g32"])
def test_the_tied_head_is_the_float_head_on_the_same_table(scheme):
    """``x @ table.T`` by torch's nn.Linear with the reference table. Error analysis: float32,
    ``dim`` = 60 or 64 products per logit with inputs and table entries below ~4 in magnitude:
    each summation order differs by at most ``dim * eps32 * sum|x||w|`` ~ 64 * 6e-8 * 64 * 16
    = 4e-3 in the worst case, ~1e-5 in practice (errors of random sign); 1e-4 of the largest
    logit (~30) is 3e-3. A 1% scale error moves the logits by ~0.3 and a coarser step by more."""
    config, dim = SCHEMES[scheme]
    table = QuantEmbedding.from_weight(float_table(dim), None, config)
    head = QuantTiedHead(table)
    reference = nn.Linear(dim, VOCAB, bias=False)
    reference.weight.data = reference_table(table, config)
    x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference(x), head(x)
    assert got.shape == (3, 5, VOCAB)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_table_and_head_describe_themselves_as_the_float_modules_do():
    """The sizes are torch's nn.Embedding's and nn.Linear's attributes, which model code reads."""
    config = QuantConfig(bits=4)
    embedding, linear = nn.Embedding(VOCAB, 64), nn.Linear(64, VOCAB, bias=False)
    table = QuantEmbedding.from_weight(embedding.weight, None, config)
    head = QuantTiedHead(table)
    assert (table.num_embeddings, table.embedding_dim) == (
        embedding.num_embeddings,
        embedding.embedding_dim,
    )
    assert (head.in_features, head.out_features) == (linear.in_features, linear.out_features)
    assert repr(table) == "QuantEmbedding(100, 64, int4 asym g32)"
    assert repr(head) == "QuantTiedHead(tied to the quantized embeddings (100 x 64))"
    # the table is held once, under the embeddings: the head owns no tensors
    assert head.table is table and not list(head.state_dict())


def test_a_table_on_meta_is_only_shaped_in_the_weights_dtype():
    """On meta (the skeleton a checkpoint is loaded into) the table holds no memory, and its
    scales take the weight's dtype when the config names none."""
    weight = torch.empty(VOCAB, 64, dtype=torch.bfloat16, device="meta")
    table = QuantEmbedding.from_weight(weight, None, QuantConfig(bits=4))
    buffers = dict(table.named_buffers())
    assert sorted(buffers) == [
        "weight_packed",
        "weight_scale",
        "weight_shape",
        "weight_zero_point",
    ]
    assert all(buffer.is_meta for buffer in buffers.values())
    assert buffers["weight_scale"].dtype == torch.bfloat16
    assert buffers["weight_scale"].shape == (VOCAB, 2)  # 64 columns in groups of 32
    assert buffers["weight_packed"].shape == (VOCAB, 8)  # 64 4-bit values in 8 words


def test_an_embedding_table_with_a_bias_is_refused():
    weight = torch.randn(VOCAB, 64)
    with pytest.raises(ValueError) as error:
        QuantEmbedding.from_weight(weight, torch.zeros(VOCAB), QuantConfig(bits=8))
    assert str(error.value) == "an embedding table has no bias"
