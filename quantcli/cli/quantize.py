"""`quantcli quantize`: a checkpoint's linear layers into a compressed-tensors checkpoint."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TimeRemainingColumn
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
from quantcli.errors import UsageError
from quantcli.models.calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    calibration_set,
    read_calibration,
)
from quantcli.models.generation import load_tokenizer
from quantcli.models.gptq import GPTQSettings
from quantcli.models.source import resolve_model
from quantcli.models.streaming import QuantizeSummary, quantize_checkpoint
from quantcli.tensor.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP
from quantcli.units import format_bytes, parse_size


class Method(str, Enum):
    rtn = "rtn"
    gptq = "gptq"


def gptq_progress_bar(disable: bool) -> Progress:
    """The usual bar, with the time left (GPTQ's blocks take minutes)."""
    bar = progress_bar(disable)
    bar.columns = (*bar.columns, TimeRemainingColumn())
    return bar


# Shown under --help.
EXAMPLES = [
    "quantcli quantize facebook/opt-125m --out ./opt-125m-int8",
    "quantcli quantize ./my-llama --out ./llama-int4 --bits 4 --group-size 64",
    "quantcli quantize gpt2 --out ./gpt2-int8 --exclude '*.attn.*' --json",
    "quantcli quantize ./my-llama --out ./llama-int4-gptq --bits 4 --method gptq",
]


def quantize(
    ctx: typer.Context,
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
        bool | None,
        typer.Option(
            "--optimize/--no-optimize",
            help="Search each group's clipping range for the least reconstruction error "
            "instead of rounding its full range (slower to quantize). Default: on with "
            "--method gptq below 8 bits (less perplexity lost at 2 and 4 bits there), off "
            "otherwise (round to nearest loses more with it at 4 bits). See docs/accuracy.md.",
        ),
    ] = None,
    method: Annotated[
        Method,
        typer.Option(
            help="rtn: round to nearest, tensor by tensor (seconds, flat memory, no data). "
            "gptq: GPTQ on calibration text, block by block (runs the text through every "
            "block a few times: minutes on CPU for a 100M model, about one block's weights plus "
            "the samples' activations in memory; less accuracy lost at 4 and 2 bits).",
        ),
    ] = Method.rtn,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="gptq: calibration text, plain UTF-8 or JSONL with a 'text' field "
            "(default: the shipped KJV Genesis, never eval's default text).",
            metavar="FILE",
        ),
    ] = None,
    samples: Annotated[
        int,
        typer.Option(help="gptq: calibration samples (fewer if the text is short).", metavar="N"),
    ] = DEFAULT_SAMPLES,
    seq_len: Annotated[
        int, typer.Option(help="gptq: tokens per sample.", metavar="TOKENS")
    ] = DEFAULT_SEQ_LEN,
    damp: Annotated[
        float,
        typer.Option(
            help="gptq: dampening, a fraction of the Hessian's mean diagonal.", metavar="FRACTION"
        ),
    ] = DEFAULT_DAMP,
    block_size: Annotated[
        int, typer.Option(help="gptq: columns rounded per lazy update.", metavar="N")
    ] = DEFAULT_BLOCK_SIZE,
    act_order: Annotated[
        bool | None,
        typer.Option(
            "--act-order/--no-act-order",
            help="gptq: round each layer's columns in decreasing order of their inputs' "
            "energy, with static group scales (computed before reordering), so the output "
            "is an ordinary group-quantized checkpoint (no g_idx). Default: on below 8 bits "
            "(where it loses less), off at 8.",
        ),
    ] = None,
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
    below_8 = int(bits.value) < 8  # where GPTQ's options measured better (docs/accuracy.md)
    if optimize is None:
        optimize = method is Method.gptq and below_8
    if act_order is None:
        act_order = below_8
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
    gptq = None
    if method is Method.rtn:
        _refuse_gptq_options(ctx)
    source = resolve_model(model, revision, token, allow_pickle)
    if method is Method.gptq:  # the text is checked before anything is written
        check_range("--samples", samples, 1)
        check_range("--seq-len", seq_len, 2)
        check_range("--block-size", block_size, 1)
        if not damp > 0:
            raise UsageError(f"--damp {damp} must be positive.")
        text = read_calibration(calibration)
        tokenizer = load_tokenizer(source.folder)
        gptq = GPTQSettings(
            calibration_set(text, tokenizer, samples, seq_len), damp, block_size, act_order
        )
    with gptq_progress_bar(disable=json_output) as progress:
        task = progress.add_task("Quantizing", total=None)
        blocks = progress.add_task("GPTQ blocks", total=None, visible=gptq is not None)
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
            gptq=gptq,
            on_block=lambda done, total: progress.update(blocks, completed=done, total=total),
        )
    if json_output:
        print(json.dumps({**_quantize_json(summary, config, model), "method": method.value}))
    else:
        _print_quantize_summary(summary, config)
        if gptq is not None:
            described = gptq.calibration.describe()
            stdout.print(
                f"  method       GPTQ on {described['samples']} x {described['seq_len']} "
                f"tokens of {described['name']}"
            )


#: Options that only GPTQ reads: refused with --method rtn rather than silently ignored.
GPTQ_OPTIONS = ("calibration", "samples", "seq_len", "damp", "block_size", "act_order")


def _refuse_gptq_options(ctx: typer.Context) -> None:
    given = [
        name
        for name in GPTQ_OPTIONS
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in _DEFAULTS
    ]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} applies to --method gptq only (the method here is rtn).")


_DEFAULTS = ("DEFAULT", "DEFAULT_MAP")


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
