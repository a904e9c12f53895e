"""`quantcli eval`: what quantization cost, measured on a text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.table import Table

from quantcli.checkpoint import read_local_source
from quantcli.cli.options import (
    DtypeChoice,
    JsonOption,
    RevisionOption,
    ThreadsOption,
    TokenOption,
    TrustRemoteCodeOption,
    check_device,
    check_range,
    run_dtype,
)
from quantcli.cli.output import (
    print_eval,
    print_wide,
    progress_bar,
    stderr,
)
from quantcli.cli.process import use_threads
from quantcli.errors import NotFoundError, UsageError, first_line
from quantcli.models.evaluation import default_text, evaluate, save_result
from quantcli.models.generation import check_takes_text, load_tokenizer
from quantcli.models.loading import load_any, summarize_folder
from quantcli.models.source import expand_model_folders, resolve_model
from quantcli.plots import check_plot_path, plot_evaluations
from quantcli.units import format_bytes

# Shown under --help.
EXAMPLES = [
    "quantcli eval ./smollm2-int4",
    "quantcli eval ./smollm2-int4 --baseline HuggingFaceTB/SmolLM2-135M-Instruct --max-tokens 4096",
    "quantcli eval ./smollm2-int8 ./smollm2-int4 --plot ppl.png",
    "quantcli eval ./quantized/ --plot ppl.png",
    "quantcli eval ./bert-int8 --baseline ./bert --text notes.txt --json",
]


def evaluate_command(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Models to score, one after the other: quantized checkpoints or float "
            "(folders or Hub ids). A folder of checkpoint folders stands for all of them.",
            show_default=False,
        ),
    ],
    baseline: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="Float model to compare with (default: the source recorded in the "
            "checkpoint, when it can be found).",
            show_default=False,
        ),
    ] = None,
    no_baseline: Annotated[
        bool, typer.Option("--no-baseline", help="Score the models alone.")
    ] = False,
    text: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="UTF-8 text file to score (default: a public-domain Shakespeare excerpt "
            "shipped with quantcli).",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Score at most this many tokens.", metavar="N")
    ] = 16384,
    window: Annotated[
        int, typer.Option(help="Tokens per forward pass (context).", metavar="N")
    ] = 512,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Tokens between windows (default: the window; less adds context).",
            metavar="N",
        ),
    ] = None,
    dtype: Annotated[
        DtypeChoice,
        typer.Option(
            help="dtype of both models' activations. fp32 (default) measures what the weights "
            "lost; bf16 adds the activations' rounding (auto: the fastest, as in generate)."
        ),
    ] = DtypeChoice.fp32,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...", metavar="DEVICE")] = "cpu",
    plot: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Draw each model's perplexity (against the baseline's) and size into this "
            ".png/.svg/.pdf (needs matplotlib: pip install 'quantcli[plot]').",
            show_default=False,
        ),
    ] = None,
    save: Annotated[
        bool,
        typer.Option(
            "--save/--no-save", help="Record the result in the checkpoint folder for push."
        ),
    ] = True,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
) -> None:
    """Measure what quantization cost: perplexity, and against the float model ΔPPL, KL
    divergence and top-1 agreement (cosine similarity of the outputs for encoders).

    Each result is saved in its checkpoint folder (quantcli_eval.json), where `inspect`
    shows it and `push` puts it on the model card. With several models, `--json` prints
    one JSON object per line.
    """
    check_device(device)
    check_range("--max-tokens", max_tokens, 2)
    check_range("--window", window, 2)
    check_range("--stride", stride, 1)
    check_range("--threads", threads, 1)
    if plot is not None:
        plot = check_plot_path(plot)
    if text is None:
        text_name, content = default_text()
    else:
        text_name, content = text.name, _read_text(text)
    activation_dtype = run_dtype(dtype)
    use_threads(threads)
    # loaded once and shared by the models; None for a recorded source that is unreachable
    baselines: dict[str, torch.nn.Module | None] = {}
    labels: dict[str, str] = {}  # how results (saved, then published on cards) name a model
    results = []
    models = expand_model_folders(models)
    sources = [resolve_model(model, revision, token) for model in models]  # fail before work
    for model, source in zip(models, sources, strict=True):
        summary = summarize_folder(source.folder)
        recorded = read_local_source(source.folder) or summary.metadata.get("source_model") or None
        baseline_name = None if no_baseline else baseline or recorded
        if baseline_name is not None and baseline_name not in baselines:
            try:
                baseline_source = resolve_model(baseline_name, None, token)
                labels[baseline_name] = baseline_source.public_name
                baselines[baseline_name] = load_any(
                    baseline_source, device, activation_dtype, trust_remote_code
                )
            except NotFoundError as error:
                if baseline is not None:
                    raise
                stderr.print(f"(no baseline: the recorded source is not reachable: {error})")
                baselines[baseline_name] = None
        if baselines.get(baseline_name) is None:
            baseline_name = None
        scored = load_any(source, device, activation_dtype, trust_remote_code)
        check_takes_text(scored, "eval")  # before the tokenizer, which an image model lacks
        with progress_bar(disable=json_output) as progress:
            task = progress.add_task(f"Scoring {model}", total=None)
            result = evaluate(
                scored,
                load_tokenizer(source.folder),
                content,
                text_name=text_name,
                model_name=source.public_name,
                baseline=baselines.get(baseline_name),
                baseline_name=labels.get(baseline_name),
                window=window,
                stride=stride,
                max_tokens=max_tokens,
                on_start=lambda total, task=task: progress.update(task, total=total),
                on_window=lambda task=task: progress.update(task, advance=1),
            )
        del scored
        result.scheme = summary.config.label if summary.config else summary.kind
        result.size_bytes = summary.total_bytes
        results.append(result.to_dict())
        saved = (
            save_result(source.folder, result)
            if save and Path(model).expanduser().is_dir()
            else None
        )
        if json_output:
            print(json.dumps(results[-1]), flush=True)
            continue
        if len(models) == 1:
            print_eval(results[-1])
        if saved is not None:
            stderr.print(f"Saved to {saved}")
    if len(models) > 1 and not json_output:
        _print_comparison(results)
    if plot is not None:
        plot_evaluations(results, plot)
        stderr.print(f"Plot: {plot}", soft_wrap=True)  # a path, never broken


# the columns of several models' comparison: (header, result key, format)
COMPARISON = [
    ("perplexity", "perplexity", "{:.4f}"),
    ("baseline", "baseline_perplexity", "{:.4f}"),
    ("Δ perplexity", "delta_perplexity_percent", "{:+.2f}%"),
    ("KL", "kl_divergence", "{:.5f}"),
    ("top-1", "top1_agreement", "{:.2%}"),
    ("cosine", "cosine_similarity", "{:.5f}"),
]


def _print_comparison(results: list[dict]) -> None:
    """Several models in one table: a row each, the same text and windows for all."""
    first = results[0]
    table = Table(
        title=f"{first['text']}: {first['tokens']} tokens, windows of {first['window']}, "
        f"{first['dtype']} activations"
    )
    table.add_column("model", no_wrap=True)
    table.add_column("scheme", no_wrap=True)
    table.add_column("size", justify="right")
    columns = [column for column in COMPARISON if any(column[1] in r for r in results)]
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for result in results:
        cells = [fmt.format(result[key]) if key in result else "" for _, key, fmt in columns]
        size = format_bytes(result["size_bytes"]) if "size_bytes" in result else ""
        table.add_row(result["model"], result.get("scheme", ""), size, *cells)
    print_wide(table)


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise UsageError(f"--text {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(
            f"--text {path} is not readable UTF-8 text ({first_line(error)})."
        ) from None
