"""--plot of inspect and eval: real PNGs, written whole, and one-line errors before any work."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error, quantized_checkpoint, run_quantcli

from quantcli import QuantConfig
from quantcli.models.layer_errors import LayerError
from quantcli.models.loading import summarize_folder
from quantcli.plots import plot_evaluations, plot_layer_errors

image = pytest.importorskip("matplotlib.image")
ROOT = Path(__file__).resolve().parent.parent


def quantized(saved_models, folder, bits):
    config = QuantConfig(bits=bits)
    return quantized_checkpoint(saved_models, folder / f"llama-int{bits}", config=config)


def assert_picture(path: Path, min_width: int = 600) -> None:
    """A whole PNG with something drawn on it, and no temporary file left beside it."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(path)
    assert pixels.shape[1] >= min_width and pixels.std() > 0.05
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")] == []


def test_eval_several_models_and_plot(saved_models, tmp_path):
    folders = [quantized(saved_models, tmp_path, bits) for bits in (8, 4)]
    plot = tmp_path / "ppl.png"
    result = run_quantcli(
        "eval", *folders, "--max-tokens", "200", "--window", "64", "--json", "--plot", plot
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # models are named by folder, not path: push publishes the saved result
    assert [line["model"] for line in lines] == [folder.name for folder in folders]
    for line, folder in zip(lines, folders, strict=True):
        summary = summarize_folder(folder)
        assert line["scheme"] == summary.config.label
        assert line["size_bytes"] == summary.total_bytes
        assert line["baseline"] == saved_models("llama").name
        assert json.loads((folder / "quantcli_eval.json").read_text()) == line
    assert lines[0]["kl_divergence"] < lines[1]["kl_divergence"]  # int8 loses less than int4
    assert_picture(plot)


def test_eval_of_a_folder_takes_every_checkpoint_in_it(saved_models, tmp_path):
    for bits in (8, 2):
        quantized(saved_models, tmp_path / "runs", bits)
    result = run_quantcli(
        "eval", tmp_path / "runs", "--max-tokens", "100", "--window", "64", "--json"
    )
    assert result.returncode == 0, result.stderr
    models = [json.loads(line)["model"] for line in result.stdout.splitlines()]
    assert models == [f"llama-int{bits}" for bits in (2, 8)]


def test_inspect_against_plot(saved_models, tmp_path):
    out = quantized(saved_models, tmp_path, 4)
    plot = tmp_path / "errors.png"
    result = run_quantcli("inspect", out, "--against", saved_models("llama"), "--plot", plot)
    assert result.returncode == 0, result.stderr
    title = " ".join(result.stdout.split())  # the table's title wraps with the path's length
    assert "worst first" in title and f"Plot: {plot}\n" in result.stderr
    assert_picture(plot)


def test_plot_functions_draw_what_they_are_given(tmp_path):
    errors = [
        LayerError(f"model.layers.{i}.mlp.{kind}", kind, 100, 0.01 * (i + 1), 20.0)
        for i in range(12)
        for kind in ("up_proj", "down_proj")
    ]
    assert_picture(plot_layer_errors(errors, tmp_path / "e.png", "title"))
    results = [
        {"model": "a", "text": "t", "perplexity": 10.0, "scheme": "int8", "size_bytes": 5},
        {"model": "b", "text": "t", "perplexity": 900.0, "scheme": "int2", "size_bytes": 2},
    ]
    svg = plot_evaluations(results, tmp_path / "p.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "int2" in svg.read_text()
    encoder = [{"model": "bert-int8", "text": "t", "cosine_similarity": 0.999}]
    assert_picture(plot_evaluations(encoder, tmp_path / "c.png"), 400)


def test_plot_bad_input_is_refused_before_any_work(saved_models, tmp_path):
    out = tmp_path / "never-read"
    cases = [
        (("inspect", out, "--plot", tmp_path / "e.png"), "add --against"),
        (("eval", out, "--plot", tmp_path / "e.gif"), ".png"),
        (("eval", out, "--plot", tmp_path / "missing" / "e.png"), "does not exist"),
        (("eval", out, "--plot", tmp_path), "is a folder"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_quantcli(*args), 2, fragment)
    assert sorted(os.listdir(tmp_path)) == []


def test_eval_checks_every_model_before_scoring_any(saved_models, tmp_path):
    out = quantized(saved_models, tmp_path, 8)
    result = run_quantcli("eval", out, tmp_path / "missing", "--max-tokens", "50")
    assert_one_line_error(result, 3, "missing")
    assert not (out / "quantcli_eval.json").exists()


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path):
    script = (
        "import sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['quantcli', 'eval', 'x', '--plot', {str(tmp_path / 'p.png')!r}]; "
        "from quantcli.cli import main; main()"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert_one_line_error(result, 2, "pip install 'quantcli[plot]'")


def test_cli_reference_is_generated_from_the_app():
    """docs/cli.md must be what the Typer app generates now, whatever the terminal width."""
    for columns in ("40", "200"):
        result = subprocess.run(
            [sys.executable, ROOT / "scripts" / "cli_reference.py", "--check"],
            capture_output=True,
            text=True,
            env={**os.environ, "COLUMNS": columns},
        )
        assert result.returncode == 0, result.stderr
    reference = (ROOT / "docs" / "cli.md").read_text()
    for command in ("quantize", "load", "inspect", "push", "eval", "generate"):
        assert f"## `quantcli {command}`" in reference
    assert "--plot" in reference and "--optimize" in reference
