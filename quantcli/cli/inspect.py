"""`quantcli inspect`: what a checkpoint holds, from its headers only."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from quantcli.checkpoint import CheckpointSummary, read_eval
from quantcli.cli.options import (
    JsonOption,
    RevisionOption,
    ThreadsOption,
    TokenOption,
    TrustRemoteCodeOption,
    check_range,
)
from quantcli.cli.output import (
    print_eval,
    print_wide,
    progress_bar,
    stderr,
    stdout,
)
from quantcli.cli.process import use_threads
from quantcli.errors import UsageError
from quantcli.models.layer_errors import layer_errors
from quantcli.models.loading import summarize_folder
from quantcli.models.source import resolve_model
from quantcli.plots import check_plot_path, plot_layer_errors
from quantcli.runtimes import checkpoint_runtimes
from quantcli.units import format_bytes

# Shown under --help.
EXAMPLES = [
    "quantcli inspect ./opt-125m-int8",
    "quantcli inspect me/opt-125m-int8 --json",
]


def inspect(
    path: Annotated[str, typer.Argument(help="Checkpoint folder or Hub id.")],
    against: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="The float original (folder or Hub id): the quantized layers' relative error "
            "and SNR against it, per layer type and the worst layers (reads one layer at a "
            "time).",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="With --against: also draw the errors as a bar chart, one colour per layer "
            "type, into this .png/.svg/.pdf (needs matplotlib: pip install 'quantcli[plot]').",
            show_default=False,
        ),
    ] = None,
    show_all: Annotated[
        bool, typer.Option("--all", help="With --against: list every layer, not the worst 10.")
    ] = False,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show what a checkpoint holds, layer by layer, from its headers only."""
    check_range("--threads", threads, 1)
    if plot is not None:
        if against is None:
            raise UsageError("--plot draws each layer's error: add --against ORIGINAL.")
        plot = check_plot_path(plot)
    source = resolve_model(path, revision, token)
    summary = summarize_folder(source.folder)
    errors = None
    if against is not None:
        use_threads(threads)
        original = resolve_model(against, None, token)
        with progress_bar(disable=json_output) as progress:
            task = progress.add_task("Comparing", total=None)
            errors = layer_errors(
                source.folder,
                original,
                trust_remote_code,
                on_start=lambda total: progress.update(task, total=total),
                on_layer=lambda name: progress.update(task, advance=1, description=name),
            )
        if plot is not None:
            plot_layer_errors(errors, plot, f"{path}: error of each layer against {against}")
    evaluation = read_eval(source.folder)
    if json_output:
        result = _inspect_json(summary)
        if errors is not None:
            result["layer_errors"] = [asdict(error) for error in errors]
        if evaluation is not None:
            result["eval"] = evaluation
        print(json.dumps(result))
        return
    _print_inspect(summary, path)
    if evaluation is not None:
        print_eval(evaluation)
    if errors is not None:
        _print_layer_errors(errors, against, show_all)
    if plot is not None:
        stderr.print(f"Plot: {plot}", soft_wrap=True)  # a path, never broken


def _print_layer_errors(errors: list, original: str, show_all: bool) -> None:
    """Per layer type (mean and worst), then the worst layers, or all of them."""
    by_kind: dict[str, list] = {}
    for error in errors:
        by_kind.setdefault(error.kind, []).append(error)
    stdout.print(f"Relative error of the quantized weights against {original}:", soft_wrap=True)
    kinds = Table(title="per layer type, worst first")
    kinds.add_column("layer type")
    for column in ("layers", "mean relative error", "worst relative error"):
        kinds.add_column(column, justify="right")
    for kind, group in sorted(by_kind.items(), key=lambda item: -item[1][0].relative_error):
        mean = sum(error.relative_error for error in group) / len(group)
        kinds.add_row(kind, str(len(group)), f"{mean:.5f}", f"{group[0].relative_error:.5f}")
    print_wide(kinds)
    shown = errors if show_all else errors[:10]
    title = (
        "every quantized layer" if show_all else f"the {len(shown)} worst of {len(errors)} layers"
    )
    table = Table(title=f"{title} (--all lists every layer)" if not show_all else title)
    table.add_column("layer", no_wrap=True)
    table.add_column("relative error", justify="right")
    table.add_column("SNR", justify="right")
    table.add_column("")
    worst = max((error.relative_error for error in errors), default=0.0) or 1.0
    for error in shown:
        bar = "█" * max(1, round(30 * error.relative_error / worst))
        table.add_row(error.name, f"{error.relative_error:.5f}", f"{error.snr_db:.1f} dB", bar)
    print_wide(table)


def _inspect_json(summary: CheckpointSummary) -> dict:
    return {
        "kind": summary.kind,
        "scheme": summary.config.label if summary.config else None,
        "total_bytes": summary.total_bytes,
        "files": summary.files,
        "bits_per_weight": round(summary.bits_per_weight, 4),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "shape": list(layer.shape),
                "bytes": layer.nbytes,
            }
            for layer in summary.layers
        ],
        "metadata": summary.metadata,
        "runs_in": {
            verdict.runtime: {"runs": verdict.runs, "why": verdict.why}
            for verdict in checkpoint_runtimes(summary.config, summary.metadata)
        }
        if summary.config
        else None,
    }


def _print_inspect(summary: CheckpointSummary, path: str) -> None:
    if summary.kind == "float":
        stdout.print(f"{path} is a plain float checkpoint (not quantized).", soft_wrap=True)
    elif summary.kind.startswith("other:"):
        stdout.print(
            f"{path} is quantized by another tool ({summary.kind[6:]}); quantcli reads "
            "compressed-tensors int checkpoints only."
        )
    table = Table(title=f"{path}: {len(summary.layers)} weight matrices")
    table.add_column("layer", no_wrap=True)
    for column in ("kind", "shape (out, in)", "bits", "group", "scheme"):
        table.add_column(column)
    table.add_column("size", justify="right")
    config = summary.config
    for layer in summary.layers:
        quantized = layer.kind != "float" and config is not None
        table.add_row(
            layer.name,
            layer.kind,
            " x ".join(map(str, layer.shape)),
            str(config.bits) if quantized else "16/32",
            str(config.group_size or "-") if quantized else "-",
            config.scheme.value if quantized else "-",
            format_bytes(layer.nbytes),
        )
    longest = max((len(layer.name) for layer in summary.layers), default=0)
    table.columns[0].min_width = longest  # names are never cut
    print_wide(table, longest + 80)
    totals = Table(show_header=False, box=None)
    totals.add_row("format", summary.kind + (f" ({config.label})" if config else ""))
    totals.add_row("size", f"{format_bytes(summary.total_bytes)} in {summary.files} file(s)")
    source_bytes = summary.metadata.get("source_bytes")
    if source_bytes and source_bytes.isdigit():
        ratio = int(source_bytes) / summary.total_bytes
        totals.add_row("compression", f"{ratio:.2f}x (source: {format_bytes(int(source_bytes))})")
    if config:
        totals.add_row("bits/weight", f"{summary.bits_per_weight:.3f} (quantized layers)")
        totals.add_row("linear layers in float", ", ".join(config.exclude) or "none")
        for verdict in checkpoint_runtimes(config, summary.metadata):
            totals.add_row(f"runs in {verdict.runtime}", str(verdict))
    totals.add_row("other tensors", format_bytes(summary.other_bytes))
    for key in ("quantcli_version", "quantcli_format_version", "source_model", "source_revision"):
        if summary.metadata.get(key):
            totals.add_row(key, summary.metadata[key])
    stdout.print(totals)
