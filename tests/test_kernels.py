"""Every kernel agrees with the float32 reference within the activation dtype's precision,
and the dispatch never sends a call to a kernel known to crash."""

import pytest
import torch

from quantcli import QuantConfig, QuantLinear
from quantcli.nn.kernels import KERNELS, PREFILL_MIN_M, select_kernel
from quantcli.tensor.quantize import dequantize


def layer(config, in_features=96, out_features=48, bias=True):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)
    return QuantLinear.from_linear(linear, config)


def reference(layer, x):
    """The same quantized weight in float32: what every kernel approximates."""
    bias = None if layer.bias is None else layer.bias.float()
    return torch.nn.functional.linear(x.float(), layer.dequantize_weight(torch.float32), bias)


def assert_agrees(out, layer, x):
    """Within bf16/fp16 rounding of the inputs, products and output (a few ulps of the sum).

    Each weight is ``s*q - s*z``; a kernel may round both terms (int4pack stores ``-s*z``
    in bf16), so the bound counts ``|s*q| + |s*z|`` per weight.
    """
    exact = reference(layer, x)
    magnitude = x.float().abs() @ weight_terms(layer).T
    if layer.bias is not None:
        magnitude = magnitude + layer.bias.float().abs()
    eps = torch.finfo(x.dtype).eps
    assert out.dtype == x.dtype and out.shape == exact.shape
    assert ((out.float() - exact).abs() <= 4 * eps * magnitude + 1e-6).all()


def weight_terms(layer):
    """``|s*q| + |s*z|`` per weight: the size of what a kernel adds up for one weight."""
    weight = layer.dequantize_weight(torch.float32)
    _, zero = layer.integers()
    if zero is None:
        return weight.abs()
    offset = dequantize(torch.zeros_like(weight, dtype=torch.int8), layer.weight_scale, zero)
    return (weight - offset.float()).abs() + offset.float().abs()  # offset = -s*z


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
        (QuantConfig(bits=8), torch.float32, 64, "fp32-dequant"),
        (QuantConfig(bits=8), torch.float32, 1, "fp32-dequant"),
        (QuantConfig(bits=4), torch.bfloat16, 1, "int4pack"),
        (QuantConfig(bits=4), torch.bfloat16, PREFILL_MIN_M - 1, "int4pack"),
        (QuantConfig(bits=4, scheme="sym", group_size=32), torch.bfloat16, 3, "int4pack"),
        (QuantConfig(bits=4, group_size=16), torch.bfloat16, 3, "dequant"),
        (QuantConfig(bits=4, granularity="channel"), torch.bfloat16, 3, "dequant"),
        (QuantConfig(bits=4), torch.float16, 3, "dequant"),
        (QuantConfig(bits=4), torch.bfloat16, 128, "fp32-dequant"),
        (QuantConfig(bits=2, group_size=16), torch.bfloat16, 5, "dequant"),
    ],
)
def test_dispatch_and_agreement(config, dtype, rows, expected):
    q = layer(config)
    x = torch.randn(rows, q.in_features).to(dtype)
    assert select_kernel(q, x) == expected
    assert_agrees(q(x), q, x)


#: A layer each kernel accepts.
KERNEL_CONFIGS = {
    "dequant": QuantConfig(bits=2, group_size=16),
    "fp32-dequant": QuantConfig(bits=8, scheme="asym"),
    "int8pack": QuantConfig(bits=8),
    "int4pack": QuantConfig(bits=4, group_size=32),
}


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 5)], ids=str)
def test_every_kernel_agrees_on_3d_inputs(name, shape):
    q = layer(KERNEL_CONFIGS[name])
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


def test_int4pack_is_never_chosen_for_shapes_it_refuses():
    """The CPU int4 kernel wants the output size divisible by 16 (it raises otherwise)."""
    q = layer(QuantConfig(bits=4), out_features=40)
    x = torch.randn(2, q.in_features).bfloat16()
    assert select_kernel(q, x) == "dequant"
    assert_agrees(q(x), q, x)


def test_int4pack_layout_is_cached_and_renewed_when_the_weight_changes():
    q = layer(QuantConfig(bits=4))
    x = torch.randn(1, q.in_features).bfloat16()
    first = q(x)
    assert q(x).equal(first)  # second call: the cached layout
    torch.manual_seed(1)
    other = QuantLinear.from_weight(torch.randn(48, 96), None, QuantConfig(bits=4))
    q.load_state_dict(other.state_dict() | {"bias": q.bias}, assign=True)
    assert_agrees(q(x), q, x)
    assert not q(x).equal(first)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("config", "rows", "expected"),
    [
        (QuantConfig(bits=8), 1, "dequant"),
        (QuantConfig(bits=8), 64, "dequant"),
        (QuantConfig(bits=4, group_size=32), 1, "int4pack"),
        (QuantConfig(bits=4, group_size=128, scheme="sym"), 8, "int4pack"),
        (QuantConfig(bits=4, group_size=64), 128, "int4pack"),
        (QuantConfig(bits=4, group_size=64), 256, "dequant"),
        (QuantConfig(bits=2, group_size=16), 1, "dequant"),
    ],
)
def test_cuda_dispatch_and_agreement(config, rows, expected):
    q = layer(config, in_features=256, out_features=64).cuda()
    x = torch.randn(rows, q.in_features, device="cuda").bfloat16()
    assert select_kernel(q, x) == expected
    out = q(x)
    assert out.device.type == "cuda"
    assert_agrees(out.cpu(), q.cpu(), x.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["int8pack", "int4pack"])
def test_cuda_fused_kernels_agree_where_they_are_not_chosen(name):
    q = layer(KERNEL_CONFIGS[name], in_features=256, out_features=64).cuda()
    x = torch.randn(3, q.in_features, device="cuda").bfloat16()
    out = KERNELS[name](q, x)
    assert_agrees(out.cpu(), q.cpu(), x.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantizing_on_the_gpu_keeps_every_tensor_there():
    weight = torch.randn(64, 256, device="cuda")
    for config in (QuantConfig(bits=8), QuantConfig(bits=4), QuantConfig(bits=2, group_size=16)):
        q = QuantLinear.from_weight(weight, None, config)
        assert {t.device.type for t in q.state_dict().values()} == {"cuda"}
        cpu = QuantLinear.from_weight(weight.cpu(), None, config)
        for key, expected in cpu.state_dict().items():
            got = q.state_dict()[key].cpu()
            if expected.is_floating_point():  # CUDA divides by a reciprocal: an ulp apart
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
            else:  # the integers are the same
                assert got.equal(expected), key
