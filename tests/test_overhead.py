"""`QuantLinear` chooses its kernels once per device, dtype and size class and prepares their
operands once; whatever changes its tensors (assigning, loading, moving, converting,
copying the layer) makes it choose and prepare again, so outputs always follow the current
weights. Agreement is `test_kernels.assert_agrees` (its error analysis is there)."""

import copy

import pytest
import torch
from conftest import needs_native_int8
from test_kernels import assert_agrees, layer, shaped

from quantcli import QuantConfig, QuantLinear
from quantcli.nn import kernels
from quantcli.nn.kernels import PREFILL_MIN_M, choose_kernel, decode_rows

#: Layers whose decode call runs each CPU kernel with a prepared operand.
FUSED = {
    # float32 scales: the bf16 ones int8pack takes are a prepared copy, which can go stale
    "int8pack": QuantConfig(bits=8, dtype=torch.float32),
    "int4pack": QuantConfig(bits=4, group_size=32),
    # float32 scales again: it takes a float32 copy, which must follow a bf16 layer's too
    "int8-native": QuantConfig(bits=8, dtype=torch.float32),
}
#: The kernel names of `FUSED` as test parameters (quantcli's own where it builds).
FUSED_NAMES = [
    pytest.param(name, marks=needs_native_int8) if name == "int8-native" else name
    for name in FUSED
]


@pytest.fixture(autouse=True)
def native_when_named(request, monkeypatch):
    """Tests given quantcli's int8 kernel by name run with it on, as where it builds."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("name") == "int8-native":
        monkeypatch.setattr(kernels, "native_int8", lambda: True)


def decode_and_prefill(q, dtype=torch.bfloat16):
    return torch.randn(1, 1, q.in_features).to(dtype), torch.randn(2, 20, q.in_features).to(dtype)


def other_weights(q, seed=1):
    """A state dict of the same shape and config with different random weights."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(q.in_features, q.out_features).to(torch.bfloat16)
    return QuantLinear.from_linear(linear, q.config).state_dict()


@pytest.mark.parametrize("config", [*FUSED.values(), QuantConfig(bits=2, group_size=16)])
def test_the_kernel_is_chosen_once_per_device_dtype_and_size_class(monkeypatch, config):
    """Counted, not timed: a decode and a prefill call each choose their kernel on the first
    call only; another dtype chooses again, once; a move (here `.float()`) starts over."""
    chosen = []

    def counting(*args):
        chosen.append(args[1:])
        return choose_kernel(*args)

    monkeypatch.setattr(kernels, "choose_kernel", counting)
    q = layer(config)
    decode, prefill = decode_and_prefill(q)
    for _ in range(5):
        assert_agrees(q(decode), q, decode)
        assert_agrees(q(prefill), q, prefill)
    assert chosen == [("cpu", torch.bfloat16, PREFILL_MIN_M - 1), ("cpu", torch.bfloat16, 32)]
    for _ in range(3):
        q(decode.half())
    assert len(chosen) == 4
    q.float()
    q(decode)
    assert len(chosen) == 6


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_loading_weights_in_place_renews_the_prepared_operands(name):
    """`load_state_dict` without assign copies into the same tensors: the prepared int4
    layout (cached on the tensor's identity before) and int8 scales must not outlive it."""
    q = layer(FUSED[name])
    decode, _ = decode_and_prefill(q)
    before = q(decode)
    q.load_state_dict(other_weights(q))
    assert kernels.select_kernel(q, decode) == name
    assert_agrees(q(decode), q, decode)
    assert not q(decode).equal(before)


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_assigning_a_tensor_renews_the_prepared_operands(name):
    q = layer(FUSED[name])
    decode, _ = decode_and_prefill(q)
    q(decode)
    q.weight_scale = q.weight_scale * 2  # stale prepared scales would give half the output
    q.bias = -q.bias
    assert_agrees(q(decode), q, decode)
    assert_agrees(q(decode), q, decode)  # and the renewed operands are kept


@pytest.mark.parametrize("name", FUSED_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_converting_the_layer_renews_the_prepared_operands(name, dtype):
    """`.to(dtype)` converts the scales and bias into new tensors; the next call prepares
    from those (its bias in the activation dtype, whatever the layer's)."""
    q = layer(FUSED[name])
    decode, _ = decode_and_prefill(q)
    q(decode)
    q.to(dtype)
    assert q._kernels == {} and "_int4pack" not in q.__dict__
    assert_agrees(q(decode), q, decode)
    _, (_, operands), _ = kernels.plan(q, decode.device, decode.dtype)
    assert operands[-1].dtype == torch.bfloat16  # the bias, made for bf16 activations
    assert q.weight_scale.dtype == dtype and q.bias.dtype == dtype


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_a_copy_prepares_its_own_operands(name):
    q = layer(FUSED[name])
    decode, _ = decode_and_prefill(q)
    before = q(decode)
    twin = copy.deepcopy(q)
    twin.load_state_dict(other_weights(q))
    assert_agrees(twin(decode), twin, decode)
    assert q(decode).equal(before)


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_the_state_dict_holds_the_checkpoint_tensors_only(name):
    q = layer(FUSED[name])
    before = {key: value.clone() for key, value in q.state_dict().items()}
    for x in decode_and_prefill(q):
        q(x)
    after = q.state_dict()
    assert after.keys() == before.keys()
    assert all(after[key].equal(value) for key, value in before.items())


CHOICES = [
    QuantConfig(bits=8),
    QuantConfig(bits=8, scheme="asym"),
    QuantConfig(bits=4, group_size=32),
    QuantConfig(bits=4, group_size=128, scheme="sym"),
    QuantConfig(bits=2, group_size=16),
]


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", CHOICES, ids=lambda c: c.label)
@pytest.mark.parametrize("hardware", [False, True], ids=["no-bf16-hw", "bf16-hw"])
def test_one_kernel_serves_each_size_class(monkeypatch, device, dtype, config, hardware):
    """The cache keeps one kernel for fewer than `decode_rows` rows and one for the rest:
    this holds only while `choose_kernel` compares rows with no other threshold."""
    monkeypatch.setattr(kernels, "bf16_matmul_hardware", lambda: hardware)
    q = shaped(config, 256, 64)
    limit = decode_rows(q, device)
    decode = {choose_kernel(q, device, dtype, rows) for rows in range(limit)}
    prefill = {choose_kernel(q, device, dtype, rows) for rows in range(limit, 4 * limit + 2)}
    assert len(decode) <= 1 and len(prefill) == 1


def recording_runs(monkeypatch):
    """The names of the kernels `QuantLinear.forward` runs, in order (wrapping `_KERNELS`
    before any layer prepares, so the plans hold the wrappers)."""
    ran = []
    for name, (run, prepare) in list(kernels._KERNELS.items()):

        def recorded(layer, x, *operands, name=name, run=run):
            ran.append(name)
            return run(layer, x, *operands)

        monkeypatch.setitem(kernels._KERNELS, name, (recorded, prepare))
    return ran


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((96,), "int8pack"),
        ((1, 1, 96), "int8pack"),
        ((PREFILL_MIN_M - 1, 96), "int8pack"),  # one element short of the limit
        ((4, 8, 96), "fp32-dequant"),  # exactly PREFILL_MIN_M rows: prefill
        ((2, 2, 8, 96), "fp32-dequant"),
        ((3, 40, 96), "fp32-dequant"),
    ],
)
def test_each_call_runs_the_kernel_of_its_size_class(monkeypatch, shape, expected):
    """Agreement alone cannot tell int8pack from fp32-dequant (both are within bf16
    rounding): the kernel that ran is recorded, for the size classes the measurements in
    kernels.py fix (fused below PREFILL_MIN_M rows on CPU, fp32 from there)."""
    ran = recording_runs(monkeypatch)
    q = layer(QuantConfig(bits=8))
    x = torch.randn(shape).bfloat16()
    for _ in range(2):  # the first call plans, the second finds the plan
        assert_agrees(q(x), q, x)
    assert ran == [expected, expected]


def test_the_decode_and_prefill_kernels_alternate_per_call(monkeypatch):
    ran = recording_runs(monkeypatch)
    q = layer(QuantConfig(bits=4, group_size=32))
    decode, prefill = decode_and_prefill(q)
    for x in (decode, prefill, decode, prefill):
        assert_agrees(q(x), q, x)
    assert ran == ["int4pack", "fp32-dequant"] * 2


@pytest.mark.parametrize("config", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32)])
def test_a_layer_on_a_device_without_size_classes_runs(config):
    """Devices other than CPU and CUDA (here meta, as when a model is traced for shapes)
    have no size classes (`decode_rows` 0): every call dequantizes, and a call must not fail."""
    q = QuantLinear.from_weight(
        torch.empty(48, 96, device="meta"), torch.empty(48, device="meta"), config
    )
    for rows in (1, 40):
        out = q(torch.empty(rows, 96, device="meta", dtype=torch.bfloat16))
        assert out.shape == (rows, 48) and out.device.type == "meta"
        assert out.dtype == torch.bfloat16


def test_a_call_after_the_first_does_not_plan_again(monkeypatch):
    """Counted: once planned, `forward` finds the plan in the layer without calling `plan`."""
    from quantcli.nn import qlinear

    planned = []

    def counting(*args):
        planned.append(args[1:])
        return kernels.plan(*args)

    monkeypatch.setattr(qlinear, "plan", counting)
    q = layer(FUSED["int8pack"])
    decode, prefill = decode_and_prefill(q)
    for _ in range(4):
        assert_agrees(q(decode), q, decode)
        assert_agrees(q(prefill), q, prefill)
    assert planned == [(decode.device, torch.bfloat16)]


@pytest.mark.parametrize("name", FUSED_NAMES)
def test_plans_and_operands_are_made_once_and_kept(monkeypatch, name):
    """Counted: planning again (`prepare_kernels` twice) chooses nothing new, and a kernel
    called by name (`KERNELS`) prepares its operands on the first call only."""
    made = []
    run, prepare = kernels._KERNELS[name]

    def counting(layer, dtype):
        made.append(dtype)
        return prepare(layer, dtype)

    monkeypatch.setitem(kernels._KERNELS, name, (run, counting))
    chosen = []

    def choosing(*args):
        chosen.append(args[1:])
        return choose_kernel(*args)

    monkeypatch.setattr(kernels, "choose_kernel", choosing)
    q = layer(FUSED[name])
    model = torch.nn.Sequential(q)
    for _ in range(3):
        kernels.prepare_kernels(model, "cpu", torch.bfloat16)
    assert len(chosen) == 2 and made == [torch.bfloat16]
    x = torch.randn(3, q.in_features).bfloat16()
    for _ in range(3):
        assert_agrees(kernels.KERNELS[name](q, x), q, x)
    assert made == [torch.bfloat16]


def test_a_kernel_by_name_prepares_for_the_activation_dtype():
    """int8pack takes its scales in the activation dtype: a layer with float32 scales run
    on bf16 activations needs them converted (the kernel refuses float32 scales)."""
    q = layer(FUSED["int8pack"])
    assert q.weight_scale.dtype == torch.float32
    x = torch.randn(3, q.in_features).bfloat16()
    assert_agrees(kernels.KERNELS["int8pack"](q, x), q, x)


@pytest.mark.parametrize("hardware", [False, True], ids=["no-bf16-hw", "bf16-hw"])
def test_size_classes_per_device(monkeypatch, hardware):
    """Where the decode class ends: CUDA at tinygemm's limit, CPU at PREFILL_MIN_M (with bf16
    hardware, per fused kernel), other devices nowhere (one class)."""
    monkeypatch.setattr(kernels, "bf16_matmul_hardware", lambda: hardware)
    int8, int4 = (shaped(FUSED[name], 256, 64) for name in ("int8pack", "int4pack"))
    two_bit = shaped(QuantConfig(bits=2, group_size=16), 256, 64)
    assert decode_rows(int4, "cuda") == kernels.CUDA_INT4PACK_MAX_M == 256
    assert decode_rows(int8, "cpu") == (40 if hardware else PREFILL_MIN_M)
    assert decode_rows(int4, "cpu") == (96 if hardware else PREFILL_MIN_M)
    assert decode_rows(two_bit, "cpu") == PREFILL_MIN_M == 32
    assert decode_rows(int4, "mps") == decode_rows(int4, "meta") == 0
