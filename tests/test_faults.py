"""Faults while quantizing: full disks, signals, concurrent runs, internal errors.

Each case checks the exit code, the one line on stderr, and what is left on disk: the old
output or nothing, never a partial folder under the target name."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_checks import assert_one_line_error, run_main, run_quantcli
from transformers import LlamaConfig, LlamaForCausalLM

from quantcli import QuantConfig
from quantcli.errors import ResourceError, UsageError
from quantcli.models import streaming
from quantcli.models.source import resolve_model


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_too_little_free_space_is_refused_before_writing(saved_models, tmp_path, monkeypatch):
    usage = streaming.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda path: usage._replace(free=1 << 20))
    with pytest.raises(ResourceError, match="needs about .* free"):
        streaming.quantize_checkpoint(
            resolve_model(str(saved_models("llama"))), tmp_path / "q", QuantConfig()
        )
    assert leftovers(tmp_path) == []


def test_disk_full_while_writing_exits_5_and_leaves_nothing(
    saved_models, tmp_path, monkeypatch, capsys
):
    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(streaming.ShardWriter, "write", full)
    result = run_main(
        monkeypatch, capsys, "quantize", saved_models("llama"), "--out", tmp_path / "q", "--json"
    )
    assert_one_line_error(result, 5, "filled up")
    assert leftovers(tmp_path) == []


def test_an_internal_error_is_one_line_with_exit_1(saved_models, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("something nobody expected")

    monkeypatch.setattr(streaming, "_write_shards", broken)
    result = run_main(
        monkeypatch, capsys, "quantize", saved_models("llama"), "--out", tmp_path / "q", "--json"
    )
    assert_one_line_error(result, 1, "internal error (RuntimeError: something nobody expected)")
    assert "--debug" in result.stderr
    assert leftovers(tmp_path) == []


def test_an_output_that_appears_meanwhile_is_kept(saved_models, tmp_path, monkeypatch):
    """A concurrent run finished first: its folder stays, ours is dropped."""
    out = tmp_path / "q"
    write_shards = streaming._write_shards

    def racing(*args):
        write_shards(*args)
        out.mkdir()
        (out / "theirs").write_text("x")

    monkeypatch.setattr(streaming, "_write_shards", racing)
    with pytest.raises(UsageError, match="appeared while quantizing"):
        streaming.quantize_checkpoint(resolve_model(str(saved_models("llama"))), out, QuantConfig())
    assert leftovers(tmp_path) == ["q"] and leftovers(out) == ["theirs"]


def test_temporary_folders_of_dead_runs_are_removed(saved_models, tmp_path):
    dead = tmp_path / ".q.partial-999999999-abc"  # no such process
    alive = tmp_path / f".q.partial-{os.getppid()}-def"  # a running process: left alone
    dead.mkdir()
    alive.mkdir()
    streaming.quantize_checkpoint(
        resolve_model(str(saved_models("llama"))), tmp_path / "q", QuantConfig()
    )
    assert leftovers(tmp_path) == [alive.name, "q"]


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random Llama big enough (about 130 MB) for a signal to land mid-quantize."""
    folder = tmp_path_factory.mktemp("slow") / "llama"
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to_empty(device="cpu")  # no init: fast, but garbage
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # uninitialised memory can hold NaNs, which quantize refuses
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    model.bfloat16().save_pretrained(folder)
    return folder


def start_quantize(source, out):
    return subprocess.Popen(
        [sys.executable, "-m", "quantcli", "quantize", str(source), "--out", str(out), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_partial(parent, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(".q.partial-") and any(p.iterdir()) for p in parent.iterdir()):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError("quantize never started writing")


@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "Interrupted"), (signal.SIGTERM, 143, "Terminated")],
)
def test_a_signal_mid_write_leaves_nothing(slow_model, tmp_path, sig, code, word):
    process = start_quantize(slow_model, tmp_path / "q")
    wait_for_partial(tmp_path, process)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code and word in err and "Traceback" not in err
    assert leftovers(tmp_path) == []


def test_sigkill_mid_write_then_a_clean_rerun(slow_model, tmp_path):
    process = start_quantize(slow_model, tmp_path / "q")
    wait_for_partial(tmp_path, process)
    process.kill()
    process.communicate(timeout=60)
    assert "q" not in leftovers(tmp_path)  # never a partial folder under the target name
    rerun = start_quantize(slow_model, tmp_path / "q")
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert leftovers(tmp_path) == ["q"]  # the dead run's temporary folder is gone too


def test_a_token_never_appears_in_output(saved_models, tmp_path, monkeypatch):
    secret = "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42"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_TOKEN", secret)
    runs = [
        ["quantize", "someone/private-model", "--out", tmp_path / "o", "--token", secret],
        ["quantize", saved_models("llama"), "--out", tmp_path / "q", f"--token={secret}", "--json"],
        ["inspect", tmp_path / "q", "--json"],
    ]
    results = [run_quantcli(*args) for args in runs]
    for result in results:
        assert secret not in result.stdout + result.stderr
    written = b"".join(p.read_bytes() for p in (tmp_path / "q").iterdir())
    assert secret.encode() not in written
    assert_one_line_error(results[0], 3, "someone/private-model")


# --- bad input, through the command line: exit code, one line, nothing written ----------


def truncated(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_header(folder):
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)


def pickle_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def unknown_architecture(folder):
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')


def nan_weight(folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def untouched(folder):
    pass


QUANTIZE_FAULTS = {  # name: (change to a copy of the tiny Llama, extra args, exit code, words)
    "truncated safetensors": (truncated, [], 4, "model.safetensors"),
    "corrupt header": (corrupt_header, [], 4, "model.safetensors"),
    "pickle-only weights": (pickle_only, [], 4, "--allow-pickle"),
    "unknown architecture": (unknown_architecture, [], 4, "no-such-architecture"),
    "NaN weight": (nan_weight, [], 4, "model.layers.0.mlp.up_proj.weight: weight contains 1 NaN"),
    "no linear layer left": (untouched, ["--exclude", "*"], 2, "no linear layer to quantize"),
    "group size dividing nothing": (
        untouched,
        ["--bits", "4", "--group-size", "48"],
        2,
        "--group-size 48 does not divide the input width of 14 layer(s) "
        "(model.layers.0.self_attn.q_proj: 64); group sizes that fit every layer: 8, 16, 32, 64.",
    ),
    "optimize per tensor": (
        untouched,
        ["--optimize", "--granularity", "tensor"],
        2,
        "per channel or per group",
    ),
    "shard size unreadable": (untouched, ["--max-shard-size", "huge"], 2, "cannot read the size"),
}


@pytest.mark.parametrize("case", QUANTIZE_FAULTS)
def test_bad_quantize_input(case, saved_models, tmp_path):
    change, extra, code, words = QUANTIZE_FAULTS[case]
    source = tmp_path / "src"
    shutil.copytree(saved_models("llama"), source)
    change(source)
    result = run_quantcli("quantize", source, "--out", tmp_path / "q", *extra)
    assert_one_line_error(result, code, words)
    assert leftovers(tmp_path) == ["src"]


def test_huge_max_new_tokens_is_capped_with_a_note(saved_models, tmp_path):
    out = tmp_path / "q"
    streaming.quantize_checkpoint(resolve_model(str(saved_models("llama"))), out, QuantConfig())
    result = run_quantcli("generate", out, "hi", "--no-chat", "--max-new-tokens", "1000000000")
    assert result.returncode == 0, result.stderr
    assert "capped at 62 new tokens" in result.stderr and "Traceback" not in result.stderr
