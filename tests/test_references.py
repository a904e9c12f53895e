"""Scales, zero points and codes pinned to references that are not quantcli's code.

Two references, neither of which calls quantcli's float arithmetic:

1. Hand-computed cases for every bits x scheme x granularity: the expected values were
   worked out in exact rational arithmetic (``fractions.Fraction``) from the formulas of
   docs/quantization.md, and written down as literals. The weights are dyadic, so they are
   exact in float32, and most scales are powers of two, so those are exact too; the others
   (asymmetric per channel) must be the float32 nearest the exact rational: quantcli
   computes scales in float32, where one division of exact operands is correctly rounded
   (to nearest), and rounds *up* only when storing in a narrower dtype. The cases include
   round-half-to-even ties (``3/8 / (1/4) - 3 = -1.5`` -> -2), all-positive and
   all-negative groups (the range widened to 0, so ``z = q_min`` and ``z = q_max``), and
   every group of a row with a different scale.
2. compressed-tensors' own ``calculate_qparams``, ``quantize`` and ``dequantize`` on the same
   random weights, with the two documented differences of ``ct_reference``.
"""

from fractions import Fraction as F

import pytest
import torch
from ct_reference import (
    args,
    ct_dequantize,
    ct_quantize,
    group_ranges,
    reference_qparams,
    sym_ratio,
)

from quantcli.tensor import dequantize, int_range, quantize

GROUP_SIZE = 4  # in the hand-computed cases: two groups per row of 8

# Symmetric weights: the four groups (row 0: cols 0-3, 4-7; row 1: ...) have absmax
# q_max * (1/4, 1/2 | 1, 1/8), so the group scales are 1/4, 1/2, 1, 1/8, the channel scales
# 1/2 and 1, the tensor scale 1. Each group holds +-q_max*s, a tie (k + 1/2)*s, a small value.
W8_SYM = [
    [F(-127, 4), F(5, 8), F(201, 8), F(-1, 8), F(-5, 4), F(-201, 4), F(1, 4), F(127, 2)],
    [F(-5, 2), F(-201, 2), F(1, 2), F(127), F(-127, 8), F(5, 16), F(201, 16), F(-1, 16)],
]
W4_SYM = [
    [F(7, 4), F(-5, 8), F(7, 8), F(-25, 16), F(5, 4), F(-7, 4), F(25, 8), F(-7, 2)],
    [F(5, 2), F(-7, 2), F(25, 4), F(-7), F(7, 8), F(-5, 16), F(7, 16), F(-25, 32)],
]
W2_SYM = [
    [F(1, 4), F(1, 8), F(-3, 16), F(1, 16), F(-1, 4), F(3, 8), F(-1, 8), F(-1, 2)],
    [F(-1, 2), F(3, 4), F(-1, 4), F(-1), F(1, 8), F(1, 16), F(-3, 32), F(1, 32)],
]
# Asymmetric weights: group (0, 0) spans [-m s, (R - m) s] with s = 1/4 (R = q_max - q_min),
# group (0, 1) is all positive (widened to [0, R/2]), group (1, 0) all negative (widened
# to [-R, 0]), group (1, 1) spans [-m' s, (R - m') s] with s = 1/8.
W8_ASYM = [
    [F(-25), F(155, 4), F(3, 8), F(-199, 16), F(255, 2), F(1, 4), F(9, 8), F(255, 4)],
    [F(-255), F(-3, 2), F(-3, 4), F(-254), F(-15, 4), F(225, 8), F(1, 16), F(-59, 16)],
]
W4_ASYM = [
    [F(-5, 4), F(5, 2), F(3, 8), F(-9, 16), F(15, 2), F(1, 4), F(9, 8), F(15, 4)],
    [F(-15), F(-3, 2), F(-3, 4), F(-14), F(-1, 4), F(13, 8), F(1, 16), F(-3, 16)],
]
W2_ASYM = [
    [F(-1, 4), F(1, 2), F(3, 8), F(-1, 16), F(3, 2), F(1, 4), F(9, 8), F(3, 4)],
    [F(-3), F(-3, 2), F(-3, 4), F(-2), F(-1, 4), F(1, 8), F(1, 16), F(-3, 16)],
]

# (bits, scheme, granularity, weight, exact scales (row-major), zero points, codes).
# Worked example, int4 asym group (0, 0): range [-5/4, 5/2] -> s = (15/4) / 15 = 1/4,
# z = round(-8 + (5/4) / (1/4)) = -3; codes -5 - 3 = -8, 10 - 3 = 7, 1.5 - 3 = -1.5 -> -2
# (half to even), -2.25 - 3 = -5.25 -> -5. Per tensor: range [-15, 15/2] -> s = 22.5 / 15
# = 3/2, z = round(-8 + 15 / 1.5) = 2.
# fmt: off
CASES = [
    (8, "sym", "tensor", W8_SYM, [F(1)], None,
     [[-32, 1, 25, 0, -1, -50, 0, 64], [-2, -100, 0, 127, -16, 0, 13, 0]]),
    (8, "sym", "channel", W8_SYM, [F(1, 2), F(1)], None,
     [[-64, 1, 50, 0, -2, -100, 0, 127], [-2, -100, 0, 127, -16, 0, 13, 0]]),
    (8, "sym", "group", W8_SYM, [F(1, 4), F(1, 2), F(1), F(1, 8)], None,
     [[-127, 2, 100, 0, -2, -100, 0, 127], [-2, -100, 0, 127, -127, 2, 100, 0]]),
    (4, "sym", "tensor", W4_SYM, [F(1)], None,
     [[2, -1, 1, -2, 1, -2, 3, -4], [2, -4, 6, -7, 1, 0, 0, -1]]),
    (4, "sym", "channel", W4_SYM, [F(1, 2), F(1)], None,
     [[4, -1, 2, -3, 2, -4, 6, -7], [2, -4, 6, -7, 1, 0, 0, -1]]),
    (4, "sym", "group", W4_SYM, [F(1, 4), F(1, 2), F(1), F(1, 8)], None,
     [[7, -2, 4, -6, 2, -4, 6, -7], [2, -4, 6, -7, 7, -2, 4, -6]]),
    (2, "sym", "tensor", W2_SYM, [F(1)], None,
     [[0, 0, 0, 0, 0, 0, 0, 0], [0, 1, 0, -1, 0, 0, 0, 0]]),
    (2, "sym", "channel", W2_SYM, [F(1, 2), F(1)], None,
     [[0, 0, 0, 0, 0, 1, 0, -1], [0, 1, 0, -1, 0, 0, 0, 0]]),
    (2, "sym", "group", W2_SYM, [F(1, 4), F(1, 2), F(1), F(1, 8)], None,
     [[1, 0, -1, 0, 0, 1, 0, -1], [0, 1, 0, -1, 1, 0, -1, 0]]),
    (8, "asym", "tensor", W8_ASYM, [F(3, 2)], [42],
     [[25, 68, 42, 34, 127, 42, 43, 84], [-128, 41, 42, -127, 40, 61, 42, 40]]),
    (8, "asym", "channel", W8_ASYM, [F(61, 102), F(151, 136)], [-86, 102],
     [[-128, -21, -85, -107, 127, -86, -84, 21], [-128, 101, 101, -127, 99, 127, 102, 99]]),
    (8, "asym", "group", W8_ASYM, [F(1, 4), F(1, 2), F(1), F(1, 8)], [-28, -128, 127, -98],
     [[-128, 127, -26, -78, 127, -128, -126, 0], [-128, 126, 126, -127, -128, 127, -98, -128]]),
    (4, "asym", "tensor", W4_ASYM, [F(3, 2)], [2],
     [[1, 4, 2, 2, 7, 2, 3, 4], [-8, 1, 2, -7, 2, 3, 2, 2]]),
    (4, "asym", "channel", W4_ASYM, [F(7, 12), F(133, 120)], [-6, 6],
     [[-8, -2, -5, -7, 7, -6, -4, 0], [-8, 5, 5, -7, 6, 7, 6, 6]]),
    (4, "asym", "group", W4_ASYM, [F(1, 4), F(1, 2), F(1), F(1, 8)], [-3, -8, 7, -6],
     [[-8, 7, -2, -5, 7, -8, -6, 0], [-8, 6, 6, -7, -8, 7, -6, -8]]),
    (2, "asym", "tensor", W2_ASYM, [F(3, 2)], [0],
     [[0, 0, 0, 0, 1, 0, 1, 0], [-2, -1, 0, -1, 0, 0, 0, 0]]),
    (2, "asym", "channel", W2_ASYM, [F(7, 12), F(25, 24)], [-2, 1],
     [[-2, -1, -1, -2, 1, -2, 0, -1], [-2, 0, 0, -1, 1, 1, 1, 1]]),
    (2, "asym", "group", W2_ASYM, [F(1, 4), F(1, 2), F(1), F(1, 8)], [-1, -2, 1, 0],
     [[-2, 1, 0, -1, 1, -2, 0, 0], [-2, 0, 0, -1, -2, 1, 0, -2]]),
]
# fmt: on


def as_tensor(rows):
    return torch.tensor([[float(x) for x in row] for row in rows], dtype=torch.float32)


def nearest_float32(exact: F) -> float:
    """Exact rational -> the float32 nearest to it (decided in Fractions, not by a cast of
    a float64, which could round twice)."""
    below = torch.tensor(float(exact), dtype=torch.float32)
    if F(float(below)) > exact:
        below = torch.nextafter(below, torch.tensor(float("-inf")))
    above = torch.nextafter(below, torch.tensor(float("inf")))
    if F(float(below)) == exact:
        return float(below)
    lower, upper = exact - F(float(below)), F(float(above)) - exact
    assert lower != upper  # no tie among the cases
    return float(below if lower < upper else above)


def case_id(case):
    return f"int{case[0]}-{case[1]}-{case[2]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hand_computed_scale_zero_point_and_codes(case):
    bits, scheme, granularity, rows, scales, zeros, codes = case
    group_size = GROUP_SIZE if granularity == "group" else None
    qt = quantize(as_tensor(rows), bits, scheme, granularity, group_size)

    expected_scale = [nearest_float32(s) for s in scales]
    assert qt.scale.dtype == torch.float32
    assert qt.scale.flatten().tolist() == expected_scale  # bit for bit
    assert qt.scale.shape == {"tensor": (1,), "channel": (2, 1), "group": (2, 2)}[granularity]
    if zeros is None:
        assert qt.zero_point is None
    else:
        assert qt.zero_point.dtype == torch.int8
        assert qt.zero_point.flatten().tolist() == zeros
    assert qt.qdata.tolist() == codes

    # dequantize: s * (q - z), one float32 rounding of the exact product (|q - z| < 2^9,
    # the scale has 24 significant bits: the product is exact in float64)
    n_groups = len(scales) // (1 if granularity == "tensor" else 2)
    per_row = (8 // n_groups) if granularity != "tensor" else 8
    expected = []
    for r, row in enumerate(codes):
        out = []
        for c, q in enumerate(row):
            g = 0 if granularity == "tensor" else r * n_groups + c // per_row
            z = 0 if zeros is None else zeros[g]
            out.append(float(torch.tensor(expected_scale[g] * (q - z), dtype=torch.float32)))
        expected.append(out)
    assert qt.dequantize(torch.float32).tolist() == expected


# --- compressed-tensors on the same inputs ---------------------------------------------

BITS = [8, 4, 2]
SCHEMES = ["sym", "asym"]
LAYOUTS = [("tensor", None), ("channel", None), ("group", 16)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def weights(dtype):
    """Gaussian rows with outliers, a ReLU-like row, an all-negative row and an
    all-positive one (the range must widen to 0), 16 x 64, exact in `dtype`."""
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=generator)
    w[3, 7], w[9, 50] = 9.0, -11.0
    w[4] = w[4].clamp(min=0)
    w[5] = -w[5].abs() - 0.25
    w[6] = w[6].abs() + 0.5
    return w.to(dtype)


def expand(param, shape):
    """A (1,), (out, 1) or (out, groups) tensor broadcast to every element (out, in)."""
    if param.ndim == 2:
        param = param.repeat_interleave(shape[1] // param.shape[1], dim=1)
    return param.expand(shape)


def ulp(stored: torch.Tensor) -> torch.Tensor:
    """The step of the stored scale's dtype just below each stored value, in float64."""
    below = torch.nextafter(stored, torch.zeros_like(stored))
    return (stored.double() - below.double()).abs()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout[0])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_scales_and_zero_points_match_compressed_tensors(bits, scheme, layout, dtype):
    granularity, group_size = layout
    weight = weights(dtype)
    ct_scale, ct_zero = reference_qparams(weight, bits, scheme, granularity, group_size)
    qt = quantize(weight, bits, scheme, granularity, group_size)
    assert qt.scale.dtype == dtype and qt.scale.shape == ct_scale.shape

    # scale: compressed-tensors' (float32, x the symmetric factor for sym), rounded up to
    # `dtype`: at or above it, by less than one step of `dtype`. The float32 reference is
    # itself rounded (one float32 ulp, 2^-23 relative, twice with the symmetric factor).
    reference = ct_scale.double() * (sym_ratio(bits) if scheme == "sym" else 1.0)
    slack = reference * 2 * 2**-23
    stored = qt.scale.double()
    assert (stored >= reference - slack).all()
    assert (stored - reference <= ulp(qt.scale) + slack).all()
    if dtype is torch.float32 and scheme == "asym":
        assert torch.equal(qt.scale, ct_scale)  # same float32 operations: bit for bit

    if scheme == "sym":
        assert qt.zero_point is None and not ct_zero.any()
        return
    assert qt.zero_point.dtype == torch.int8
    if dtype is torch.float32:
        assert torch.equal(qt.zero_point, ct_zero)
    else:
        # the scale rounded up to fp16/bf16 moves z = round(q_min - low / s) with it; the
        # definition that survives: the grid's lowest point s * (q_min - z) lies within half
        # a step of the widened group minimum (float64 check, 1e-6 for float32 rounding)
        low, _ = group_ranges(weight, granularity, group_size)
        q_min, q_max = int_range(bits)
        offset = (q_min - qt.zero_point.double()) - low.clamp(max=0).double() / stored
        assert (offset.abs() <= 0.5 + 1e-6).all()
        assert int(qt.zero_point.min()) >= q_min and int(qt.zero_point.max()) <= q_max
        assert (qt.zero_point.int() - ct_zero.int()).abs().max() <= 2  # <= R * 2^-8, R=255


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout[0])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bits", BITS)
def test_codes_and_dequantized_values_match_compressed_tensors(bits, scheme, layout, dtype):
    """With quantcli's stored scale and zero point, compressed-tensors' quantize gives the
    same integers and its dequantize the same floats, bit for bit (same float32 division,
    same round-half-to-even, same order of operations)."""
    granularity, group_size = layout
    weight = weights(dtype)
    qt = quantize(weight, bits, scheme, granularity, group_size)
    ct_args = args(bits, scheme, granularity, group_size)
    zero = torch.zeros_like(qt.scale, dtype=torch.int8) if qt.zero_point is None else qt.zero_point
    codes = ct_quantize(weight.float(), qt.scale.float(), zero, ct_args)
    assert torch.equal(codes.to(torch.int8), qt.qdata)
    assert torch.equal(codes, codes.round())  # integral before the cast
    theirs = ct_dequantize(qt.qdata, qt.scale, qt.zero_point, ct_args)
    ours = dequantize(qt.qdata, qt.scale, qt.zero_point)
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout[0])
@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_float32_round_trip_is_compressed_tensors_fake_quantize(bits, layout):
    """Same scale, zero point and codes: the whole asymmetric float32 round trip is
    compressed-tensors' fake_quantize with its own parameters, bit for bit."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    granularity, group_size = layout
    weight = weights(torch.float32)
    ct_scale, ct_zero = reference_qparams(weight, bits, "asym", granularity, group_size)
    theirs = fake_quantize(weight, ct_scale, ct_zero, args(bits, "asym", granularity, group_size))
    ours = quantize(weight, bits, "asym", granularity, group_size).dequantize(torch.float32)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_grid_differs_from_compressed_tensors_only_by_the_documented_factor(bits):
    """The one deliberate difference: +-absmax land on +-q_max exactly (q_min unused), where
    compressed-tensors' step is (2 q_max) / (q_max - q_min) times as fine and +absmax is
    clamped. Pinned so that a change of either convention is seen."""
    q_min, q_max = int_range(bits)
    weight = torch.tensor([[-3.0, 3.0, 0.0, 1.0]])
    qt = quantize(weight, bits, "sym", "channel")
    assert qt.qdata[0, :2].tolist() == [-q_max, q_max]
    ct_scale, ct_zero = reference_qparams(weight, bits, "sym", "channel")
    assert float(ct_scale) == pytest.approx(3.0 / ((q_max - q_min) / 2), rel=1e-7)
    assert float(qt.scale) == pytest.approx(3.0 / q_max, rel=1e-7)
    ct_codes = ct_quantize(weight, ct_scale, ct_zero, args(bits, "sym", "channel", None))
    assert ct_codes[0, :2].tolist() == [q_min, q_max]  # -3 / s = -(q_max + 1/2) -> q_min


def test_quantized_tensor_records_its_settings():
    """The fields callers read back (bits, scheme, granularity, group size), not only the
    numbers: the group size is kept for groups only."""
    weight = as_tensor(W4_ASYM)
    for granularity, group_size, kept in (("group", 4, 4), ("channel", 4, None)):
        qt = quantize(weight, 4, "asym", granularity, group_size)
        assert (qt.bits, qt.scheme.value, qt.granularity.value, qt.group_size) == (
            4,
            "asym",
            granularity,
            kept,
        )
    qt = quantize(weight, 8, "sym", "tensor")
    assert (qt.bits, qt.scheme.value, qt.granularity.value, qt.group_size) == (
        8,
        "sym",
        "tensor",
        None,
    )


def test_odd_widths_per_tensor_and_group_size_one_hand_computed():
    """A 3 x 5 weight (15 elements: no even split anywhere). Per tensor, int4 sym: absmax 7/2
    -> s = 1/2; codes w / s. Groups of one, int4 asym: each group's range is [min(w, 0),
    max(w, 0)], so s = |w| / 15 and every weight is a grid point: exact."""
    rows = [
        [F(7, 2), F(-1, 4), F(3, 4), F(1), F(-5, 2)],
        [F(1, 2), F(-7, 2), F(0), F(5, 4), F(-3, 4)],
        [F(2), F(-1), F(9, 4), F(-3, 2), F(1, 8)],
    ]
    weight = as_tensor(rows)
    qt = quantize(weight, 4, "sym", "tensor")
    assert qt.scale.tolist() == [0.5]
    # 0.5 -> 0 and -0.5 -> 0 (ties to even), 1.5 -> 2, -1.5 -> -2, 2.5 -> 2, 4.5 -> 4
    assert qt.qdata.tolist() == [[7, 0, 2, 2, -5], [1, -7, 0, 2, -2], [4, -2, 4, -3, 0]]
    assert qt.dequantize(torch.float32).tolist() == [
        [3.5, 0.0, 1.0, 1.0, -2.5],
        [0.5, -3.5, 0.0, 1.0, -1.0],
        [2.0, -1.0, 2.0, -1.5, 0.0],
    ]
    qt = quantize(weight, 4, "asym", "group", 1)
    assert qt.scale.shape == (3, 5) and qt.group_size == 1
    assert torch.allclose(qt.dequantize(torch.float32), weight, rtol=2**-22, atol=0)


@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_an_all_zero_group_gets_compressed_tensors_scale_which_survives_a_cast(scheme, dtype):
    """A padding embedding row is all zeros: its scale is compressed-tensors' (the dtype's
    epsilon, not a float32 subnormal that a cast to bf16 at load turns into a refused 0)."""
    weight = torch.randn(2, 8)
    weight[1] = 0
    theirs, _ = reference_qparams(weight.to(dtype), 4, scheme, "channel")
    qt = quantize(weight.to(dtype), 4, scheme, "channel", None, dtype)
    assert theirs[1].item() == torch.finfo(torch.float32).eps  # theirs, computed in float32
    assert qt.scale[1].item() == torch.finfo(dtype).eps
    for runtime_dtype in (torch.bfloat16, torch.float16):
        assert qt.scale.to(runtime_dtype)[1].item() > 0
    assert torch.equal(qt.dequantize(torch.float32)[1], torch.zeros(8))
