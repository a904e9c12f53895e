"""What load and generate choose for speed: activation dtype, kernels, layouts, compile."""

import json
from types import SimpleNamespace

import pytest
import torch
from cli_checks import run_quantcli
from conftest import BF16_MATMUL_HARDWARE, NATIVE_INT8, needs_native_int8
from tiny_models import char_tokenizer, sample_inputs

from quantcli import QuantConfig
from quantcli.models import generation
from quantcli.models.generation import generate_text
from quantcli.models.loading import load_quantized
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint
from quantcli.nn.kernels import kernel_plan, preferred_dtype


@pytest.fixture(scope="module")
def checkpoints(saved_models, tmp_path_factory):
    """The tiny Llama quantized three ways."""
    root = tmp_path_factory.mktemp("fast")
    configs = {
        "int8": QuantConfig(bits=8),
        "int4": QuantConfig(bits=4),
        "int2": QuantConfig(bits=2, group_size=16),
    }
    for name, config in configs.items():
        quantize_checkpoint(resolve_model(str(saved_models("llama"))), root / name, config)
    return root


def load(folder, **kwargs):
    return load_quantized(resolve_model(str(folder)), **kwargs)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (QuantConfig(bits=8), torch.bfloat16),  # int8pack decodes in bf16
        (QuantConfig(bits=8, granularity="tensor"), torch.bfloat16),
        (QuantConfig(bits=4, group_size=64), torch.bfloat16),  # int4pack
        (QuantConfig(bits=8, scheme="asym"), torch.float32),  # no fused kernel: fp32 is faster
        (QuantConfig(bits=4, group_size=16), torch.float32),
        (QuantConfig(bits=2), torch.float32),
    ],
)
def test_preferred_dtype_on_cpu(config, expected):
    assert preferred_dtype(config, "cpu") == expected


@pytest.mark.parametrize(
    "config", [QuantConfig(bits=8), QuantConfig(bits=8, scheme="asym"), QuantConfig(bits=2)]
)
def test_cpus_with_bf16_matmul_hardware_run_everything_in_bf16(bf16_hardware, config):
    """There prefill multiplies bf16 tiles (6x float32 at 512 rows), whatever the kernel."""
    assert preferred_dtype(config, "cpu") == torch.bfloat16


@pytest.mark.parametrize(
    ("scheme", "dtype", "decode"),
    [
        ("int8", torch.bfloat16, "int8pack"),
        ("int4", torch.bfloat16, "int4pack"),
        ("int2", torch.float32, "fp32-dequant"),
    ],
)
def test_auto_dtype_and_kernel_plan_after_load(checkpoints, scheme, dtype, decode):
    model, report = load(checkpoints / scheme)
    assert report.dtype == dtype
    assert model.model.embed_tokens.weight.dtype == dtype
    assert kernel_plan(model, "cpu", dtype, 1) == {decode: report.quantized}
    assert kernel_plan(model, "cpu", dtype, 64) == {"fp32-dequant": report.quantized}


def test_int4_layouts_are_made_at_load_and_match_the_stored_model(checkpoints):
    fast, _ = load(checkpoints / "int4")
    stored, _ = load(checkpoints / "int4", dtype=None)
    layer = fast.model.layers[0].mlp.down_proj
    assert "_int4pack" in layer.__dict__  # made by load, not by the first token
    ids = sample_inputs("llama", batch=1, length=1)["input_ids"]  # decode-sized: int4pack
    with torch.no_grad():
        got, want = fast(ids).logits.float(), stored(ids).logits.float()
    # bf16 activations against float32 ones: within a few percent of the logits' spread
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def test_generation_reports_prefill_and_decode_speed(checkpoints, monkeypatch):
    """A fake clock read at the start (0 s), at the first new token (4 s) and at the end
    (14 s): 6 new tokens, 5 of them decoded in 10 s, so 0.5 token/s, 6 / 14 overall."""
    readings = iter([0.0, 4.0, 14.0])
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    model, _ = load(checkpoints / "int8")
    result = generate_text(model, char_tokenizer(), "hello", max_new_tokens=6, chat=False)
    assert result.new_tokens == 6
    assert (result.first_token_seconds, result.seconds) == (4.0, 14.0)
    assert result.decode_tokens_per_second == 0.5
    assert result.tokens_per_second == 6 / 14


@pytest.mark.parametrize("scheme", ["int4", pytest.param("int8", marks=needs_native_int8)])
def test_compiled_decoding_gives_the_same_tokens(request, checkpoints, scheme):
    """int8 decodes with quantcli's own kernel, which the compiler traces as an opaque op."""
    if scheme == "int8":
        request.getfixturevalue("native_int8")
    model, _ = load(checkpoints / scheme)
    tokenizer = char_tokenizer()
    eager = generate_text(model, tokenizer, "hello", max_new_tokens=5, chat=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = generate_text(model, tokenizer, "hello", max_new_tokens=5, chat=False, compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert compiled.text == eager.text


quantcli = run_quantcli


def test_load_verbose_and_json_name_the_kernels(checkpoints):
    human = quantcli("load", checkpoints / "int8", "--verbose")
    assert human.returncode == 0, human.stderr
    decode = "int8-native" if NATIVE_INT8 else "int8pack"  # this machine's, as prefill's
    assert "bfloat16" in human.stdout and f"{decode} x14" in human.stdout
    prefill = "bf16-dequant" if BF16_MATMUL_HARDWARE else "fp32-dequant"
    assert f"{prefill} x14" in human.stdout
    summary = json.loads(quantcli("load", checkpoints / "int8", "--json", "--dtype", "fp32").stdout)
    assert summary["dtype"] == "float32"
    decode = "int8-native" if NATIVE_INT8 else "fp32-dequant"  # quantcli's takes float32 too
    assert summary["kernels"]["decode (1 token)"] == {decode: 14}


def test_generate_json_reports_speed_and_dtype(checkpoints):
    result = quantcli(
        "generate", checkpoints / "int4", "hi", "--max-new-tokens", "4", "--no-chat", "--json"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dtype"] == "bfloat16" and summary["new_tokens"] == 4
    assert summary["first_token_seconds"] > 0 and summary["decode_tokens_per_second"] > 0
