"""Every kernel agrees with the float32 reference within the activation dtype's precision,
and the dispatch never sends a call to a kernel known to crash."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import kernel_names

from quantcli import QuantConfig, QuantLinear
from quantcli.nn import kernels
from quantcli.nn.kernels import (
    CUDA_INT4PACK_MAX_M,
    KERNELS,
    PREFILL_MIN_M,
    TILE_ELEMENTS,
    _workspaces,
    choose_kernel,
    fp32_dequant,
    int4pack_weight,
    kernel_plan,
    preferred_dtype,
    prepare_kernels,
    select_kernel,
)
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


#: Prefill on CPUs without bf16 matmul hardware, and with it.
PREFILL = ("fp32-dequant", "bf16-dequant")


@pytest.mark.parametrize(
    ("config", "dtype", "rows", "expected"),
    [
        (QuantConfig(bits=8), torch.bfloat16, 1, "int8pack"),
        (QuantConfig(bits=8), torch.bfloat16, PREFILL_MIN_M - 1, "int8pack"),
        (QuantConfig(bits=8), torch.bfloat16, PREFILL_MIN_M, ("fp32-dequant", "int8pack")),
        (QuantConfig(bits=8, granularity="tensor"), torch.bfloat16, 3, "int8pack"),
        (QuantConfig(bits=8, scheme="asym"), torch.bfloat16, 3, "fp32-dequant"),
        (QuantConfig(bits=8, scheme="asym"), torch.bfloat16, 40, PREFILL),
        (QuantConfig(bits=8), torch.float16, 3, "fp32-dequant"),
        (QuantConfig(bits=8), torch.float16, 64, "fp32-dequant"),
        (QuantConfig(bits=8), torch.float32, 64, "fp32-dequant"),
        (QuantConfig(bits=8), torch.float32, 1, "fp32-dequant"),
        (QuantConfig(bits=4), torch.bfloat16, 1, "int4pack"),
        (QuantConfig(bits=4), torch.bfloat16, PREFILL_MIN_M - 1, "int4pack"),
        (QuantConfig(bits=4, scheme="sym", group_size=32), torch.bfloat16, 3, "int4pack"),
        (QuantConfig(bits=4, group_size=16), torch.bfloat16, 3, "fp32-dequant"),
        (QuantConfig(bits=4, granularity="channel"), torch.bfloat16, 3, "fp32-dequant"),
        (QuantConfig(bits=4), torch.float16, 3, "fp32-dequant"),
        (QuantConfig(bits=4), torch.float16, 128, "fp32-dequant"),
        (QuantConfig(bits=4), torch.bfloat16, 128, PREFILL),
        (QuantConfig(bits=2, group_size=16), torch.bfloat16, 5, "fp32-dequant"),
        (QuantConfig(bits=2, group_size=16), torch.bfloat16, 40, PREFILL),
        # with bf16 hardware the fused kernels keep more rows: int8pack up to 40, int4pack 96
        (QuantConfig(bits=8), torch.bfloat16, 39, ("fp32-dequant", "int8pack")),
        (QuantConfig(bits=8), torch.bfloat16, 40, PREFILL),
        (QuantConfig(bits=4), torch.bfloat16, 95, ("fp32-dequant", "int4pack")),
        (QuantConfig(bits=4), torch.bfloat16, 96, PREFILL),
        (QuantConfig(bits=4, group_size=16), torch.bfloat16, 32, PREFILL),  # not fused: 32
        (QuantConfig(bits=4, group_size=16), torch.bfloat16, 31, "fp32-dequant"),
    ],
)
@pytest.mark.parametrize("hardware", [False, True], ids=["no-bf16-hw", "bf16-hw"])
def test_dispatch_and_agreement(monkeypatch, config, dtype, rows, expected, hardware):
    """CPU dispatch without and with bf16 matmul hardware (a pair where they differ)."""
    monkeypatch.setattr(kernels, "bf16_matmul_hardware", lambda: hardware)
    q = layer(config)
    x = torch.randn(rows, q.in_features).to(dtype)
    assert select_kernel(q, x) == (expected[hardware] if isinstance(expected, tuple) else expected)
    assert_agrees(q(x), q, x)


#: A layer each kernel accepts.
KERNEL_CONFIGS = {
    "dequant": QuantConfig(bits=2, group_size=16),
    "fp32-dequant": QuantConfig(bits=8, scheme="asym"),
    "bf16-dequant": QuantConfig(bits=4, group_size=32),
    "int8pack": QuantConfig(bits=8),
    "int8-native": QuantConfig(bits=8),
    "int4pack": QuantConfig(bits=4, group_size=32),
}


@pytest.mark.parametrize("name", kernel_names())
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
    assert select_kernel(q, x) == "fp32-dequant"
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


def shaped(config, in_features, out_features):
    """A layer on the meta device: the kernel choice reads its settings and shape only."""
    with torch.device("meta"):
        return QuantLinear.from_weight(torch.empty(out_features, in_features), None, config)


INT4_G32 = QuantConfig(bits=4, group_size=32)


@pytest.mark.parametrize(
    ("config", "in_features", "out_features", "dtype", "rows", "expected"),
    [
        (INT4_G32, 256, 64, torch.bfloat16, 1, "int4pack"),
        (INT4_G32, 256, 64, torch.bfloat16, CUDA_INT4PACK_MAX_M - 1, "int4pack"),
        (INT4_G32, 256, 64, torch.bfloat16, CUDA_INT4PACK_MAX_M, "dequant"),
        (INT4_G32, 256, 64, torch.float16, 1, "dequant"),
        (INT4_G32, 256, 64, torch.float32, 1, "dequant"),
        (INT4_G32, 384, 40, torch.bfloat16, 1, "int4pack"),  # 40 rows: enough for tinygemm
        (INT4_G32, 384, 36, torch.bfloat16, 1, "dequant"),  # out % 8 != 0
        (INT4_G32, 192, 64, torch.bfloat16, 1, "dequant"),  # in % (16 * 8) != 0
        (QuantConfig(bits=4, group_size=16), 256, 64, torch.bfloat16, 1, "dequant"),
        (QuantConfig(bits=8), 256, 64, torch.bfloat16, 1, "dequant"),  # no faster there
        (QuantConfig(bits=2, group_size=32), 256, 64, torch.bfloat16, 1, "dequant"),
    ],
)
def test_cuda_dispatch_follows_the_measured_rules(
    config, in_features, out_features, dtype, rows, expected
):
    """On CUDA: tinygemm int4 for bf16 decode-sized calls (below CUDA_INT4PACK_MAX_M rows)
    of shapes it takes (out % 8, in % 128); everything else dequantizes. Decided from the
    device's name, so checked without a GPU (test_cuda_dispatch_and_agreement runs them)."""
    q = shaped(config, in_features, out_features)
    assert choose_kernel(q, "cuda", dtype, rows) == expected


def test_the_cpu_int4_kernel_wants_16_output_rows_where_cuda_wants_8():
    q = shaped(INT4_G32, 384, 40)
    assert choose_kernel(q, "cpu", torch.bfloat16, 1) == "fp32-dequant"
    assert choose_kernel(q, "cuda", torch.bfloat16, 1) == "int4pack"


@pytest.mark.parametrize("device", ["mps", "xpu", "meta"])
def test_other_devices_dequantize(device):
    assert choose_kernel(shaped(INT4_G32, 256, 64), device, torch.bfloat16, 1) == "dequant"
    assert choose_kernel(shaped(QuantConfig(bits=8), 256, 64), device, torch.bfloat16, 1) == (
        "dequant"
    )


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((96,), "int8pack"),  # one token, as F.linear takes it
        ((1, 1, 96), "int8pack"),
        ((4, 7, 96), "int8pack"),  # 28 tokens: still decode-sized
        ((4, 8, 96), "fp32-dequant"),  # 32 tokens in all: prefill, whatever the batch
        ((2, 2, 8, 96), "fp32-dequant"),
        ((PREFILL_MIN_M - 1, 96), "int8pack"),
    ],
)
def test_the_token_count_is_every_row_of_the_input(shape, expected):
    q = shaped(QuantConfig(bits=8), 96, 48)
    assert select_kernel(q, torch.empty(shape, dtype=torch.bfloat16)) == expected


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (QuantConfig(bits=8), torch.bfloat16),
        (QuantConfig(bits=2, group_size=16), torch.bfloat16),
        (QuantConfig(bits=8, scheme="asym"), torch.bfloat16),
    ],
)
@pytest.mark.parametrize("bf16", [True, False])
def test_gpus_run_bf16_or_fp16_where_bf16_is_missing(monkeypatch, config, expected, bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    assert preferred_dtype(config, "cuda") == (expected if bf16 else torch.float16)


class TinyModel(torch.nn.Module):
    """Three quantized layers and a float head under a root with a `config`, as in
    transformers models (the root is no quantized layer)."""

    def __init__(self):
        super().__init__()
        self.config = QuantConfig(bits=4)
        self.int8 = layer(QuantConfig(bits=8))
        self.int4 = layer(QuantConfig(bits=4, group_size=32))
        self.int2 = layer(QuantConfig(bits=2, group_size=16))
        self.head = torch.nn.Linear(48, 10)


def test_kernel_plan_counts_the_quantized_layers_per_kernel():
    model = TinyModel()
    assert kernel_plan(model, "cpu", torch.bfloat16, 1) == {
        "int8pack": 1,
        "int4pack": 1,
        "fp32-dequant": 1,
    }
    assert kernel_plan(model, "cpu", torch.bfloat16, PREFILL_MIN_M) == {"fp32-dequant": 3}
    assert kernel_plan(model, "cpu", torch.float32, 1) == {"fp32-dequant": 3}
    assert kernel_plan(model, "cuda", torch.bfloat16, 1) == {"dequant": 3}  # in 96: no tinygemm


def test_prepare_kernels_makes_the_int4_layouts_decode_will_use_and_nothing_else():
    model = TinyModel()
    prepare_kernels(model, "cpu", torch.float32)  # fp32 activations: no fused kernel
    assert not any("_int4pack" in m.__dict__ for m in model.modules())
    prepare_kernels(model, "cpu", torch.bfloat16)
    assert [name for name, m in model.named_modules() if "_int4pack" in m.__dict__] == ["int4"]
    weight_packed, packed, scales = model.int4.__dict__["_int4pack"]
    assert weight_packed is model.int4.weight_packed
    reused = int4pack_weight(model.int4)  # what a decode step asks for: the same tensors
    assert reused[0] is packed and reused[1] is scales


def in_a_new_thread(function):
    """`function()` run in a fresh thread, whose workspace starts empty (earlier tests
    leave theirs in this one)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function).result()


#: Layers whose zero points are packed along the rows (8 or 16 to a word), per channel or
#: group, or unpacked int8, or per tensor: what a tile of rows must slice differently.
TILED_CONFIGS = [
    QuantConfig(bits=4, group_size=32),
    QuantConfig(bits=2, group_size=16),
    QuantConfig(bits=4, granularity="channel"),
    QuantConfig(bits=8, scheme="asym"),
    QuantConfig(bits=4, granularity="tensor", scheme="asym"),
    QuantConfig(bits=8, granularity="tensor"),
]


@pytest.mark.parametrize("config", TILED_CONFIGS, ids=lambda c: c.label)
def test_integers_of_a_row_range_are_those_rows_of_the_whole(config):
    """Every start and stop, including ranges that begin and end inside a zero-point word:
    an off-by-one word or offset would shift a tile's zero points by rows."""
    q = layer(config, 64, 37)
    whole, zero = q.integers()
    for start in range(37):
        for stop in range(start + 1, 38):
            part, part_zero = q.integers(slice(start, stop))
            assert torch.equal(part, whole[start:stop])
            if zero is None:
                assert part_zero is None
            elif zero.numel() == 1:  # per tensor: one zero point for every row
                assert torch.equal(part_zero, zero)
            else:
                assert torch.equal(part_zero, zero[start:stop])


@pytest.mark.parametrize("config", TILED_CONFIGS, ids=lambda c: c.label)
@pytest.mark.parametrize("name", ["fp32-dequant", "bf16-dequant"])
def test_tiled_kernels_agree_tile_by_tile(monkeypatch, config, name):
    """Tiles of 5 rows (37 = 7 x 5 + 2: a short last tile, starts inside zero-point words):
    float32 tiles give the float32 reference within float32 rounding of the sums (the
    tiles' matmuls may add in another order), bf16 ones `assert_agrees`'s bound."""
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 5 * 64 + 3)
    q = layer(config, 64, 37)
    x = torch.randn(40, 64)
    if name == "fp32-dequant":
        exact = reference(q, x)
        magnitude = x.abs() @ weight_terms(q).T + q.bias.float().abs()
        assert (KERNELS[name](q, x) - exact).abs().le(64 * 2**-23 * magnitude).all()
    else:
        x = x.bfloat16()
        assert_agrees(KERNELS[name](q, x), q, x)


def test_tiled_kernels_reuse_one_tile_sized_workspace_per_thread():
    """The tile goes into the thread's float32 buffer, which grows to the largest tile and is
    reused (a fresh one per call costs page faults); it is a tile, not a whole weight."""
    small = layer(QuantConfig(bits=4, granularity="channel"), 64, 16)
    big = layer(QuantConfig(bits=8, scheme="asym"), 96, 48)
    x_big, x_small = torch.randn(40, 96), torch.randn(40, 64)
    cpu = torch.device("cpu")

    def buffer():
        return _workspaces.buffers[cpu, torch.float32]

    def run():
        assert torch.equal(fp32_dequant(small, x_small), reference(small, x_small))
        first = buffer()
        assert first.numel() == 16 * 64
        assert torch.equal(fp32_dequant(small, x_small), reference(small, x_small))
        assert buffer() is first  # same size: kept
        assert torch.equal(fp32_dequant(big, x_big), reference(big, x_big))
        grown = buffer()  # a larger layer: a larger buffer
        assert grown.numel() == 48 * 96
        assert torch.equal(fp32_dequant(small, x_small), reference(small, x_small))
        assert buffer() is grown  # the large one, reused
        return grown.data_ptr()

    in_a_new_thread(run)
    huge = layer(QuantConfig(bits=8, scheme="asym"), 1024, 2048)

    def huge_call():
        assert_agrees(fp32_dequant(huge, x := torch.randn(1, 1024)), huge, x)
        return buffer().numel()

    assert in_a_new_thread(huge_call) == TILE_ELEMENTS  # 256 of its 2048 rows at a time
    fp32_dequant(big, x_big)
    assert in_a_new_thread(run) != buffer().data_ptr()  # each thread its own


def test_fp32_dequant_returns_the_activation_dtype():
    q = layer(QuantConfig(bits=8, scheme="asym"))
    x = torch.randn(40, q.in_features).bfloat16()
    out = fp32_dequant(q, x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference(q, x).bfloat16())  # fp32 math, one rounding at the end


@pytest.mark.parametrize("name", kernel_names())
def test_every_kernel_takes_a_single_token_as_a_1d_input(name):
    q = layer(KERNEL_CONFIGS[name])
    x = torch.randn(q.in_features).bfloat16()
    out = KERNELS[name](q, x)
    assert out.shape == (q.out_features,)
    assert torch.equal(out, KERNELS[name](q, x[None])[0])


@pytest.mark.parametrize("name", ["fp32-dequant", "bf16-dequant"])
def test_tiled_kernels_run_and_backpropagate_outside_no_grad(monkeypatch, name):
    """A forward outside `torch.no_grad` (activations that require grad: a model called
    plainly) must run, and give activations their gradient: ``d sum(xWᵀ)/dx`` is the sum of
    W's rows. Several tiles, so each must be kept for the backward."""
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 5 * 96)
    q = layer(QuantConfig(bits=4, group_size=32), 96, 37)
    dtype = torch.float32 if name == "fp32-dequant" else torch.bfloat16
    x = torch.randn(3, 96, dtype=dtype, requires_grad=True)
    out = KERNELS[name](q, x)
    assert_agrees(out.detach(), q, x.detach())
    out.float().sum().backward()
    expected = q.dequantize_weight(torch.float32).sum(0).expand(3, -1)
    assert torch.allclose(x.grad.float(), expected, rtol=2**-7, atol=2**-7)
