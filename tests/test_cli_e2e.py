"""The commands as a user runs them: exit codes, one-line errors, JSON summaries."""

import json

import pytest
from cli_checks import assert_one_line_error, run_quantcli

quantcli = run_quantcli


def test_quantize_inspect_load(saved_models, tmp_path):
    out = tmp_path / "q"
    result = quantcli(
        "quantize",
        saved_models("llama"),
        "--out",
        out,
        "--bits",
        "4",
        "--group-size",
        "32",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["layers_quantized"] == 14 and summary["scheme"] == "int4 asym g32"
    assert summary["output_bytes"] < summary["source_bytes"] / 3

    inspected = json.loads(quantcli("inspect", out, "--json").stdout)
    assert inspected["kind"] == "quantcli"
    kinds = {layer["name"]: layer["kind"] for layer in inspected["layers"]}
    assert kinds["model.layers.0.mlp.down_proj"] == "int4" and kinds["lm_head"] == "float"
    shapes = {layer["name"]: layer["shape"] for layer in inspected["layers"]}
    assert shapes["model.layers.0.mlp.down_proj"] == [64, 128]
    assert inspected["bits_per_weight"] == pytest.approx(summary["bits_per_weight"], abs=1e-3)

    loaded = json.loads(quantcli("load", out, "--json").stdout)
    assert loaded["model_class"] == "LlamaForCausalLM" and loaded["layers_quantized"] == 14
    assert loaded["forward_ok"].startswith("ok")

    human = quantcli("inspect", out)
    assert human.returncode == 0 and "model.layers.1.self_attn.q_proj" in human.stdout


def test_inspect_tells_a_float_checkpoint(saved_models):
    result = quantcli("inspect", saved_models("opt"))
    assert result.returncode == 0 and "plain float checkpoint" in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["quantize", "./missing", "--out", "o"], 3, "no folder ./missing"),
        (
            ["quantize", "MODEL", "--out", "o", "--max-shard-size", "lots"],
            2,
            "cannot read the size",
        ),
        (
            ["quantize", "MODEL", "--out", "o", "--granularity", "channel", "--group-size", "8"],
            2,
            "only applies to granularity 'group'",
        ),
        (["load", "MODEL"], 4, "not quantized"),
        (["inspect", "./missing"], 3, "no folder"),
    ],
)
def test_bad_input_exits_with_one_line(args, code, fragment, saved_models, tmp_path):
    args = [str(saved_models("opt")) if a == "MODEL" else a for a in args]
    result = quantcli(*args, cwd=tmp_path)
    assert_one_line_error(result, code, fragment)
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_without_overwrite(saved_models, tmp_path):
    (tmp_path / "o").mkdir()
    result = quantcli("quantize", saved_models("opt"), "--out", tmp_path / "o")
    assert_one_line_error(result, 2, "pass --overwrite")


def test_hub_id_unreachable_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = quantcli("quantize", "someone/some-model", "--out", tmp_path / "o")
    assert_one_line_error(result, 3, "someone/some-model")
