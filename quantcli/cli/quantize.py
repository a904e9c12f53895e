"""`quantcli quantize`: a checkpoint's linear layers into a compressed-tensors checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from quantcli.cli.options import (
    DTYPES,
    Bits,
    DtypeChoice,
    JsonOption,
    RevisionOption,
    ThreadsOption,
    TokenOption,
    TrustRemoteCodeOption,
    check_range,
)
from quantcli.cli.output import (
    progress_bar,
    stderr,
    stdout,
)
from quantcli.cli.process import command_line, return_big_frees_to_the_os, use_threads
from quantcli.config import Granularity, QuantConfig, Scheme
from quantcli.models.source import resolve_model
from quantcli.models.streaming import QuantizeSummary, quantize_checkpoint
from quantcli.units import format_bytes, parse_size

# Shown under --help.
EXAMPLES = [
    "quantcli quantize facebook/opt-125m --out ./opt-125m-int8",
    "quantcli quantize ./my-llama --out ./llama-int4 --bits 4 --group-size 64",
    "quantcli quantize gpt2 --out ./gpt2-int8 --exclude '*.attn.*' --json",
]


def quantize(
    model: Annotated[str, typer.Argument(help="Hub model id or local folder (safetensors).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (must not exist).", metavar="FOLDER")
    ],
    bits: Annotated[Bits, typer.Option(help="Weight bits.")] = Bits.eight,
    scheme: Annotated[
        Scheme | None,
        typer.Option(help="sym (absmax) or asym (zero point). Default: sym for 8, asym below."),
    ] = None,
    granularity: Annotated[
        Granularity | None,
        typer.Option(
            help="Scale per tensor, channel (row) or group. Default: channel for 8, group below."
        ),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help="Inputs per group (default 32 with groups).", metavar="N")
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GLOB",
            help="Keep modules matching this glob in float (repeatable), e.g. '*.mlp.down_proj'.",
        ),
    ] = None,
    quantize_head: Annotated[
        bool,
        typer.Option(
            "--quantize-head",
            help="Quantize the output head too. A head tied to the input embeddings "
            "(SmolLM2, Llama 3.2) is untied: the embeddings stay float and the head is "
            "stored quantized beside them (tie_word_embeddings: false).",
        ),
    ] = False,
    quantize_embeddings: Annotated[
        bool,
        typer.Option(
            "--quantize-embeddings",
            help="Quantize the input embedding table too (a lookup dequantizes only the "
            "rows it reads). A head tied to it computes from the same quantized table: "
            "one copy for both, as llama.cpp does. quantcli and vLLM load it; see "
            "docs/accuracy.md for its cost in perplexity.",
        ),
    ] = False,
    optimize: Annotated[
        bool,
        typer.Option(
            "--optimize/--no-optimize",
            help="Search each group's clipping range for the least reconstruction error "
            "instead of rounding its full range (no calibration data; slower to quantize).",
        ),
    ] = False,
    dtype: Annotated[
        DtypeChoice,
        typer.Option(help="dtype of scales and unquantized tensors (auto: keep the model's)."),
    ] = DtypeChoice.auto,
    max_shard_size: Annotated[
        str, typer.Option(help="Largest output file, e.g. 500MB, 5GB.", metavar="SIZE")
    ] = "5GB",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it is empty or a quantcli output.")
    ] = False,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Read .bin/.pt weights when the model has no safetensors, with "
            "torch.load(weights_only=True) (tensors only, no code).",
        ),
    ] = False,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
) -> None:
    """Quantize a checkpoint's linear layers into a compressed-tensors checkpoint.

    Streams the source one tensor at a time (the float model is never built), so memory
    stays flat whatever the model size. The output loads with quantcli, transformers
    (with compressed-tensors installed) and vLLM.
    """
    check_range("--group-size", group_size, 1)
    check_range("--threads", threads, 1)
    return_big_frees_to_the_os()
    use_threads(threads)
    config = QuantConfig(
        bits=int(bits.value),
        scheme=scheme,
        granularity=granularity,
        group_size=group_size,
        exclude=tuple(exclude or ()),
        quantize_head=quantize_head,
        quantize_embeddings=quantize_embeddings,
        dtype=DTYPES[dtype.value],
        optimize=optimize,
    )
    source = resolve_model(model, revision, token, allow_pickle)
    with progress_bar(disable=json_output) as progress:
        task = progress.add_task("Quantizing", total=None)
        summary = quantize_checkpoint(
            source,
            out,
            config,
            max_shard_size=parse_size(max_shard_size),
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            command=command_line(),
            on_start=lambda total: progress.update(task, total=total),
            on_tensor=lambda name: progress.update(task, advance=1, description=name),
            allow_pickle=allow_pickle,
        )
    if json_output:
        print(json.dumps(_quantize_json(summary, config, model)))
    else:
        _print_quantize_summary(summary, config)


def _quantize_json(summary: QuantizeSummary, config: QuantConfig, model: str) -> dict:
    return {
        "model": model,
        "output": str(summary.output),
        "scheme": config.label,
        "layers_quantized": len(summary.quantized),
        "layers_float": summary.skipped,
        "source_bytes": summary.source_bytes,
        "output_bytes": summary.output_bytes,
        "bits_per_weight": round(summary.bits_per_weight, 4),
        "shards": summary.shards,
        "seconds": round(summary.seconds, 3),
        "peak_rss_bytes": summary.peak_rss_bytes,
        "warnings": summary.warnings,
    }


def _print_quantize_summary(summary: QuantizeSummary, config: QuantConfig) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("output", f"{summary.output} ({summary.shards} file(s))")
    table.add_row("scheme", config.label)
    table.add_row(
        "layers", f"{len(summary.quantized)} quantized, {len(summary.skipped)} kept in float"
    )
    for name, reason in list(summary.skipped.items())[:5]:
        table.add_row("", f"[dim]{name}: {reason}[/]")
    if len(summary.skipped) > 5:
        table.add_row("", f"[dim]... and {len(summary.skipped) - 5} more[/]")
    ratio = summary.source_bytes / summary.output_bytes if summary.output_bytes else 0
    before, after = format_bytes(summary.source_bytes), format_bytes(summary.output_bytes)
    table.add_row("size", f"{before} -> {after} ({ratio:.2f}x smaller)")
    table.add_row(
        "bits/weight", f"{summary.bits_per_weight:.3f} (quantized layers, scales included)"
    )
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("peak memory", f"{format_bytes(summary.peak_rss_bytes)} (whole process)")
    stdout.print(table)
    for warning in summary.warnings:
        stderr.print(f"[yellow]Warning:[/] {warning}")
