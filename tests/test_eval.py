"""quantcli eval and inspect --against: the figures are the ones a direct computation gives."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from cli_checks import assert_one_line_error, quantized_checkpoint, run_quantcli
from hypothesis import given
from hypothesis import strategies as st
from tiny_models import char_tokenizer

from quantcli import QuantConfig
from quantcli.models.evaluation import _windows, default_text, evaluate
from quantcli.models.layer_errors import layer_errors
from quantcli.models.loading import load_any
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4


def load(folder):
    return load_any(resolve_model(str(folder)), dtype=torch.float32)


@given(n=st.integers(2, 300), window=st.integers(2, 64), stride=st.integers(1, 64))
def test_windows_score_every_position_once_with_context(n, window, stride):
    stride = min(stride, window - 1)  # as evaluate() clamps it
    scored = []
    for begin, end, first in _windows(n, window, stride):
        assert end - begin <= window and begin < first <= end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_perplexity_is_the_exponent_of_the_mean_cross_entropy(saved_models):
    model, tokenizer = load(saved_models("llama")), char_tokenizer()
    ids = tokenizer(TEXT[:60], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    expected = math.exp(float(F.cross_entropy(logits, ids[0, 1:])))
    result = evaluate(model, tokenizer, TEXT[:60], text_name="t", model_name="m", window=64)
    assert result.tokens == ids.shape[1] - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_a_model_against_itself_loses_nothing(saved_models):
    model, tokenizer = load(saved_models("llama")), char_tokenizer()
    result = evaluate(
        model, tokenizer, TEXT, text_name="t", model_name="m", baseline=model, window=32, stride=16
    )
    assert result.tokens == len(TEXT) - 1
    assert result.perplexity == pytest.approx(result.baseline_perplexity)
    assert result.kl_divergence == pytest.approx(0, abs=1e-6)
    assert result.top1_agreement == 1.0 and result.delta_perplexity_percent == pytest.approx(0)


def test_quantized_model_against_its_original(saved_models, tmp_path):
    """KL and top-1 agreement equal a direct computation from the two models' logits, and
    the KL has the size its second-order expansion predicts.

    One window of 64 tokens (the tiny model's context), so every scored position sees the
    same context in evaluate() and here. KL(p || q) with p the original's distribution,
    computed here in float64. evaluate() works in float32: each log-probability carries a
    rounding error of ~2^-24 of its size, so the sum over the vocabulary is off by at most
    ~2^-24 * sum_i p_i (|log p_i| + |log q_i|) (entropy plus cross-entropy, ~10 nats here:
    5.8e-7, about the int8 KL itself, 4.6e-7; measured 7e-9, the errors cancel). The
    tolerance is twice that bound: for int2 (KL 2.9e-3) a 0.04% error fails; the int8 KL
    is at float32's resolution, so for it the tight check is the expansion below.
    For small logit changes d = logits_q - logits_p,
    KL ~ 1/2 Var_p(d) (second order; the third-order term is ~|d| times smaller): measured
    |d| ~ 1e-3 (int8) and 0.1 (int2), so the ratio lies within [0.8, 1.25]; a KL off by 2x
    (or computed as q || p at int2) leaves it. Top-1 agreement: exactly the direct count
    (measured 1.0 and 0.44).
    """
    original = load(saved_models("llama"))
    text = TEXT[:64]
    ids = char_tokenizer()(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = original(ids).logits[0, :-1].double()
    for config in (QuantConfig(bits=8), QuantConfig(bits=2, group_size=16)):
        q = load(quantized_checkpoint(saved_models, tmp_path / str(config.bits), config=config))
        result = evaluate(
            q, char_tokenizer(), text, text_name="t", model_name="m", baseline=original, window=64
        )
        with torch.no_grad():
            ours = q(ids).logits[0, :-1].double()
        log_p, log_q = reference.log_softmax(-1), ours.log_softmax(-1)
        p = log_p.exp()
        kl = float((p * (log_p - log_q)).sum(-1).mean())
        assert result.tokens == 63
        rounding = float((p * (log_p.abs() + log_q.abs())).sum(-1).mean()) * 2**-24
        assert result.kl_divergence == pytest.approx(kl, abs=2 * rounding)
        agree = float((reference.argmax(-1) == ours.argmax(-1)).double().mean())
        assert result.top1_agreement == agree
        d = ours - reference
        second_order = float((0.5 * (p * (d - (p * d).sum(-1, keepdim=True)) ** 2).sum(-1)).mean())
        assert 0.8 <= result.kl_divergence / second_order <= 1.25, config.label


def test_encoders_report_cosine_similarity(saved_models, tmp_path):
    original = load(saved_models("bert"))
    q = load(quantized_checkpoint(saved_models, tmp_path / "bert-q", "bert", QuantConfig(bits=8)))
    with pytest.raises(Exception, match="not a causal language model"):
        evaluate(q, char_tokenizer(), TEXT, text_name="t", model_name="m")
    result = evaluate(
        q, char_tokenizer(), TEXT, text_name="t", model_name="m", baseline=original, window=64
    )
    assert 0.99 < result.cosine_similarity <= 1.0 + 1e-6 and result.perplexity is None


def test_default_text_is_shipped_and_long_enough():
    name, content = default_text()
    assert "public domain" in name and len(content) > 100_000


def test_layer_errors_match_a_direct_computation(saved_models, tmp_path):
    out = quantized_checkpoint(
        saved_models, tmp_path / "llama-q", config=QuantConfig(bits=4, group_size=32)
    )
    errors = layer_errors(out, resolve_model(str(saved_models("llama"))))
    assert len(errors) == 14
    assert [e.relative_error for e in errors] == sorted(
        (e.relative_error for e in errors), reverse=True
    )
    q, original = load(out), load(saved_models("llama"))
    name = errors[0].name
    ours = q.get_submodule(name).dequantize_weight(torch.float32)
    theirs = original.get_submodule(name).weight.detach().float()
    expected = float((ours - theirs).norm() / theirs.norm())
    assert errors[0].relative_error == pytest.approx(expected, rel=1e-5)
    assert errors[0].snr_db == pytest.approx(-20 * math.log10(expected), rel=1e-5)


def test_layer_errors_of_gpt2_conv1d_layers(saved_models, tmp_path):
    out = quantized_checkpoint(saved_models, tmp_path / "gpt2-q", "gpt2", QuantConfig(bits=8))
    errors = layer_errors(out, resolve_model(str(saved_models("gpt2"))))
    assert errors and all(0 < e.relative_error < 0.02 for e in errors)


quantcli = run_quantcli


def test_cli_eval_compares_with_the_recorded_source_and_saves(saved_models, tmp_path):
    out = quantized_checkpoint(
        saved_models, tmp_path / "llama-q", config=QuantConfig(bits=2, group_size=16)
    )
    elsewhere = tmp_path / "elsewhere"  # the local source is found from any directory
    elsewhere.mkdir()
    result = quantcli("eval", out, "--max-tokens", "200", "--window", "64", "--json", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["baseline"] == saved_models("llama").name and summary["tokens"] == 199
    assert summary["model"] == "llama-q"  # names, never paths: the card publishes them
    assert summary["kl_divergence"] > 0 and summary["window"] == 64
    saved = json.loads((out / "quantcli_eval.json").read_text())
    assert saved == summary
    inspected = json.loads(
        quantcli("inspect", out, "--json", "--against", saved_models("llama")).stdout
    )
    assert inspected["eval"] == summary and len(inspected["layer_errors"]) == 14
    human = quantcli("inspect", out, "--against", saved_models("llama"))
    assert "top-1 agreement" in human.stdout and "worst first" in human.stdout


def test_cli_eval_bad_input(saved_models, tmp_path):
    out = quantized_checkpoint(saved_models, tmp_path / "llama-q")
    assert_one_line_error(quantcli("eval", out, "--text", tmp_path / "nope.txt"), 2, "no such file")
    assert_one_line_error(quantcli("eval", out, "--baseline", tmp_path / "missing"), 3, "missing")


def test_cli_eval_without_the_recorded_source_scores_alone_and_says_so_once(saved_models, tmp_path):
    source = tmp_path / "gone"
    shutil.copytree(saved_models("llama"), source)
    folders = [tmp_path / name for name in ("a", "b")]
    for folder in folders:
        quantize_checkpoint(resolve_model(str(source)), folder, QuantConfig(bits=8))
    shutil.rmtree(source)
    result = quantcli("eval", *folders, "--max-tokens", "50", "--window", "32", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 2 and all("baseline" not in line for line in lines)
    assert result.stderr.count("the recorded source is not reachable") == 1
