"""QuantLinear: its compressed-tensors state_dict, its forward and its error bound."""

import re

import pytest
import torch
import torch.nn.functional as F
from ct_reference import reference_step

from quantcli import QuantConfig, QuantLinear
from quantcli.errors import CheckpointError
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


def test_the_bare_constructor_shapes_every_buffer_on_the_device_asked():
    """What a checkpoint loader builds before the tensors arrive: on meta, no memory."""
    config = QuantConfig(bits=4, granularity="channel")
    layer = QuantLinear(IN, OUT, True, config, torch.bfloat16, device="meta")
    assert {name: (b.dtype, tuple(b.shape), b.is_meta) for name, b in layer.named_buffers()} == {
        "weight_packed": (torch.int32, (OUT, IN * 4 // 32), True),
        "weight_shape": (torch.int64, (2,), True),
        "weight_scale": (torch.bfloat16, (OUT, 1), True),
        "weight_zero_point": (torch.int32, (OUT * 4 // 32, 1), True),
        "bias": (torch.bfloat16, (OUT,), True),
    }
    plain = QuantLinear(IN, OUT, False, QuantConfig(bits=8, scheme="asym", granularity="tensor"))
    buffers = plain.named_buffers()
    assert {name: (b.dtype, tuple(b.shape), b.device.type) for name, b in buffers} == {
        "weight": (torch.int8, (OUT, IN), "cpu"),
        "weight_scale": (torch.float32, (1,), "cpu"),
        "weight_zero_point": (torch.int8, (1,), "cpu"),
    }
    assert plain.bias is None and "bias" in plain._buffers  # registered, as nn.Linear does
    assert plain.checkpoint_format == layer.checkpoint_format == "pack-quantized"


def test_from_weight_on_meta_only_shapes_the_layer():
    with torch.device("meta"):
        linear = torch.nn.Linear(IN, OUT).to(torch.float16)
    layer = QuantLinear.from_linear(linear, QuantConfig(bits=4))
    assert all(b.is_meta for b in layer.buffers())
    assert (layer.in_features, layer.out_features, layer.weight_scale.dtype) == (
        IN,
        OUT,
        torch.float16,
    )


def test_the_bias_is_copied_without_gradient_in_the_scale_dtype():
    linear = float_linear()
    layer = QuantLinear.from_linear(linear, QuantConfig(bits=8, dtype=torch.bfloat16))
    assert not layer.bias.requires_grad and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.bias, linear.bias.detach().bfloat16())
    assert not layer.weight_scale.requires_grad


def test_a_packed_layer_answers_weight_with_a_meta_tensor_of_its_shape():
    """Model code (T5's) reads ``.weight.dtype``; packed layers hold no such tensor."""
    packed = QuantLinear.from_linear(float_linear(torch.bfloat16), QuantConfig(bits=4))
    weight = packed.weight
    assert weight.is_meta and weight.shape == (OUT, IN) and weight.dtype == torch.bfloat16
    assert "weight" not in packed.state_dict()
    int8 = QuantLinear.from_linear(float_linear(), QuantConfig(bits=8))
    assert int8.weight.dtype == torch.int8 and not int8.weight.is_meta
    with pytest.raises(AttributeError, match="'QuantLinear' object has no attribute 'other'"):
        packed.other  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'weight_packed'"):
        int8.weight_packed  # noqa: B018


@pytest.mark.parametrize(
    ("config", "bias", "expected"),
    [
        (
            QuantConfig(bits=4, group_size=32),
            True,
            "in_features=96, out_features=40, bias=True, bits=4, scheme=asym, "
            "granularity=group, group_size=32",
        ),
        (
            QuantConfig(bits=8),
            False,
            "in_features=96, out_features=40, bias=False, bits=8, scheme=sym, granularity=channel",
        ),
    ],
)
def test_repr_gives_the_shape_and_every_setting(config, bias, expected):
    layer = QuantLinear.from_linear(float_linear(bias=bias), config)
    assert layer.extra_repr() == expected


def test_keep_vars_returns_the_layer_s_own_tensors_as_torch_modules_do():
    """nn.Module's contract for ``state_dict(keep_vars=True)``: the module's own tensors
    (nn.Linear's included); 8-bit layers make their packed words, the rest is kept."""
    linear = float_linear()
    assert linear.state_dict(keep_vars=True)["bias"] is linear.bias  # the contract itself
    layer = QuantLinear.from_linear(linear, QuantConfig(bits=8))
    kept = layer.state_dict(keep_vars=True)
    assert kept["bias"] is layer.bias and kept["weight_scale"] is layer.weight_scale
    assert layer.state_dict()["weight_scale"] is not layer.weight_scale  # detached copies
    packed = QuantLinear.from_linear(linear, QuantConfig(bits=4))
    assert packed.state_dict(keep_vars=True)["weight_packed"] is packed.weight_packed


def test_an_int8_layer_saves_the_older_plain_layout_when_asked():
    """``checkpoint_format = "int-quantized"``: quantcli format 1, plain int8 weights."""
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(bits=8, scheme="asym"))
    layer.checkpoint_format = "int-quantized"
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.int8, (OUT, IN)),
        "weight_scale": (torch.float32, (OUT, 1)),
        "weight_zero_point": (torch.int8, (OUT, 1)),
        "bias": (torch.float32, (OUT,)),
    }
    assert torch.equal(state["weight"], layer.weight)


def named(layer):
    """The layer as a model's submodule ``proj``: refusals name it."""
    return torch.nn.ModuleDict({"proj": layer})


@pytest.mark.parametrize(
    ("values", "count", "example"),
    [
        ({3: float("nan")}, 1, "nan"),
        ({0: float("inf"), 5: 1.0}, 1, "inf"),
        ({1: -0.5, 2: -1.0}, 2, "-0.5"),
        ({4: 0.0}, 1, "0.0"),
    ],
)
def test_scales_that_are_not_finite_and_positive_are_refused(values, count, example):
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(bits=8))
    state = {f"proj.{k}": v.clone() for k, v in layer.state_dict().items()}
    for row, value in values.items():
        state["proj.weight_scale"][row] = value
    message = (
        f"proj.weight_scale holds {count} value(s) that are not finite and positive "
        f"(e.g. {example}): the checkpoint is corrupt."
    )
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        named(layer).load_state_dict(state)


def test_the_smallest_positive_scale_is_accepted():
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(bits=8))
    state = layer.state_dict()
    state["weight_scale"][0] = torch.finfo(torch.float32).smallest_normal / 2**23  # subnormal
    layer.load_state_dict(state)
    assert layer.weight_scale[0] > 0


def test_a_weight_shape_other_than_the_layer_s_is_refused():
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(bits=4))
    state = {f"proj.{k}": v.clone() for k, v in layer.state_dict().items()}
    state["proj.weight_shape"] = torch.tensor([OUT, IN - 1])
    message = f"proj.weight_shape holds [{OUT}, {IN - 1}], not [{OUT}, {IN}]."
    with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
        named(layer).load_state_dict(state)


@pytest.mark.parametrize(
    ("bits", "zero", "refused"),
    [(4, -8, False), (4, 7, False), (4, 8, True), (4, -9, True), (2, 1, False), (2, 2, True)],
)
def test_int8_zero_points_outside_the_bit_width_are_refused(bits, zero, refused):
    """Per-tensor zero points are stored as int8 (not packed), so a file can hold any byte;
    the bit width's range is -2^(bits-1) .. 2^(bits-1) - 1 (-8..7 at 4 bits, -2..1 at 2)."""
    config = QuantConfig(bits=bits, granularity="tensor")
    layer = QuantLinear.from_linear(float_linear(), config)
    state = {f"proj.{k}": v.clone() for k, v in layer.state_dict().items()}
    state["proj.weight_zero_point"] = torch.tensor([zero], dtype=torch.int8)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    message = (
        f"proj.weight_zero_point holds values outside {low}..{high}, the {bits}-bit range: "
        "the checkpoint is corrupt."
    )
    if refused:
        with pytest.raises(CheckpointError, match="^" + re.escape(message) + "$"):
            named(layer).load_state_dict(state)
    else:
        named(layer).load_state_dict(state)
        assert layer.integers()[1].tolist() == [zero]


@pytest.mark.parametrize("name", CONFIGS)
def test_a_meta_state_dict_loads_into_a_meta_layer_unchecked(name):
    """Shapes only (a skeleton handed to another): there are no values to check."""
    with torch.device("meta"):
        source = QuantLinear.from_linear(torch.nn.Linear(IN, OUT), CONFIGS[name])
        skeleton = QuantLinear.from_linear(torch.nn.Linear(IN, OUT), CONFIGS[name])
    skeleton.load_state_dict(source.state_dict(), assign=True)
    assert all(b.is_meta for b in skeleton.buffers())


@pytest.mark.parametrize(
    ("config", "in_features", "out_features"),
    [
        (QuantConfig(bits=8, scheme="asym"), 98, 42),  # 98 % 4, 42 % 4: a word part empty
        (QuantConfig(bits=4, granularity="channel"), 100, 40),  # 100 % 8
        (QuantConfig(bits=4, granularity="channel", scheme="asym"), 100, 44),
        (QuantConfig(bits=2, scheme="asym", granularity="channel"), 100, 24),  # 100 % 16
    ],
)
def test_widths_that_leave_a_word_part_empty_round_trip(config, in_features, out_features):
    """Packing pads the last int32 word; unpacking must cut the padding off again, for the
    weights (along the inputs) and the zero points (along the outputs)."""
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features)
    layer = QuantLinear.from_weight(weight, None, config)
    qt = quantize(weight, config.bits, config.scheme, config.granularity, config.group_size)
    assert torch.equal(layer.dequantize_weight(), qt.dequantize())
    state = layer.state_dict()
    assert state["weight_packed"].shape == (out_features, -(-in_features * config.bits // 32))
    copy = QuantLinear(in_features, out_features, False, config)
    copy.load_state_dict(state)
    assert torch.equal(copy.dequantize_weight(), qt.dequantize())
    x = torch.randn(3, in_features)
    assert torch.equal(copy(x), F.linear(x, qt.dequantize()))


def test_an_8bit_layer_takes_packed_words_without_weight_shape():
    """``weight_shape`` is checked when a file has it; the layer knows its own shape."""
    layer = QuantLinear.from_linear(float_linear(), QuantConfig(bits=8))
    state = layer.state_dict()
    del state["weight_shape"]
    copy = QuantLinear(IN, OUT, True, QuantConfig(bits=8))
    copy.load_state_dict(state)
    assert torch.equal(copy.weight, layer.weight)


def test_the_clipping_search_setting_reaches_the_layer():
    """``optimize`` changes the integers of a weight with outliers (the search clips
    them); the layer holds what `quantize` makes with the same setting."""
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN)
    weight[::7, ::11] *= 12  # outliers: clipping them lowers the error of the rest
    for optimize in (False, True):
        config = QuantConfig(bits=4, granularity="channel", optimize=optimize)
        layer = QuantLinear.from_weight(weight, None, config)
        qt = quantize(weight, 4, config.scheme, config.granularity, None, optimize=optimize)
        assert torch.equal(layer.dequantize_weight(), qt.dequantize())
    plain = quantize(weight, 4, config.scheme, config.granularity, None)
    assert not torch.equal(qt.dequantize(), plain.dequantize())
