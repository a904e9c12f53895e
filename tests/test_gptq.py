"""GPTQ (`quantize --method gptq`): the algorithm against an independent reference written
from the paper's Algorithm 1, its error against round-to-nearest on the layers' own
activations, the block-by-block streaming walk, the calibration text's checks, and the
output's loading by quantcli and transformers."""

import json

import pytest
import torch
from cli_checks import assert_one_line_error, run_main
from tiny_models import build, char_tokenizer
from transformers import AutoModelForCausalLM

import quantcli.models.gptq as gptq_walk
from quantcli import QuantConfig
from quantcli.checkpoint import read_all_headers, weight_files
from quantcli.models.calibration import calibration_set, read_calibration
from quantcli.models.gptq import GPTQSettings, find_blocks
from quantcli.models.loading import load_quantized
from quantcli.models.source import resolve_model
from quantcli.models.streaming import GPTQ_RECORD, quantize_checkpoint
from quantcli.nn.qlinear import QuantLinear
from quantcli.tensor.gptq import gptq_quantize
from quantcli.tensor.quantize import int_range, quantize

CONFIGS = {
    "int8-sym-channel": QuantConfig(bits=8),
    "int8-sym-tensor": QuantConfig(bits=8, granularity="tensor"),
    "int4-asym-g32": QuantConfig(bits=4),
    "int4-sym-g16": QuantConfig(bits=4, scheme="sym", group_size=16),
    "int4-asym-channel": QuantConfig(bits=4, granularity="channel"),
    "int2-asym-g16": QuantConfig(bits=2, group_size=16),
    "int2-sym-g32": QuantConfig(bits=2, scheme="sym"),
}

TEXT = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The hallway "
    "smelt of boiled cabbage and old rag mats. At one end of it a coloured poster, too large "
    "for indoor display, had been tacked to the wall. "
) * 12


def reference_gptq(weight, hessian, config, damp=0.01):
    """GPTQ as the paper's Algorithm 1 states it, one column at a time with no lazy batches,
    in float64. Only the scales come from quantcli (its format): per tensor and channel from
    the whole weight, per group from the group's current (error-updated) weights."""
    w = weight.double().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # H⁻¹ = UᵀU, U upper
    q_min, q_max = int_range(config.bits)
    codes = torch.zeros(w.shape, dtype=torch.int8)

    def scale_zero(values, granularity):
        q = quantize(values.float(), config.bits, config.scheme, granularity, dtype=torch.float32)
        zero = q.zero_point if q.zero_point is not None else torch.zeros_like(q.scale)
        return (
            q.scale.double().reshape(-1, 1)[:, 0].expand(len(w)),
            zero.double().reshape(-1, 1)[:, 0].expand(len(w)),
        )

    if config.granularity.value != "group":
        scale, zero = scale_zero(weight, config.granularity)
    for j in range(w.shape[1]):
        if config.granularity.value == "group" and j % config.group_size == 0:
            scale, zero = scale_zero(w[:, j : j + config.group_size], "channel")
        q = torch.clamp(torch.round(w[:, j] / scale + zero), q_min, q_max)
        codes[:, j] = q.to(torch.int8)
        error = (w[:, j] - (q - zero) * scale) / u[j, j]
        w[:, j:] -= torch.outer(error, u[j, j:])
    return codes


def output_error(weight, restored, hessian):
    """‖(W − Ŵ)X‖ up to a constant factor, from H ∝ XᵀX."""
    delta = (weight - restored).double()
    return float(torch.einsum("oi,ij,oj->", delta, hessian.double(), delta).sqrt())


def correlated_inputs(rows=512, width=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) * 0.3 + torch.eye(width)
    x = torch.randn(rows, width, generator=generator) @ mixing
    x[:, 5] = 0  # a dead input
    return x


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_papers_algorithm_and_beats_round_to_nearest(name):
    config = CONFIGS[name]
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 64, generator=generator)
    x = correlated_inputs()
    hessian = 2 * x.T @ x / len(x)
    ours = gptq_quantize(
        weight, hessian, config.bits, config.scheme, config.granularity, config.group_size,
        torch.float32, block_size=16,
    )  # fmt: skip
    reference = reference_gptq(weight, hessian, config)
    # float32 against float64: a value at a rounding tie may go either way
    assert (ours.qdata == reference).float().mean() > 0.99
    assert torch.all(ours.dequantize(torch.float32)[:, 5] == 0)  # the dead input's column
    rtn = quantize(weight, config.bits, config.scheme, config.granularity, config.group_size)
    ours_error = output_error(weight, ours.dequantize(torch.float32), hessian)
    assert ours_error < output_error(weight, rtn.dequantize(torch.float32), hessian)


@pytest.mark.parametrize("name", ["int8-sym-channel", "int4-asym-g32", "int2-asym-g16"])
def test_identity_hessian_is_round_to_nearest_bit_for_bit(name):
    config = CONFIGS[name]
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    args = (weight, config.bits, config.scheme, config.granularity, config.group_size)
    ours = gptq_quantize(args[0], torch.eye(64), *args[1:], torch.float32)
    rtn = quantize(*args, dtype=torch.float32)
    assert torch.equal(ours.qdata, rtn.qdata) and torch.equal(ours.scale, rtn.scale)


def test_block_size_changes_nothing():
    """Lazy batches only postpone updates; group scales see every update already owed."""
    config = CONFIGS["int4-asym-g32"]
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    x = correlated_inputs(seed=3)
    hessian = 2 * x.T @ x / len(x)
    args = (weight, hessian, 4, config.scheme, config.granularity, 32, torch.float32)
    codes = [gptq_quantize(*args, block_size=size).qdata for size in (1, 7, 128)]
    assert all((c == codes[0]).float().mean() > 0.99 for c in codes)


@pytest.fixture(scope="module")
def calibration():
    return calibration_set(read_calibration(None), char_tokenizer(), 6, 40)


def gptq_checkpoint(saved_models, out, arch, config, calibration):
    settings = GPTQSettings(calibration)
    quantize_checkpoint(resolve_model(str(saved_models(arch))), out, config, gptq=settings)
    return out


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
def test_every_layer_loses_less_than_round_to_nearest_on_its_activations(
    arch, saved_models, calibration, tmp_path, monkeypatch
):
    seen = {}
    original = gptq_walk.gptq_quantize

    def recording(weight, hessian, *args, **kwargs):
        result = original(weight, hessian, *args, **kwargs)
        seen[len(seen)] = (weight.clone(), hessian.clone(), result, args)
        return result

    monkeypatch.setattr(gptq_walk, "gptq_quantize", recording)
    config = QuantConfig(bits=4)
    gptq_checkpoint(saved_models, tmp_path / "q", arch, config, calibration)
    assert len(seen) == len(_linears(build(arch)))
    for weight, hessian, result, args in seen.values():
        rtn = quantize(weight, *args)
        gptq_error = output_error(weight, result.dequantize(torch.float32), hessian)
        assert gptq_error < output_error(weight, rtn.dequantize(torch.float32), hessian)


def _linears(model):
    _, blocks = find_blocks(model)
    return [
        m for m in blocks.modules() if isinstance(m, torch.nn.Linear) or "Conv1D" in str(type(m))
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streaming_agrees_with_the_reference_block_by_block(
    arch, saved_models, calibration, tmp_path
):
    """Each block's layers, as the checkpoint holds them, are what the reference gives on
    the inputs that block receives from the blocks before it, quantized (run here by
    transformers' whole model, not by the walk)."""
    config = QuantConfig(bits=4, scheme="sym")
    out = gptq_checkpoint(saved_models, tmp_path / "q", arch, config, calibration)
    quantized, _ = load_quantized(resolve_model(str(out)), dtype=None)
    floats = build(arch)
    name, float_blocks = find_blocks(floats)
    quantized_blocks = quantized.get_submodule(name)
    for index in range(len(float_blocks)):
        hybrid = build(arch)
        blocks = hybrid.get_submodule(name)
        for before in range(index):
            blocks[before] = quantized_blocks[before]
        inputs = {}
        layers = {n: m for n, m in blocks[index].named_modules() if n and _is_linear(m)}
        hooks = [
            m.register_forward_pre_hook(
                lambda _m, a, n=n, seen=inputs: seen.setdefault(n, []).append(a[0])
            )
            for n, m in layers.items()
        ]
        with torch.no_grad():
            hybrid(input_ids=calibration.input_ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        for layer_name, module in layers.items():
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer_name]])
            weight = module.weight.t() if arch == "gpt2" else module.weight
            reference = reference_gptq(weight.detach(), 2 * x.T @ x / len(x), config)
            stored = quantized_blocks[index].get_submodule(layer_name)
            assert isinstance(stored, QuantLinear)
            codes, _ = stored.integers()
            assert (codes == reference).float().mean() > 0.99, (index, layer_name)


def _is_linear(module):
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def test_runs_are_deterministic(saved_models, calibration, tmp_path):
    config = QuantConfig(bits=4)
    first = gptq_checkpoint(saved_models, tmp_path / "a", "llama", config, calibration)
    second = gptq_checkpoint(saved_models, tmp_path / "b", "llama", config, calibration)
    files = [weight_files(folder) for folder in (first, second)]
    assert [p.read_bytes() for p in files[0]] == [p.read_bytes() for p in files[1]]


def test_the_output_records_the_method_and_the_calibration(saved_models, calibration, tmp_path):
    out = gptq_checkpoint(saved_models, tmp_path / "q", "llama", QuantConfig(bits=4), calibration)
    _, metadata = read_all_headers(weight_files(out))
    assert metadata["quantization_method"] == "gptq"
    recorded = json.loads(metadata["gptq"])
    assert recorded["calibration"] == calibration.describe()
    assert recorded["calibration"]["samples"] == 6 and recorded["calibration"]["seq_len"] == 40
    record = json.loads((out / GPTQ_RECORD).read_text())
    assert record["seconds"] > 0 and record["damp"] == 0.01


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("name", ["int8-sym-channel", "int4-sym-g16", "int2-sym-g32"])
def test_transformers_and_quantcli_load_it_with_equal_logits(
    arch, name, saved_models, calibration, tmp_path
):
    pytest.importorskip("compressed_tensors")
    out = gptq_checkpoint(saved_models, tmp_path / "q", arch, CONFIGS[name], calibration)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_quantized(resolve_model(str(out)), dtype=None)
    ids = calibration.input_ids[:2]
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_quantize_method_gptq_on_the_command_line(saved_models, tmp_path, monkeypatch, capsys):
    text = tmp_path / "calibration.jsonl"
    text.write_text("\n".join(json.dumps({"text": TEXT[i::3]}) for i in range(3)))
    out = tmp_path / "q"
    result = run_main(
        monkeypatch, capsys, "quantize", saved_models("llama"), "--out", out, "--bits", "4",
        "--method", "gptq", "--calibration", text, "--samples", "4", "--seq-len", "32", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["method"] == "gptq"
    assert json.loads((out / GPTQ_RECORD).read_text())["calibration"]["name"] == text.name


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "holds no text"),
        (b"\x00\x01\x02binary\xff", "binary"),
        (b"short text", "fewer than one sample"),
        (b'{"text": 3}\n', "no string field 'text'"),
        (b"\xff\xfe not utf-8", "not UTF-8"),
    ],
    ids=["empty", "binary", "too-short", "jsonl-without-text", "not-utf8"],
)
def test_a_bad_calibration_file_is_one_line_exit_2_nothing_written(
    content, fragment, saved_models, tmp_path, monkeypatch, capsys
):
    text = tmp_path / "calibration.txt"
    text.write_bytes(content)
    source, out = saved_models("llama"), tmp_path / "q"
    capsys.readouterr()  # building the model printed
    result = run_main(
        monkeypatch, capsys, "quantize", source, "--out", out,
        "--method", "gptq", "--calibration", text, "--seq-len", "64",
    )  # fmt: skip
    assert_one_line_error(result, 2, fragment)
    assert not out.exists() and not list(tmp_path.glob(".q*"))


@pytest.mark.parametrize(
    ("arch", "fragment"),
    [("t5", "encoder-decoder"), ("bert", "cannot reach cls.predictions.transform.dense")],
)
def test_a_model_it_cannot_walk_is_refused_with_exit_4(
    arch, fragment, saved_models, tmp_path, monkeypatch, capsys
):
    """Never a silent fallback to round to nearest: one line naming what is missing."""
    source, out = saved_models(arch), tmp_path / "q"
    capsys.readouterr()  # building the model printed
    result = run_main(
        monkeypatch, capsys, "quantize", source, "--out", out, "--method", "gptq",
        "--seq-len", "16",
    )  # fmt: skip
    assert_one_line_error(result, 4, fragment)
    assert "--method rtn" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_the_model_card_names_the_method_the_calibration_and_the_time(
    saved_models, calibration, tmp_path
):
    from quantcli.hub import model_card
    from quantcli.models.loading import summarize_folder

    out = gptq_checkpoint(saved_models, tmp_path / "q", "llama", QuantConfig(bits=4), calibration)
    card = model_card(out, summarize_folder(out), "me/q")
    assert "| method | GPTQ (damp 0.01, block size 128, no act-order) |" in card
    assert f"| calibration | 6 × 40 tokens of {calibration.source.name} |" in card
    assert calibration.source.sha256 in card and "| GPTQ time |" in card


def test_the_head_has_no_block_to_calibrate_in_and_is_rounded_to_nearest_on_record(
    saved_models, calibration, tmp_path
):
    config = QuantConfig(bits=4, quantize_head=True)
    out = gptq_checkpoint(saved_models, tmp_path / "q", "opt", config, calibration)
    _, metadata = read_all_headers(weight_files(out))
    assert json.loads(metadata["gptq"])["rtn_layers"] == ["lm_head"]
    source = resolve_model(str(saved_models("opt")))
    rtn = quantize_checkpoint(source, tmp_path / "rtn", config).output
    ours, _ = load_quantized(resolve_model(str(out)), dtype=None)
    theirs, _ = load_quantized(resolve_model(str(rtn)), dtype=None)
    assert torch.equal(ours.lm_head.integers()[0], theirs.lm_head.integers()[0])
