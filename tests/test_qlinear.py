"""QuantLinear: its compressed-tensors state_dict, its forward and its error bound."""

import pytest
import torch
import torch.nn.functional as F
from ct_reference import reference_step

from quantcli import QuantConfig, QuantLinear
from quantcli.tensor.quantize import dequantize, quantize

IN, OUT = 96, 40

CONFIGS = {
    "int8-sym-channel": QuantConfig(bits=8),
    "int8-asym-channel": QuantConfig(bits=8, scheme="asym"),
    "int8-sym-tensor": QuantConfig(bits=8, granularity="tensor"),
    "int4-asym-g32": QuantConfig(bits=4),
    "int4-sym-g32": QuantConfig(bits=4, scheme="sym"),
    "int4-asym-channel": QuantConfig(bits=4, granularity="channel"),
    "int4-asym-tensor": QuantConfig(bits=4, granularity="tensor"),
    "int2-asym-g16": QuantConfig(bits=2, group_size=16),
}

# (tensor name, dtype, shape) each layout must have, per compressed-tensors' pack-quantized
# writer (weight-only int of any width; 8-bit: four values a word)
EXPECTED_STATE = {
    "int8-sym-channel": [
        ("weight_packed", torch.int32, (OUT, IN * 8 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (OUT, 1)),
    ],
    "int8-asym-channel": [
        ("weight_packed", torch.int32, (OUT, IN * 8 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (OUT, 1)),
        ("weight_zero_point", torch.int32, (OUT * 8 // 32, 1)),
    ],
    "int8-sym-tensor": [
        ("weight_packed", torch.int32, (OUT, IN * 8 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (1,)),
    ],
    "int4-asym-g32": [
        ("weight_packed", torch.int32, (OUT, IN * 4 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (OUT, IN // 32)),
        ("weight_zero_point", torch.int32, (OUT * 4 // 32, IN // 32)),
    ],
    "int4-sym-g32": [
        ("weight_packed", torch.int32, (OUT, IN * 4 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (OUT, IN // 32)),
    ],
    "int4-asym-channel": [
        ("weight_packed", torch.int32, (OUT, IN * 4 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (OUT, 1)),
        ("weight_zero_point", torch.int32, (OUT * 4 // 32, 1)),
    ],
    "int4-asym-tensor": [
        ("weight_packed", torch.int32, (OUT, IN * 4 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (1,)),
        ("weight_zero_point", torch.int8, (1,)),
    ],
    "int2-asym-g16": [
        ("weight_packed", torch.int32, (OUT, IN * 2 // 32)),
        ("weight_shape", torch.int64, (2,)),
        ("weight_scale", None, (OUT, IN // 16)),
        ("weight_zero_point", torch.int32, (-(-OUT * 2 // 32), IN // 16)),
    ],
}


def float_linear(dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(IN, OUT, bias=bias).to(dtype)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_has_compressed_tensors_names_dtypes_and_shapes(name, dtype):
    layer = QuantLinear.from_linear(float_linear(dtype), CONFIGS[name])
    state = layer.state_dict()
    expected = EXPECTED_STATE[name] + [("bias", dtype, (OUT,))]
    assert list(state) == [key for key, _, _ in expected]
    for key, key_dtype, shape in expected:
        assert state[key].dtype == (key_dtype or dtype), key
        assert tuple(state[key].shape) == shape, key
    if "weight_shape" in state:
        assert state["weight_shape"].tolist() == [OUT, IN]
    assert list(layer.parameters()) == []  # inference only: buffers, no gradients


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_is_f_linear_with_the_dequantized_weight(name):
    linear = float_linear()
    config = CONFIGS[name]
    layer = QuantLinear.from_linear(linear, config)
    qt = quantize(
        linear.weight.detach(), config.bits, config.scheme, config.granularity, config.group_size
    )
    x = torch.randn(3, 5, IN)
    expected = F.linear(x, dequantize(qt.qdata, qt.scale, qt.zero_point), linear.bias)
    assert torch.equal(layer.dequantize_weight(torch.float32), qt.dequantize(torch.float32))
    assert torch.equal(layer(x), expected)


def group_elements(config):
    """How many weights share one scale in this layer's layout."""
    return {"tensor": OUT * IN, "channel": IN, "group": config.group_size}[config.granularity.value]


@pytest.mark.parametrize("name", CONFIGS)
def test_output_error_is_bounded_by_the_reference_steps_and_has_their_size(name):
    """Output error against compressed-tensors' steps s (never the stored scales).

    Worst case: |y_q - y| <= sum_k |x_k| * s_k / 2, with 0.1% for the float32 sums and
    the stored scale's float32 rounding. Expected size: nn.Linear's weights are uniform,
    so each weight's rounding error is uniform on +-s/2 (variance s^2/12; see
    test_tolerances), independent across weights, and E[(y_q - y)^2] = sum_k x_k^2 s_k^2/12.
    Two corrections bound the ratio measured/predicted: symmetric, each group's absmax
    lands on the grid (error 0), a factor 1 - 1/n for n weights a scale; asymmetric, a
    group's min and max sit at the zero point's rounding offset, between 0 and s^2/4 (3x
    the uniform value), i.e. a factor in [1 - 2/n, 1 + 4/n]. Noise: the ratio averages
    3840 weight errors (relative std 0.89/sqrt(3840) = 1.4%) seen through 512 inputs
    (adds ~0.3%); +-8% is 5.5 standard deviations. A 2x coarser step gives 4x.
    """
    linear = float_linear()
    config = CONFIGS[name]
    layer = QuantLinear.from_linear(linear, config)
    step = reference_step(
        linear.weight.detach(),
        config.bits,
        config.scheme.value,
        config.granularity.value,
        config.group_size,
    ).float()
    x = torch.randn(512, IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (layer(x) - linear(x)).abs()
    assert (error <= (x.abs() @ (step / 2).T) * 1.001 + 1e-6).all()

    ratio = float(error.double().square().mean() / ((x.square() @ (step.square() / 12).T).mean()))
    n = group_elements(config)
    low, high = (1 - 1 / n, 1 - 1 / n) if config.symmetric else (1 - 2 / n, 1 + 4 / n)
    assert low * (1 - 0.08) <= ratio <= high * (1 + 0.08), ratio


@pytest.mark.parametrize("name", ["int8-sym-channel", "int4-asym-g32"])
def test_runs_in_bf16_and_matches_fp32_within_bf16_precision(name):
    linear = float_linear()
    layer = QuantLinear.from_linear(linear, CONFIGS[name])
    x = torch.randn(4, IN)
    y32 = layer(x)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert torch.allclose(y16.float(), y32, rtol=2e-2, atol=2e-2 * float(y32.abs().max()))


@pytest.mark.parametrize("name", CONFIGS)
def test_meta_layer_loads_a_state_dict_by_assignment(name):
    real = QuantLinear.from_linear(float_linear(), CONFIGS[name])
    with torch.device("meta"):
        skeleton = QuantLinear.from_linear(torch.nn.Linear(IN, OUT), CONFIGS[name])
    assert all(buffer.is_meta for buffer in skeleton.buffers())
    skeleton.load_state_dict(real.state_dict(), assign=True)
    x = torch.randn(2, IN)
    assert torch.equal(skeleton(x), real(x))


def test_layer_without_bias():
    layer = QuantLinear.from_linear(float_linear(bias=False), QuantConfig(bits=4))
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert layer(torch.randn(2, IN)).shape == (2, OUT)


def test_scale_dtype_follows_the_config():
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(dtype=torch.bfloat16))
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, IN)).dtype == torch.float32


def test_repr_names_the_scheme():
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(bits=4, group_size=32))
    assert "bits=4, scheme=asym, granularity=group, group_size=32" in repr(layer)
