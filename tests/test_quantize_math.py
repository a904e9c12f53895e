"""Round-trip bounds of the quantization math, on random and adversarial weights."""

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantcli.errors import InvalidTensorError, UsageError
from quantcli.tensor import dequantize, int_range, quantize

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHEMES = ["sym", "asym"]
# (granularity, group_size)
LAYOUTS = [("tensor", None), ("channel", None), ("group", 8), ("group", 32)]


def step(qt, shape):
    """The stored scale of every element: the unit of the round-trip bound."""
    scale = qt.scale.float()
    if scale.ndim == 2:
        scale = scale.repeat_interleave(shape[1] // scale.shape[1], dim=1)
    return scale.expand(shape)


def assert_round_trip_within_half_step(weight, qt):
    restored = qt.dequantize(torch.float32)
    error = (restored - weight.float()).abs()
    bound = step(qt, weight.shape) / 2
    # float32 division and rounding of w / s can move a tie by a few ulps of the step
    assert (error <= bound * (1 + 1e-5)).all(), float((error - bound).max())


def assert_integers_in_range(qt):
    q_min, q_max = int_range(qt.bits)
    assert qt.qdata.dtype == torch.int8
    assert int(qt.qdata.min()) >= q_min and int(qt.qdata.max()) <= q_max
    if qt.zero_point is None:
        assert int(qt.qdata.min()) >= -q_max  # symmetric never uses q_min
    else:
        assert qt.zero_point.dtype == torch.int8
        assert int(qt.zero_point.min()) >= q_min and int(qt.zero_point.max()) <= q_max


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    bits=st.integers(2, 8),
    scheme=st.sampled_from(SCHEMES),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from([1e-3, 1.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_random_weights_round_trip_within_half_a_step(
    rows, groups, bits, scheme, layout, dtype, magnitude, seed
):
    granularity, group_size = layout
    cols = groups * (group_size or 8)
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=generator) * magnitude).to(dtype)
    qt = quantize(weight, bits, scheme, granularity, group_size)
    assert qt.scale.dtype == dtype
    expected_scale_shape = {
        "tensor": (1,),
        "channel": (rows, 1),
        "group": (rows, cols // (group_size or 1)),
    }[granularity]
    assert tuple(qt.scale.shape) == expected_scale_shape
    assert_integers_in_range(qt)
    assert_round_trip_within_half_step(weight, qt)


def adversarial(dtype):
    """Weights real checkpoints contain, one (name, tensor) at a time."""
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(8, 64, generator=generator)
    outliers = normal.clone()
    outliers[2, 5], outliers[6, 40] = 80.0, -120.0
    zero_rows = normal.clone()
    zero_rows[[0, 3]] = 0.0
    tiny = 1e-6 if dtype is torch.float16 else 1e-30
    huge = 6e4 if dtype is torch.float16 else 1e30
    cases = {
        "constant": torch.full((8, 64), 0.37),
        "negative constant": torch.full((8, 64), -2.5),
        "relu-like": normal.clamp(min=0),
        "all negative": -normal.abs() - 1,
        "outliers": outliers,
        "zero rows": zero_rows,
        "all zero": torch.zeros(8, 64),
        "tiny": normal * tiny,
        "huge": normal.clamp(-1, 1) * huge,
    }
    return [(name, tensor.to(dtype)) for name, tensor in cases.items()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}{layout[1] or ''}")
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_adversarial_weights_round_trip_within_half_a_step(dtype, scheme, layout, bits):
    granularity, group_size = layout
    for name, weight in adversarial(dtype):
        qt = quantize(weight, bits, scheme, granularity, group_size)
        assert_integers_in_range(qt)
        try:
            assert_round_trip_within_half_step(weight, qt)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}{layout[1] or ''}")
def test_zero_rows_dequantize_to_exact_zeros(dtype, scheme, layout):
    weight = torch.randn(4, 64).to(dtype)
    weight[1] = 0
    qt = quantize(weight, 4, scheme, *layout)
    restored = qt.dequantize(dtype)
    assert torch.isfinite(qt.scale).all() and (qt.scale > 0).all()
    assert torch.equal(restored[1], torch.zeros(64, dtype=dtype))
    assert torch.isfinite(restored).all()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}{layout[1] or ''}")
def test_asymmetric_keeps_real_zeros_exact(layout):
    weight = torch.randn(4, 64).clamp(min=0)  # ReLU-like: half the values are exactly 0
    restored = quantize(weight, 4, "asym", *layout).dequantize(torch.float32)
    assert torch.equal(restored[weight == 0], torch.zeros(int((weight == 0).sum())))


def test_symmetric_int8_is_absmax_over_127():
    weight = torch.tensor([[0.5, -1.27, 0.0, 1.0], [2.54, 0.1, -0.2, 0.3]])
    qt = quantize(weight, 8, "sym", "channel")
    assert qt.zero_point is None
    assert torch.allclose(qt.scale, torch.tensor([[0.01], [0.02]]), rtol=1e-6)
    assert qt.qdata.tolist() == [[50, -127, 0, 100], [127, 5, -10, 15]]


def test_asymmetric_four_bit_hand_computed():
    # range [-1, 2] on 16 levels: s = 3 / 15 = 0.2, z = round(-8 + 1 / 0.2) = -3
    weight = torch.tensor([[-1.0, 0.0, 2.0, 0.45]])
    qt = quantize(weight, 4, "asym", "channel")
    assert torch.allclose(qt.scale, torch.tensor([[0.2]]))
    assert qt.zero_point.tolist() == [[-3]]
    assert qt.qdata.tolist() == [[-8, -3, 7, -1]]  # 0.45 / 0.2 - 3 = -0.75
    assert torch.allclose(qt.dequantize(torch.float32), torch.tensor([[-1.0, 0.0, 2.0, 0.4]]))


def test_scales_computed_in_float32_then_rounded_up_to_the_storage_dtype():
    weight = torch.randn(16, 64) * 3
    exact = weight.abs().amax(dim=1, keepdim=True) / 127
    for dtype in (torch.float16, torch.bfloat16):
        scale = quantize(weight, 8, "sym", "channel", dtype=dtype).scale
        assert scale.dtype == dtype
        assert (scale.float() >= exact).all()
        one_step_down = torch.nextafter(scale, torch.zeros_like(scale)).float()
        assert (one_step_down < exact).all()  # the nearest representable value above


def test_dequantize_reads_granularity_from_the_scale_shape():
    qdata = torch.tensor([[1, 2, 3, 4]], dtype=torch.int8)
    scale = torch.tensor([[1.0, 10.0]])
    zero = torch.tensor([[1, 0]], dtype=torch.int8)
    assert dequantize(qdata, scale, zero).tolist() == [[0.0, 1.0, 30.0, 40.0]]
    assert dequantize(qdata, torch.tensor([0.5])).tolist() == [[0.5, 1.0, 1.5, 2.0]]


@pytest.mark.parametrize(("value", "label"), [(float("nan"), "1 NaN"), (float("inf"), "1 Inf")])
def test_nan_and_inf_are_refused_by_name(value, label):
    weight = torch.randn(4, 32)
    weight[2, 3] = value
    with pytest.raises(InvalidTensorError, match=label):
        quantize(weight, 8)


def test_group_size_must_divide_the_row():
    with pytest.raises(UsageError, match="group_size=32 does not divide in_features=48"):
        quantize(torch.randn(4, 48), 4, "asym", "group", 32)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (torch.randn(8), "2-D weight"),
        (torch.randint(0, 3, (2, 2)), "floating-point"),
    ],
)
def test_malformed_weights_are_refused(weight, message):
    with pytest.raises(InvalidTensorError, match=message):
        quantize(weight, 8)


def test_bits_out_of_range():
    with pytest.raises(UsageError, match="2..8 bits"):
        quantize(torch.randn(2, 8), 9)


def test_scale_overflowing_its_dtype_is_refused():
    with pytest.raises(InvalidTensorError, match="overflow"):
        quantize(torch.full((2, 8), 1e38), 2, "sym", "channel", dtype=torch.float16)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout[0]}{layout[1] or ''}")
def test_row_blocks_change_no_result(scheme, layout, monkeypatch):
    """Big matrices are processed a few rows at a time; the numbers must not depend on it."""
    weight = torch.randn(37, 64).bfloat16()
    whole = quantize(weight, 4, scheme, *layout)
    module = importlib.import_module("quantcli.tensor.quantize")
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 3 * 64)  # 3 rows per block
    blocked = quantize(weight, 4, scheme, *layout)
    assert torch.equal(blocked.qdata, whole.qdata) and torch.equal(blocked.scale, whole.scale)
    if whole.zero_point is not None:
        assert torch.equal(blocked.zero_point, whole.zero_point)


def group_squared_errors(weight, qt, group_size):
    """Squared reconstruction error summed per group (per row for channel layouts)."""
    error = (qt.dequantize(torch.float32) - weight.float()).square()
    return error.unflatten(1, (-1, group_size or weight.shape[1])).sum(-1)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    bits=st.sampled_from([2, 4, 8]),
    scheme=st.sampled_from(SCHEMES),
    layout=st.sampled_from(LAYOUTS[1:]),
    dtype=st.sampled_from(DTYPES),
    outliers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_clipping_search_never_loses_to_round_to_nearest(
    rows, groups, bits, scheme, layout, dtype, outliers, seed
):
    granularity, group_size = layout
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, groups * 32, generator=generator)
    if outliers:
        weight[:, ::29] *= 12
    weight = weight.to(dtype)
    rtn = quantize(weight, bits, scheme, granularity, group_size)
    best = quantize(weight, bits, scheme, granularity, group_size, optimize=True)
    q_min, q_max = int_range(bits)  # clipped symmetric groups may reach q_min too
    assert int(best.qdata.min()) >= q_min and int(best.qdata.max()) <= q_max
    before = group_squared_errors(weight, rtn, group_size)
    after = group_squared_errors(weight, best, group_size)
    assert (after <= before * (1 + 1e-6) + 1e-30).all()


@pytest.mark.parametrize(
    ("bits", "scheme", "group_size", "at_most"),
    [(2, "asym", 16, 0.8), (2, "sym", 32, 0.4), (4, "asym", None, 0.85), (4, "sym", 32, 0.85)],
)
def test_clipping_search_cuts_the_error_of_gaussian_weights(bits, scheme, group_size, at_most):
    """Gaussian rows and groups: clipping the tails buys a finer step for the bulk
    (measured ratios 0.75, 0.35, 0.80, 0.79 on this seed)."""
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    granularity = "group" if group_size else "channel"
    rtn = quantize(weight, bits, scheme, granularity, group_size)
    best = quantize(weight, bits, scheme, granularity, group_size, optimize=True)
    before = group_squared_errors(weight, rtn, group_size).sum()
    assert group_squared_errors(weight, best, group_size).sum() <= at_most * before


def test_clipping_search_is_refused_per_tensor():
    with pytest.raises(UsageError, match="per channel or per group"):
        quantize(torch.randn(4, 8), 8, "sym", "tensor", optimize=True)


def test_group_size_none_and_zero_are_refused_and_one_is_accepted():
    with pytest.raises(UsageError, match="group_size=None does not divide in_features=4"):
        quantize(torch.randn(2, 4), 4, "asym", "group", None)
    with pytest.raises(UsageError, match="group_size=0 does not divide"):
        quantize(torch.randn(2, 4), 4, "asym", "group", 0)
    assert quantize(torch.randn(2, 4), 4, "asym", "group", 1).scale.shape == (2, 4)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: quantize(torch.tensor([[1.0, float("nan")]]), 8),
            "weight contains 1 NaN and 0 Inf values: repair the checkpoint or exclude this "
            "layer from quantization.",
        ),
        (
            lambda: quantize(torch.randn(4, 48), 4, "asym", "group", 32),
            "group_size=32 does not divide in_features=48: choose a group size that divides "
            "it, or exclude this layer.",
        ),
        (
            lambda: quantize(torch.full((2, 8), 1e38), 2, "sym", "channel", dtype=torch.float16),
            "the scales overflow torch.float16: the weights are too large for it; store scales "
            "in float32 instead.",
        ),
        (
            lambda: quantize(torch.randn(4, 8), 8, "sym", "tensor", optimize=True),
            "the clipping search works per channel or per group, not per tensor.",
        ),
    ],
    ids=["nan", "group", "overflow", "clip-per-tensor"],
)
def test_error_messages_in_full(call, message):
    """The whole sentence a user reads, remedy included (not only its first words)."""
    with pytest.raises((InvalidTensorError, UsageError)) as error:
        call()
    assert str(error.value) == message


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_blocks_change_no_result_of_the_clipping_search(scheme, dtype, monkeypatch):
    """The clipping search also works a few rows at a time; each block must search its
    own rows' groups (the other test runs without it)."""
    weight = torch.randn(37, 64, generator=torch.Generator().manual_seed(2))
    weight[::5, ::7] *= 8  # outliers: the best ratios differ from row to row
    weight = weight.to(dtype)
    whole = quantize(weight, 2, scheme, "group", 16, optimize=True)
    module = importlib.import_module("quantcli.tensor.quantize")
    monkeypatch.setattr(module, "BLOCK_ELEMENTS", 3 * 64)  # 3 rows per block
    blocked = quantize(weight, 2, scheme, "group", 16, optimize=True)
    assert torch.equal(blocked.qdata, whole.qdata) and torch.equal(blocked.scale, whole.scale)
    if whole.zero_point is not None:
        assert torch.equal(blocked.zero_point, whole.zero_point)
