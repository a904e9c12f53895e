"""The command line as its users meet it: every command listed, help that names things,
examples that run as written, one line for every bad value."""

import json
import shutil
import subprocess
import sys

import pytest
from cli_checks import assert_one_line_error, hub_env, quantized_checkpoint, run_quantcli
from hub_double import HubDouble
from tiny_models import CONFIGS
from transformers import AutoModelForCausalLM

from quantcli import QuantConfig
from quantcli.cli import eval as eval_command
from quantcli.cli import generate, inspect, load, push, quantize
from quantcli.cli.quantcli import app

COMMANDS = {
    "quantize": quantize,
    "push": push,
    "load": load,
    "inspect": inspect,
    "generate": generate,
    "eval": eval_command,
}
TOKEN = "tok-me-3e1d"


def test_the_app_registers_exactly_the_documented_commands():
    assert sorted(command.name for command in app.registered_commands) == sorted(COMMANDS)


def test_version():
    result = run_quantcli("--version")
    assert result.returncode == 0 and result.stdout.startswith("quantcli ")


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_names_things_instead_of_python_types(command):
    result = run_quantcli(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    for python_type in ("<str>", "<bool>", "<int", "<float", "<path>", "list[", "{", "x>="):
        assert python_type not in result.stdout, (python_type, result.stdout)
    if command:
        usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
        assert usage.split()[-1].isupper(), usage  # MODEL, FOLDER, MODELS...
        assert "Examples:" in result.stdout and f"quantcli {command} " in result.stdout
    else:
        assert all(command in result.stdout for command in COMMANDS)


@pytest.fixture(scope="module")
def example_folder(saved_models, tmp_path_factory):
    """A working directory holding every folder the examples name: tiny models under the
    examples' names (a local folder shadows a Hub id of the same name)."""
    root = tmp_path_factory.mktemp("examples")
    for name, arch in {
        "facebook/opt-125m": "opt",
        "my-llama": "llama",
        "gpt2": "gpt2",
        "HuggingFaceTB/SmolLM2-135M-Instruct": "llama",
        "bert": "bert",
    }.items():
        shutil.copytree(saved_models(arch), root / name)
    for name, bits in {"smollm2-int4": "4", "smollm2-int8": "8"}.items():
        quantized = run_quantcli(
            "quantize",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--out",
            name,
            "--bits",
            bits,
            cwd=root,
        )
        assert quantized.returncode == 0, quantized.stderr
        shutil.copytree(root / name, root / "quantized" / name)
    bert = run_quantcli("quantize", "bert", "--out", "bert-int8", cwd=root)
    assert bert.returncode == 0, bert.stderr
    (root / "notes.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return root


def test_every_example_runs_as_written(example_folder):
    """quantize's examples first (they make the folders the others use), then push (to the
    local Hub double, as user `me`), then the rest, some from the Hub."""
    with HubDouble({TOKEN: "me"}) as hub:
        env = hub_env(hub.url, example_folder / ".hf-home", TOKEN)
        for module in COMMANDS.values():
            for example in module.EXAMPLES:
                command = example.replace("quantcli", f"{sys.executable} -m quantcli", 1)
                if "| quantcli" in command:
                    command = command.replace("| quantcli", f"| {sys.executable} -m quantcli")
                result = subprocess.run(
                    ["bash", "-c", command],
                    cwd=example_folder,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                assert result.returncode == 0, (example, result.stderr)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["quantize", "m", "--out", "o", "--bits", "3"], "'--bits': '3' is not one of '8', '4'"),
        (["quantize", "m", "--out", "o", "--group-size", "0"], "--group-size 0: it takes 1 or"),
        (["quantize", "m", "--out", "o", "--frobnicate"], "No such option: --frobnicate"),
        (["quantize"], "Missing argument 'MODEL'"),
        (["generate", "m", "hi", "--top-p", "1.5"], "--top-p 1.5: it takes 0.0 to 1.0."),
        (["generate", "m", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0: it takes 1"),
        (["generate", "m", "hi", "--do-sample", "--temperature", "0"], "temperature above 0"),
        (["eval", "m", "--window", "1"], "--window 1: it takes 2 or more."),
        (["eval", "m", "--dtype", "fp8"], "'--dtype': 'fp8' is not one of"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_bad_values_get_one_line_naming_the_option_and_what_it_takes(args, fragment, tmp_path):
    result = run_quantcli(*args, cwd=tmp_path)
    assert_one_line_error(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_options_that_cannot_apply_are_refused(saved_models, tmp_path):
    folder = saved_models("llama")
    revision = run_quantcli("quantize", folder, "--out", tmp_path / "q", "--revision", "v1")
    assert_one_line_error(revision, 2, "--revision v1 applies to Hub ids, not to the local")
    exclude = run_quantcli("quantize", folder, "--out", tmp_path / "q", "--exclude", "*.attn.*")
    assert_one_line_error(exclude, 2, "--exclude '*.attn.*' matches no linear layer")
    assert not (tmp_path / "q").exists()


def test_a_bare_command_prints_its_help_and_exits_2():
    result = run_quantcli()
    assert result.returncode == 2
    assert "Usage: quantcli" in result.stdout + result.stderr


def test_placeholders_name_what_the_options_take():
    """--out takes a FOLDER, --exclude a GLOB, choices are listed: what a person reads."""
    help_text = run_quantcli("quantize", "--help").stdout
    for placeholder in ("FOLDER", "GLOB", "8|4|2", "sym|asym", "SIZE", "REVISION", "TOKEN"):
        assert placeholder in help_text, placeholder


def test_generate_runs_float_folders_and_warns_on_options_it_ignores(saved_models):
    result = run_quantcli(
        "generate",
        saved_models("llama"),
        "hello",
        "--max-new-tokens",
        "3",
        "--temperature",
        "0.5",
        "--system",
        "be brief",
        "--no-chat",
        "--trust-remote-code",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["new_tokens"] == 3
    assert result.stderr.splitlines() == [
        "Warning: --temperature only applies when sampling: add --do-sample.",
        "Warning: --system only applies to a chat prompt: it is ignored with --no-chat.",
    ]


def test_inspect_against_summarizes_per_layer_type_and_all_lists_every_layer(
    saved_models, tmp_path
):
    folder = quantized_checkpoint(saved_models, tmp_path / "q")
    summary = run_quantcli("inspect", folder, "--against", saved_models("llama"))
    assert summary.returncode == 0, summary.stderr
    assert "per layer type" in summary.stdout and "the 10 worst of 14 layers" in summary.stdout
    every = run_quantcli("inspect", folder, "--against", saved_models("llama"), "--all")
    listed = [line for line in every.stdout.splitlines() if " dB " in line]
    assert len(listed) == 14


def test_inspect_lists_layers_in_model_order(tmp_path):
    config = CONFIGS["llama"]()
    config.num_hidden_layers = 11
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    names = [
        layer["name"]
        for layer in json.loads(run_quantcli("inspect", tmp_path / "m", "--json").stdout)["layers"]
    ]
    blocks = [int(name.split(".")[2]) for name in names if name.startswith("model.layers.")]
    assert blocks == sorted(blocks) and blocks[-1] == 10


def test_eval_of_several_models_prints_one_table(saved_models, tmp_path):
    int8 = quantized_checkpoint(saved_models, tmp_path / "int8", config=QuantConfig())
    int4 = quantized_checkpoint(saved_models, tmp_path / "int4")
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    result = run_quantcli(
        "eval", int8, int4, "--baseline", saved_models("llama"), "--text", text, "--window", "32"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("┏") == 1  # one table
    rows = [line for line in result.stdout.splitlines() if "int8 sym channel" in line]
    rows += [line for line in result.stdout.splitlines() if "int4 asym g32" in line]
    assert len(rows) == 2
    assert "Loading weights" not in result.stderr  # transformers' bar for the baseline
