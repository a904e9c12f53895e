"""The `quantcli` command line: a thin Typer layer over the library.

Commands parse arguments, call the library and print; they hold no quantization logic.
Every failure the user can act on is a `QuantcliError`, printed as one line on stderr
with its exit code and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import ctypes
import errno
import json
import shlex
import signal
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantcli import __version__
from quantcli.checkpoint import CheckpointSummary, read_eval
from quantcli.config import Granularity, QuantConfig, Scheme
from quantcli.errors import NotFoundError, QuantcliError, UsageError, first_line
from quantcli.hub import push_checkpoint
from quantcli.models.evaluation import default_text, evaluate, save_result
from quantcli.models.generation import generate_text, load_tokenizer
from quantcli.models.layer_errors import layer_errors
from quantcli.models.loading import load_any, load_quantized, sanity_forward, summarize_folder
from quantcli.models.source import expand_model_folders, resolve_model
from quantcli.models.streaming import QuantizeSummary, quantize_checkpoint
from quantcli.nn.kernels import kernel_plan
from quantcli.plots import check_plot_path, plot_evaluations, plot_layer_errors
from quantcli.units import format_bytes, parse_size

app = typer.Typer(
    name="quantcli",
    help="Quantize Hugging Face checkpoints (int8, int4, int2), publish them to the Hub and "
    "run them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)
stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def _version(value: bool) -> None:
    if value:
        print(f"quantcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show the full traceback when a command fails.")
    ] = False,
) -> None:
    """Quantize Hugging Face checkpoints, publish them to the Hub and run them."""
    _state["debug"] = debug


_state = {"debug": False}


def _command_line() -> str:
    """This run's command line for the record, with any --token value masked."""
    args = sys.argv[1:]
    masked = []
    for i, arg in enumerate(args):
        if i and args[i - 1] == "--token":
            masked.append("***")
        else:
            masked.append("--token=***" if arg.startswith("--token=") else arg)
    return shlex.join(["quantcli", *masked])


def _return_big_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process.

    By default glibc raises the threshold to the largest block freed so far (an embedding
    matrix, say), after which every smaller tensor comes from a heap that only grows:
    quantizing a 1 GB model then peaked 250 MB higher. Set only by quantize and load,
    which pass through many large one-off tensors; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


RevisionOption = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit (Hub ids only).")
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`).",
        show_default=False,
    ),
]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Allow running the model's own Python code from its repo."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON summary, nothing else.")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Say which dtype and matmul kernels run.")
]
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Bits(str, Enum):
    eight = "8"
    four = "4"
    two = "2"


class DtypeChoice(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


RunDtypeOption = Annotated[
    DtypeChoice,
    typer.Option(
        "--dtype",
        help="dtype of activations and float tensors (auto: the fastest for the device and "
        "the layers' kernels, e.g. bf16 for int8/int4 on CPU, fp32 for 2-bit).",
    ),
]


@app.command(
    epilog="Examples:\n\n"
    "`quantcli quantize facebook/opt-125m --out ./opt-125m-int8`\n\n"
    "`quantcli quantize ./my-llama --out ./llama-int4 --bits 4 --group-size 64`\n\n"
    "`quantcli quantize gpt2 --out ./gpt2-int8 --exclude '*.attn.*' --json`"
)
def quantize(
    model: Annotated[str, typer.Argument(help="Hub model id or local folder (safetensors).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (must not exist).")],
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
        int | None, typer.Option(help="Inputs per group (default 32 with groups).", min=1)
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Keep modules matching this glob in float (repeatable), e.g. '*.mlp.down_proj'."
        ),
    ] = None,
    quantize_head: Annotated[
        bool, typer.Option("--quantize-head", help="Quantize the output head too.")
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
        str, typer.Option(help="Largest output file, e.g. 500MB, 5GB.")
    ] = "5GB",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
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
    json_output: JsonOption = False,
) -> None:
    """Quantize a checkpoint's linear layers into a compressed-tensors checkpoint.

    Streams the source one tensor at a time (the float model is never built), so memory
    stays flat whatever the model size. The output loads with quantcli, transformers
    (with compressed-tensors installed) and vLLM.
    """
    _return_big_frees_to_the_os()
    config = QuantConfig(
        bits=int(bits.value),
        scheme=scheme,
        granularity=granularity,
        group_size=group_size,
        exclude=tuple(exclude or ()),
        quantize_head=quantize_head,
        dtype=DTYPES[dtype.value],
        optimize=optimize,
    )
    source = resolve_model(model, revision, token, allow_pickle)
    with _progress(disable=json_output) as progress:
        task = progress.add_task("Quantizing", total=None)
        summary = quantize_checkpoint(
            source,
            out,
            config,
            max_shard_size=parse_size(max_shard_size),
            overwrite=overwrite,
            trust_remote_code=trust_remote_code,
            command=_command_line(),
            on_start=lambda total: progress.update(task, total=total),
            on_tensor=lambda name: progress.update(task, advance=1, description=name),
            allow_pickle=allow_pickle,
        )
    if json_output:
        print(json.dumps(_quantize_json(summary, config, model)))
    else:
        _print_quantize_summary(summary, config)


@app.command(
    epilog="Examples:\n\n`quantcli load ./opt-125m-int8`\n\n"
    "`quantcli load me/opt-125m-int8 --dtype bf16 --json`"
)
def load(
    model: Annotated[str, typer.Argument(help="Quantized checkpoint: local folder or Hub id.")],
    device: Annotated[str, typer.Option(help="Device to load onto: cpu, cuda, cuda:1...")] = "cpu",
    dtype: RunDtypeOption = DtypeChoice.auto,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Load a quantized checkpoint without a float copy and run one forward pass."""
    _return_big_frees_to_the_os()
    source = resolve_model(model, revision, token)
    loaded, report = load_quantized(source, device, _run_dtype(dtype), trust_remote_code)
    check = sanity_forward(loaded)
    result = {
        "model": model,
        "model_class": report.model_class,
        "bits": report.config.bits,
        "layers_quantized": report.quantized,
        "layers_float": report.kept_float,
        "bytes_in_memory": report.tensor_bytes,
        "load_seconds": round(report.seconds, 3),
        "peak_rss_bytes": report.peak_rss_bytes,
        "forward_ok": check,
        "dtype": _dtype_name(report.dtype),
        "kernels": _kernels(loaded, device, report.dtype),
    }
    if json_output:
        print(json.dumps(result))
        return
    table = Table(show_header=False, box=None)
    table.add_row("model", f"{report.model_class} from {model}")
    table.add_row(
        "layers",
        f"{report.quantized} quantized (int{report.config.bits}), "
        f"{report.kept_float} kept in float",
    )
    table.add_row("in memory", format_bytes(report.tensor_bytes))
    table.add_row("load time", f"{report.seconds:.2f} s")
    table.add_row("peak memory", f"{format_bytes(report.peak_rss_bytes)} (whole process)")
    table.add_row("forward pass", check)
    if verbose:
        _add_kernel_rows(table, result)
    stdout.print(table)


def _run_dtype(choice: DtypeChoice) -> torch.dtype | str:
    return "auto" if choice is DtypeChoice.auto else DTYPES[choice.value]


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "as stored" if dtype is None else str(dtype).removeprefix("torch.")


def _kernels(model, device: str, dtype: torch.dtype | None, prompt_tokens: int = 64) -> dict:
    """Which matmul kernel serves how many quantized layers, at decode and at prefill."""
    dtype = dtype or next(iter(model.buffers())).dtype
    device_type = torch.device(device).type
    return {
        "decode (1 token)": dict(kernel_plan(model, device_type, dtype, 1)),
        f"prefill ({prompt_tokens} tokens)": dict(
            kernel_plan(model, device_type, dtype, prompt_tokens)
        ),
    }


def _add_kernel_rows(table: Table, result: dict) -> None:
    table.add_row("activations", result["dtype"])
    for phase, counts in result["kernels"].items():
        plan = ", ".join(f"{name} x{count}" for name, count in counts.items())
        table.add_row(phase, plan or "no quantized layers")


@app.command(
    epilog="Examples:\n\n`quantcli inspect ./opt-125m-int8`\n\n"
    "`quantcli inspect me/opt-125m-int8 --json`"
)
def inspect(
    path: Annotated[str, typer.Argument(help="Checkpoint folder or Hub id.")],
    against: Annotated[
        str | None,
        typer.Option(
            help="The float original (folder or Hub id): report each quantized layer's "
            "relative error and SNR against it, worst first (reads one layer at a time).",
            show_default=False,
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            help="With --against: also draw the errors as a bar chart, one colour per layer "
            "type, into this .png/.svg/.pdf (needs matplotlib: pip install 'quantcli[plot]').",
            show_default=False,
        ),
    ] = None,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show what a checkpoint holds, layer by layer, from its headers only."""
    if plot is not None:
        if against is None:
            raise UsageError("--plot draws each layer's error: add --against ORIGINAL.")
        plot = check_plot_path(plot)
    source = resolve_model(path, revision, token)
    summary = summarize_folder(source.folder)
    errors = None
    if against is not None:
        original = resolve_model(against, None, token)
        with _progress(disable=json_output) as progress:
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
        _print_eval(evaluation)
    if errors is not None:
        _print_layer_errors(errors, against)
    if plot is not None:
        stderr.print(f"Plot: {plot}")


@app.command(
    epilog="Examples:\n\n`quantcli push ./opt-125m-int8 me/opt-125m-int8`\n\n"
    "`quantcli push ./llama-int4 me/llama-int4 --private --revision v2`"
)
def push(
    folder: Annotated[Path, typer.Argument(help="Quantized checkpoint folder (from quantize).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, USER/NAME (created if needed).")],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repository private.")
    ] = False,
    revision: Annotated[
        str | None, typer.Option(help="Branch to push to (created if missing).")
    ] = None,
    commit_message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")
    ] = False,
    overwrite_card: Annotated[
        bool, typer.Option("--overwrite-card", help="Regenerate README.md even if you edited it.")
    ] = False,
    token: TokenOption = None,
    json_output: JsonOption = False,
) -> None:
    """Upload a quantized checkpoint to the Hub, with a model card written from its files.

    The card (README.md in the folder) lists the settings, sizes, the command that made the
    checkpoint and how to use it. A card you edited is kept unless --overwrite-card.
    Pushing unchanged files makes no new commit.
    """
    if create_pr and revision:
        raise UsageError("--create-pr opens a pull request against main: drop --revision.")
    result = push_checkpoint(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message,
        create_pr=create_pr,
        overwrite_card=overwrite_card,
    )
    if json_output:
        print(json.dumps(result.__dict__))
        return
    stderr.print(f"Model card: {result.card}.")
    if not result.changed:
        stdout.print(
            f"No changes: {result.repo_url} already has these files "
            f"(commit {result.commit_oid[:10]}); nothing was committed."
        )
    elif result.pr_url:
        stdout.print(f"Opened {result.pr_url} (commit {result.commit_oid[:10]}).")
    else:
        stdout.print(f"Pushed to {result.repo_url} (commit {result.commit_url}).")


@app.command(
    "eval",
    epilog="Examples:\n\n`quantcli eval ./smollm2-int4`\n\n"
    "`quantcli eval ./smollm2-int4 --baseline HuggingFaceTB/SmolLM2-135M-Instruct "
    "--max-tokens 4096`\n\n`quantcli eval ./smollm2-int8 ./smollm2-int4 --plot ppl.png`\n\n"
    "`quantcli eval ./quantized/ --plot ppl.png` (every checkpoint in the folder)\n\n"
    "`quantcli eval ./bert-int8 --baseline ./bert --text notes.txt --json`",
)
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
            help="UTF-8 text file to score (default: a public-domain Shakespeare excerpt "
            "shipped with quantcli).",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Score at most this many tokens.", min=2)] = 16384,
    window: Annotated[int, typer.Option(help="Tokens per forward pass (context).", min=2)] = 512,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Tokens between windows (default: the window; less adds context).", min=1
        ),
    ] = None,
    dtype: Annotated[
        DtypeChoice,
        typer.Option(
            help="dtype of both models' activations. fp32 (default) measures what the weights "
            "lost; bf16 adds the activations' rounding (auto: the fastest, as in generate)."
        ),
    ] = DtypeChoice.fp32,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...")] = "cpu",
    plot: Annotated[
        Path | None,
        typer.Option(
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
    json_output: JsonOption = False,
) -> None:
    """Measure what quantization cost: perplexity, and against the float model ΔPPL, KL
    divergence and top-1 agreement (cosine similarity of the outputs for encoders).

    Each result is saved in its checkpoint folder (quantcli_eval.json), where `inspect`
    shows it and `push` puts it on the model card. With several models, `--json` prints
    one JSON object per line.
    """
    if plot is not None:
        plot = check_plot_path(plot)
    if text is None:
        text_name, content = default_text()
    else:
        text_name, content = text.name, _read_text(text)
    run_dtype = _run_dtype(dtype)
    # loaded once and shared by the models; None for a recorded source that is unreachable
    baselines: dict[str, torch.nn.Module | None] = {}
    results = []
    models = expand_model_folders(models)
    sources = [resolve_model(model, revision, token) for model in models]  # fail before work
    for model, source in zip(models, sources, strict=True):
        summary = summarize_folder(source.folder)
        recorded = summary.metadata.get("source_model") or None
        baseline_name = None if no_baseline else baseline or recorded
        if baseline_name is not None and baseline_name not in baselines:
            try:
                baselines[baseline_name] = load_any(
                    resolve_model(baseline_name, None, token),
                    device,
                    run_dtype,
                    trust_remote_code,
                )
            except NotFoundError as error:
                if baseline is not None:
                    raise
                stderr.print(f"(no baseline: the recorded source is not reachable: {error})")
                baselines[baseline_name] = None
        if baselines.get(baseline_name) is None:
            baseline_name = None
        scored = load_any(source, device, run_dtype, trust_remote_code)
        with _progress(disable=json_output) as progress:
            task = progress.add_task(f"Scoring {model}", total=None)
            result = evaluate(
                scored,
                load_tokenizer(source.folder),
                content,
                text_name=text_name,
                model_name=model,
                baseline=baselines.get(baseline_name),
                baseline_name=baseline_name,
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
        _print_eval(results[-1])
        if saved is not None:
            stderr.print(f"Saved to {saved}")
    if plot is not None:
        plot_evaluations(results, plot)
        stderr.print(f"Plot: {plot}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise UsageError(f"--text {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(
            f"--text {path} is not readable UTF-8 text ({first_line(error)})."
        ) from None


def _print_eval(result: dict) -> None:
    table = Table(show_header=False, box=None, title="evaluation")
    table.add_row(
        "model",
        f"{result['model']} ({result['scheme']})" if "scheme" in result else result["model"],
    )
    table.add_row("text", f"{result['text']}: {result['tokens']} tokens scored")
    table.add_row("windows", f"{result['window']} tokens, stride {result['stride']}")
    table.add_row("activations", result["dtype"])
    if "perplexity" in result:
        table.add_row("perplexity", f"{result['perplexity']:.4f}")
    if "baseline" in result:
        table.add_row("baseline", result["baseline"])
    if "baseline_perplexity" in result:
        table.add_row("baseline perplexity", f"{result['baseline_perplexity']:.4f}")
        table.add_row(
            "Δ perplexity",
            f"{result['delta_perplexity']:+.4f} ({result['delta_perplexity_percent']:+.2f}%)",
        )
        table.add_row("KL divergence", f"{result['kl_divergence']:.5f} nats/token")
        table.add_row("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%")
    if "cosine_similarity" in result:
        table.add_row("cosine similarity", f"{result['cosine_similarity']:.5f}")
    stdout.print(table)


def _print_layer_errors(errors: list, original: str) -> None:
    table = Table(title=f"error of each quantized layer against {original}, worst first")
    table.add_column("layer", no_wrap=True)
    table.add_column("relative error", justify="right")
    table.add_column("SNR", justify="right")
    table.add_column("")
    worst = max((error.relative_error for error in errors), default=0.0) or 1.0
    for error in errors:
        bar = "█" * max(1, round(30 * error.relative_error / worst))
        table.add_row(error.name, f"{error.relative_error:.5f}", f"{error.snr_db:.1f} dB", bar)
    stdout.print(table)


@app.command(
    epilog='Examples:\n\n`quantcli generate me/opt-125m-int8 "The capital of France is"`\n\n'
    '`echo "Tell me a joke" | quantcli generate ./smollm2-int8 - --max-new-tokens 64`'
)
def generate(
    model: Annotated[str, typer.Argument(help="Quantized checkpoint: local folder or Hub id.")],
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from stdin.")],
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.", min=1)] = 128,
    do_sample: Annotated[
        bool, typer.Option("--do-sample/--greedy", help="Sample, or take the likeliest token.")
    ] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.", min=0.0)] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k likeliest tokens.", min=0)] = 50,
    seed: Annotated[int | None, typer.Option(help="Random seed, for repeatable sampling.")] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Apply the chat template (default: when it has one)."
        ),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message (chat only).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...")] = "cpu",
    dtype: RunDtypeOption = DtypeChoice.auto,
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Static KV cache and torch.compile of the decode step: about 2x faster "
            "decoding on small models, after tens of seconds of compilation.",
        ),
    ] = False,
    revision: RevisionOption = None,
    token: TokenOption = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Generate text with a quantized model, streaming tokens as they come."""
    if prompt == "-":
        prompt = sys.stdin.read()
    source = resolve_model(model, revision, token)
    loaded, report = load_quantized(source, device, _run_dtype(dtype))
    tokenizer = load_tokenizer(source.folder)
    if verbose and not json_output:
        table = Table(show_header=False, box=None)
        _add_kernel_rows(
            table,
            {"dtype": _dtype_name(report.dtype), "kernels": _kernels(loaded, device, report.dtype)},
        )
        stderr.print(table)
    streamer = None
    if not json_output:
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = generate_text(
        loaded,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        chat=chat,
        system=system,
        streamer=streamer,
        compile=compile_model,
    )
    if json_output:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "prompt_tokens": result.prompt_tokens,
                    "new_tokens": result.new_tokens,
                    "seconds": round(result.seconds, 3),
                    "first_token_seconds": round(result.first_token_seconds, 3),
                    "tokens_per_second": round(result.tokens_per_second, 2),
                    "decode_tokens_per_second": round(result.decode_tokens_per_second, 2),
                    "dtype": _dtype_name(report.dtype),
                }
            )
        )
        return
    if result.max_new_tokens < max_new_tokens:
        stderr.print(f"(capped at {result.max_new_tokens} new tokens: the model's context is full)")
    stderr.print(
        f"{result.new_tokens} tokens in {result.seconds:.2f} s: first after "
        f"{result.first_token_seconds:.2f} s ({result.prompt_tokens}-token prompt), then "
        f"{result.decode_tokens_per_second:.1f} tokens/s"
    )


def _progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description:<40.40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        disable=disable,
        transient=True,
    )


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
    }


def _print_inspect(summary: CheckpointSummary, path: str) -> None:
    if summary.kind == "float":
        stdout.print(f"{path} is a plain float checkpoint (not quantized).")
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
    wide = stdout if stdout.is_terminal else Console(highlight=False, width=longest + 80)
    wide.print(table)
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
    totals.add_row("other tensors", format_bytes(summary.other_bytes))
    for key in ("quantcli_version", "quantcli_format_version", "source_model", "source_revision"):
        if summary.metadata.get(key):
            totals.add_row(key, summary.metadata[key])
    stdout.print(totals)


class Stopped(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM, raised so that cleanups (temporary folders) run.

    Our own exception rather than KeyboardInterrupt, which Typer turns into a silent exit.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def main() -> None:
    """Console entry point: run the app; every failure ends as one line and an exit code.

    Exit codes: 2 usage, 3 not found or refused, 4 bad checkpoint, 5 out of resources,
    1 internal error, 130 interrupted, 143 terminated. --debug shows the traceback.
    """
    signal.signal(signal.SIGINT, _raise_stopped)
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        app()  # usage errors and --help are handled by Typer, which exits itself
    except QuantcliError as error:
        _fail(error, str(error), error.exit_code)
    except Stopped as error:
        word = "Interrupted" if error.signum == signal.SIGINT else "Terminated"
        _fail(error, f"{word}: nothing was left half-written.", 128 + error.signum)
    except MemoryError as error:
        _fail(error, "out of memory: close other programs or use a machine with more.", 5)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail(error, "the disk is full: free some space and run again.", 5)
        _fail(error, f"{first_line(error)}.", 1)
    except Exception as error:
        _fail(
            error,
            f"internal error ({type(error).__name__}: {first_line(error)}): a bug in quantcli; "
            "run again with --debug for the traceback and report it.",
            1,
        )


def _fail(error: BaseException, message: str, code: int) -> None:
    if _state["debug"]:
        raise error
    stderr.print(f"[bold red]Error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)
