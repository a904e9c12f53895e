""" "Where it runs" says what was measured: each verdict is tied to the test or source that
backs it, and reaches the user through quantize's warnings, inspect and the model card."""

import json

import pytest
from cli_checks import quantized_checkpoint, run_quantcli
from test_oracle import LOADABLE

from quantcli import QuantConfig
from quantcli.runtimes import where_it_runs


def verdicts(config, conv1d=False):
    return {verdict.runtime: verdict.runs for verdict in where_it_runs(config, conv1d)}


@pytest.mark.parametrize("name", LOADABLE)
def test_transformers_is_said_to_load_what_the_oracle_test_loads(name):
    assert verdicts(LOADABLE[name])["transformers"]


@pytest.mark.parametrize(
    "config", [QuantConfig(bits=4), QuantConfig(bits=8, scheme="asym")], ids=["int4", "int8"]
)
def test_transformers_is_said_to_refuse_what_the_oracle_xfail_shows_it_refuses(config):
    assert not verdicts(config)["transformers"]


@pytest.mark.parametrize(
    ("config", "gpu", "cpu"),
    [
        # vLLM for CPU, make test-vllm: int4 sym g128 and asym g32 give quantcli's tokens;
        # int8 is refused by CPUWNA16 ("uint8b128 not supported"); the GPU verdicts come from
        # vLLM 0.32's kernel selection (Marlin: uint4b8/uint8b128, uint4 with zero points,
        # groups of 32, 64, 128 or per channel)
        (QuantConfig(bits=8), True, False),
        (QuantConfig(bits=4), True, True),
        (QuantConfig(bits=4, scheme="sym", group_size=128), True, True),
        (QuantConfig(bits=4, group_size=48), False, True),
        (QuantConfig(bits=8, scheme="asym"), False, False),
        (QuantConfig(bits=2, group_size=16), False, False),
        (QuantConfig(bits=8, granularity="tensor"), False, False),  # WNA16: channel or group
    ],
    ids=lambda value: value.label if isinstance(value, QuantConfig) else None,
)
def test_vllm_verdicts(config, gpu, cpu):
    runs = verdicts(config)
    assert (runs["vLLM (GPU)"], runs["vLLM (CPU)"]) == (gpu, cpu)


@pytest.mark.parametrize(
    ("config", "cpu"),
    [
        # make test-vllm, tiny Mixtral: int4 sym g64 gives quantcli's tokens; asym g32 has no
        # CPU MoE kernel ("No WNA16 MoE backend supports the deployment configuration")
        (QuantConfig(bits=4, scheme="sym", group_size=64), True),
        (QuantConfig(bits=4, scheme="sym", group_size=32), False),
        (QuantConfig(bits=4), False),
        (QuantConfig(bits=8), False),  # no dense CPU kernel either
    ],
    ids=lambda value: value.label if isinstance(value, QuantConfig) else None,
)
def test_vllm_cpu_verdicts_for_experts(config, cpu):
    verdict = {v.runtime: v for v in where_it_runs(config, experts=True)}["vLLM (CPU)"]
    assert verdict.runs == cpu


def test_quantized_embeddings_run_in_quantcli_only():
    """test_tied_heads pins transformers' refusal; make test-vllm (docs/generated/vllm-cpu.md)
    measured vLLM's on SmolLM2, whose head is tied to the table."""
    assert verdicts(QuantConfig(bits=4, scheme="sym", quantize_embeddings=True)) == {
        "quantcli": True,
        "transformers": False,
        "vLLM (GPU)": False,
        "vLLM (CPU)": False,
    }


def test_conv1d_checkpoints_run_in_quantcli_only():
    assert verdicts(QuantConfig(bits=4), conv1d=True) == {
        "quantcli": True,
        "transformers": False,
        "vLLM (GPU)": False,
        "vLLM (CPU)": False,
    }


def test_quantize_warns_when_no_vllm_kernel_serves_the_scheme(saved_models, tmp_path):
    two_bit = run_quantcli(
        "quantize", saved_models("llama"), "--out", tmp_path / "q2", "--bits", "2", "--json"
    )
    assert two_bit.returncode == 0, two_bit.stderr
    assert json.loads(two_bit.stdout)["warnings"] == [
        "vLLM cannot serve this checkpoint (no 2-bit kernel); it runs in quantcli."
    ]
    default = run_quantcli("quantize", saved_models("llama"), "--out", tmp_path / "q8", "--json")
    assert json.loads(default.stdout)["warnings"] == []


def test_inspect_and_the_card_say_where_it_runs(saved_models, tmp_path):
    from quantcli.hub import model_card
    from quantcli.models.loading import summarize_folder

    folder = quantized_checkpoint(saved_models, tmp_path / "q", config=QuantConfig(bits=8))
    inspect = run_quantcli("inspect", folder, "--json")
    runs_in = json.loads(inspect.stdout)["runs_in"]
    assert {name: value["runs"] for name, value in runs_in.items()} == verdicts(QuantConfig(bits=8))
    card = model_card(folder, summarize_folder(folder), "me/q")
    assert "| vLLM (CPU) | no | its WNA16 kernel serves 4-bit only (make test-vllm) |" in card
    assert "| transformers | yes |" in card
