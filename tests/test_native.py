"""quantcli's own int8 CPU kernel (`quantcli.nn.native`): exact where float32 is exact, within
float32 summation error elsewhere, on both of its instruction sets, and a build that fails
says so once and leaves decode to PyTorch's kernel."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import needs_native_int8

from quantcli import QuantConfig, QuantLinear
from quantcli.nn import kernels, native

pytestmark = needs_native_int8


def reference(x, q, scale):
    """float64: exact for these sizes (products of int8 and bf16/fp32 need < 53 bits)."""
    return (x.double() @ q.double().T) * scale.double()


def bound(x, q, scale, dtype):
    """float32 sums of K products (each exact) in any order: at most K units of 2^-24 of the
    sum of |terms|, then the scale's product (one more unit) and, in bf16, one rounding of
    the result (2^-8 relative). A dropped, doubled or misplaced term, row or scale is off by
    a whole term: for the shapes here (K <= 300) over 50x this bound."""
    terms = (x.double().abs() @ q.double().abs().T) * scale.double()
    summing = (x.shape[1] + 1) * 2**-24 * terms
    rounding = 2**-8 * reference(x, q, scale).abs() if dtype == torch.bfloat16 else 0
    return summing + rounding


def test_a_hand_computed_product():
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]])
    q = torch.tensor([[1, -1, 2], [127, -128, 0]], dtype=torch.int8)
    scale = torch.tensor([0.5, 2.0])
    # row 0: (1 - 2 + 6) * 0.5, (127 - 256) * 2; row 1: (-1 - 0.5) * 0.5, (-127 - 64) * 2
    expected = torch.tensor([[2.5, -258.0], [-0.75, -382.0]])
    assert torch.equal(native.int8_gemv(x, q, scale), expected)
    assert torch.equal(native.int8_gemv(x.bfloat16(), q, scale), expected.bfloat16())


SHAPES = [(1, 1, 1), (1, 5, 7), (2, 3, 16), (3, 37, 45), (4, 8, 64), (5, 9, 130), (64, 6, 300)]


@pytest.mark.parametrize(("rows", "out", "width"), SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agrees_with_float64_over_every_tail(rows, out, width, dtype):
    """Shapes with tails in every dimension: output rows past the blocks of 4, columns past
    the vectors of 16 (AVX-512) or 8 (AVX2), activation rows past the batches of 4 or 2."""
    torch.manual_seed(rows * 1000 + out * 10 + width)
    x = torch.randn(rows, width).to(dtype)
    q = torch.randint(-128, 128, (out, width), dtype=torch.int8)
    scale = torch.rand(out) + 0.01
    y = native.int8_gemv(x, q, scale)
    assert y.dtype == dtype and y.shape == (rows, out)
    assert ((y.double() - reference(x, q, scale)).abs() <= bound(x, q, scale, dtype)).all()


def test_wrong_operands_are_refused():
    x, q, scale = torch.randn(65, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4)
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        native.int8_gemv(x, q, scale)
    with pytest.raises(RuntimeError, match="scale: contiguous float32"):
        native.int8_gemv(x[:1], q, scale.bfloat16())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.int8_gemv(x[:1].half(), q, scale)


AVX2_CHECK = textwrap.dedent(
    """
    import torch
    from quantcli.nn import native
    from test_native import SHAPES, bound, reference
    assert native.int8_gemv_isa() == "avx2", native.int8_gemv_isa()
    for rows, out, width in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(rows, width).to(dtype)
            q = torch.randint(-128, 128, (out, width), dtype=torch.int8)
            scale = torch.rand(out) + 0.01
            error = (native.int8_gemv(x, q, scale).double() - reference(x, q, scale)).abs()
            assert (error <= bound(x, q, scale, dtype)).all(), (rows, out, width, dtype)
    print("checked")
    """
)


@pytest.mark.skipif(native.int8_gemv_isa() != "avx512", reason="this CPU runs AVX2 already")
def test_the_avx2_path_agrees_too():
    """The AVX2 code of an AVX-512 machine, as an AVX2-only CPU runs it (chosen at load)."""
    tests = os.path.dirname(__file__)
    env = os.environ | {"QUANTCLI_CPU_ISA": "avx2", "PYTHONPATH": tests}
    done = subprocess.run(
        [sys.executable, "-c", AVX2_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "checked" in done.stdout, done.stderr


def test_the_layer_runs_it_at_decode_and_the_tiles_at_prefill(native_int8):
    """Symmetric int8 per channel, bf16 or float32 activations; in_features 100 too, where
    int8pack would crash (K % 8 != 0); never asymmetric int8 or other widths."""
    torch.manual_seed(0)
    q = QuantLinear.from_weight(torch.randn(48, 100), torch.randn(48), QuantConfig(bits=8))
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(3, 100).to(dtype)
        assert kernels.select_kernel(q, x) == "int8-native"
        exact = torch.nn.functional.linear(
            x.double(), q.dequantize_weight(torch.float64), q.bias.double()
        )
        w = q.dequantize_weight(torch.float64)
        slack = (x.double().abs() @ w.abs().T + q.bias.double().abs()) * 101 * 2**-24
        if dtype == torch.bfloat16:  # sum, bias and their sum each rounded once (2^-9)
            slack = slack + 2**-7 * (exact.abs() + q.bias.double().abs())
        assert ((q(x).double() - exact).abs() <= slack).all()
    prefill = torch.randn(kernels.PREFILL_MIN_M, 100)
    assert kernels.select_kernel(q, prefill) == "fp32-dequant"
    asym = QuantLinear.from_weight(torch.randn(48, 96), None, QuantConfig(bits=8, scheme="asym"))
    assert kernels.select_kernel(asym, torch.randn(1, 96)) == "fp32-dequant"
    int4 = QuantLinear.from_weight(torch.randn(48, 96), None, QuantConfig(bits=4, group_size=32))
    assert kernels.select_kernel(int4, torch.randn(1, 96).bfloat16()) == "int4pack"


UNBUILDABLE = textwrap.dedent(
    """
    import torch
    from quantcli import QuantConfig, QuantLinear
    from quantcli.nn import kernels
    q = QuantLinear.from_weight(torch.randn(48, 96), None, QuantConfig(bits=8))
    x = torch.randn(1, 96).bfloat16()
    print(kernels.select_kernel(q, x), kernels.select_kernel(q, x))
    """
)


@pytest.mark.parametrize("compiler", ["false", "/nonexistent/g++"])
def test_a_failed_build_says_so_once_and_decodes_with_pytorchs_kernel(tmp_path, compiler):
    """A compiler that fails or is missing: one line on stderr, int8pack at decode, nothing
    half-built left in the cache."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path), "CXX": compiler}
    done = subprocess.run(
        [sys.executable, "-c", UNBUILDABLE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["int8pack", "int8pack"]
    notices = [line for line in done.stderr.splitlines() if "quantcli:" in line]
    assert notices[-1].endswith("decode uses PyTorch's int8 kernel.")
    assert len([n for n in notices if "PyTorch's int8 kernel" in n]) == 1
    assert not list(tmp_path.rglob("*.so"))


def test_the_library_is_built_once_and_then_loaded(tmp_path):
    """A fresh cache builds (saying so); the next process loads what it left."""
    env = os.environ | {"XDG_CACHE_HOME": str(tmp_path)}
    env.pop("CXX", None)
    check = "from quantcli.nn import native; print(native.int8_gemv_isa())"
    first, second = (
        subprocess.run(
            [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    )
    assert first.stdout.strip() == second.stdout.strip() == native.int8_gemv_isa()
    assert "building the int8 CPU kernel" in first.stderr
    assert "building" not in second.stderr
    assert len(list(tmp_path.rglob("*.so"))) == 1
