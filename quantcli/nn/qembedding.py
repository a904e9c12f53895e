"""A quantized embedding table, and the output head that shares it.

Small models tie their output head to the input embeddings, and that table is 20-30% of
their weights (SmolLM2-135M: 49152 x 576 of 135M parameters). `QuantEmbedding` stores it
in `QuantLinear`'s layout (``(vocab, hidden)`` integers, scales per row or per group of the
hidden dimension, the same tensors compressed-tensors and vLLM use for an embedding): a
lookup unpacks and dequantizes only the rows it reads, and `QuantTiedHead` runs the
quantized matmul on the same table, so one quantized copy serves both, as llama.cpp does.
"""

from __future__ import annotations

import torch
from torch import nn

from quantcli.nn.qlinear import QuantLinear


class QuantEmbedding(QuantLinear):
    """``nn.Embedding`` whose ``(num_embeddings, embedding_dim)`` table is quantized.

    As a `QuantLinear` it is ``(out=num_embeddings, in=embedding_dim)``: `forward` looks
    rows up; `QuantLinear.forward(table, x)` is the head's ``x @ table.T``.
    """

    def __init__(self, in_features, out_features, bias, config, dtype=torch.float32, device=None):
        """`QuantLinear`'s signature (so `from_weight` builds one): in = embedding_dim,
        out = num_embeddings; no bias."""
        if bias:
            raise ValueError("an embedding table has no bias")
        super().__init__(in_features, out_features, False, config, dtype, device)
        self.num_embeddings = out_features
        self.embedding_dim = in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        values = self.dequantize_weight(rows=ids.reshape(-1))  # in the scale's dtype
        return values.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.config.label}"


class QuantTiedHead(nn.Module):
    """An output head tied to a `QuantEmbedding`: ``x @ table.T`` with its kernels.

    The table is held outside the module tree, so the state dict and ``model.to`` see it
    once, under the embeddings' name (where the checkpoint stores it).
    """

    def __init__(self, table: QuantEmbedding) -> None:
        super().__init__()
        self.__dict__["table"] = table
        self.in_features = table.in_features
        self.out_features = table.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinear.forward(self.table, x)

    def extra_repr(self) -> str:
        return f"tied to the quantized embeddings ({self.out_features} x {self.in_features})"
