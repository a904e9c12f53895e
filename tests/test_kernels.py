"""Every kernel agrees with the float32 reference within the activation dtype's precision,
and the dispatch never sends a call to a kernel known to crash."""

import pytest
import torch

from quantcli import QuantConfig, QuantLinear
from quantcli.nn.kernels import KERNELS, PREFILL_MIN_M, select_kernel


def layer(config, in_features=96, out_features=48, bias=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    return QuantLinear.from_linear(linear, config)


def reference(layer, x):
    """The same quantized weight in float32: what every kernel approximates."""
    bias = None if layer.bias is None else layer.bias.float()
    return torch.nn.functional.linear(x.float(), layer.dequantize_weight(torch.float32), bias)


def assert_agrees(out, layer, x):
    """Within bf16/fp16 rounding of the inputs, products and output (a few ulps of the sum)."""
    exact = reference(layer, x)
    magnitude = x.float().abs() @ layer.dequantize_weight(torch.float32).abs().T
    if layer.bias is not None:
        magnitude = magnitude + layer.bias.float().abs()
    eps = torch.finfo(x.dtype).eps
    assert out.dtype == x.dtype and out.shape == exact.shape
    assert ((out.float() - exact).abs() <= 4 * eps * magnitude + 1e-6).all()


@pytest.mark.parametrize(
    ("config", "dtype", "rows", "expected"),
    [
        (QuantConfig(bits=8), torch.bfloat16, 1, "int8pack"),
        (QuantConfig(bits=8), torch.bfloat16, PREFILL_MIN_M - 1, "int8pack"),
        (QuantConfig(bits=8), torch.bfloat16, PREFILL_MIN_M, "fp32-dequant"),
        (QuantConfig(bits=8, granularity="tensor"), torch.bfloat16, 3, "int8pack"),
        (QuantConfig(bits=8, scheme="asym"), torch.bfloat16, 3, "dequant"),
        (QuantConfig(bits=8), torch.float16, 3, "dequant"),
        (QuantConfig(bits=8), torch.float16, 64, "fp32-dequant"),
        (QuantConfig(bits=8), torch.float32, 64, "dequant"),
        (QuantConfig(bits=4), torch.bfloat16, 1, "dequant"),
        (QuantConfig(bits=4), torch.bfloat16, 128, "fp32-dequant"),
        (QuantConfig(bits=2, group_size=16), torch.bfloat16, 5, "dequant"),
    ],
)
def test_dispatch_and_agreement(config, dtype, rows, expected):
    q = layer(config)
    x = torch.randn(rows, q.in_features).to(dtype)
    assert select_kernel(q, x) == expected
    assert_agrees(q(x), q, x)


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 5)], ids=str)
def test_every_kernel_agrees_on_3d_inputs(name, shape):
    q = layer(QuantConfig(bits=8))
    x = torch.randn(*shape, q.in_features).bfloat16()
    assert_agrees(KERNELS[name](q, x), q, x)


def test_int8pack_is_never_chosen_where_it_would_crash():
    """_weight_int8pack_mm kills the process for bf16, M >= 2 and K % 8 != 0."""
    q = layer(QuantConfig(bits=8), in_features=100)
    for rows in (1, 2, 5, PREFILL_MIN_M - 1):
        x = torch.randn(rows, 100).bfloat16()
        assert select_kernel(q, x) != "int8pack"
        assert_agrees(q(x), q, x)


def test_layer_without_bias_and_bf16_scales():
    q = layer(QuantConfig(bits=8, dtype=torch.bfloat16), bias=False)
    x = torch.randn(2, q.in_features).bfloat16()
    assert select_kernel(q, x) == "int8pack"
    assert_agrees(q(x), q, x)
