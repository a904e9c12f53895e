"""`quantcli generate`: stream text from a quantized model."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.table import Table

from quantcli.cli.options import (
    DtypeChoice,
    JsonOption,
    RevisionOption,
    RunDtypeOption,
    ThreadsOption,
    TokenOption,
    TrustRemoteCodeOption,
    VerboseOption,
    check_device,
    check_range,
    dtype_name,
    run_dtype,
)
from quantcli.cli.output import (
    add_kernel_rows,
    kernel_summary,
    stderr,
)
from quantcli.cli.process import use_threads
from quantcli.errors import UsageError
from quantcli.models.generation import (
    check_generates_text,
    generate_text,
    load_tokenizer,
    uses_chat,
)
from quantcli.models.loading import load_any
from quantcli.models.source import resolve_model

# Shown under --help.
EXAMPLES = [
    'quantcli generate me/opt-125m-int8 "The capital of France is"',
    'echo "Tell me a joke" | quantcli generate ./smollm2-int8 - --max-new-tokens 64',
]


def generate(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(help="Quantized checkpoint or float model: local folder or Hub id."),
    ],
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from stdin.")],
    max_new_tokens: Annotated[
        int, typer.Option(help="Most tokens to generate.", metavar="N")
    ] = 128,
    do_sample: Annotated[
        bool, typer.Option("--do-sample/--greedy", help="Sample, or take the likeliest token.")
    ] = False,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (> 0).", metavar="T")
    ] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass, 0 to 1.", metavar="P")] = 1.0,
    top_k: Annotated[
        int, typer.Option(help="Sample among the k likeliest tokens.", metavar="K")
    ] = 50,
    seed: Annotated[
        int | None, typer.Option(help="Random seed, for repeatable sampling.", metavar="N")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat", help="Apply the chat template (default: when it has one)."
        ),
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="System message (chat only).", metavar="TEXT")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1...", metavar="DEVICE")] = "cpu",
    dtype: RunDtypeOption = DtypeChoice.auto,
    compile_model: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Static KV cache and torch.compile of the decode step: 1.9x faster int8 "
            "decoding on SmolLM2-135M (docs/benchmarks.md), after tens of seconds of "
            "compilation.",
        ),
    ] = False,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Generate text with a quantized model (or its float original, to compare), streaming
    tokens as they come."""
    check_device(device)
    check_range("--max-new-tokens", max_new_tokens, 1)
    check_range("--top-p", top_p, 0.0, 1.0)
    check_range("--top-k", top_k, 0)
    check_range("--threads", threads, 1)
    if do_sample and temperature <= 0:
        raise UsageError(f"--temperature {temperature}: sampling needs a temperature above 0.")
    if prompt == "-":
        prompt = _read_stdin()
    threads = use_threads(threads)
    source = resolve_model(model, revision, token)
    loaded = load_any(source, device, run_dtype(dtype), trust_remote_code)
    check_generates_text(loaded)  # before the tokenizer, which an image model lacks
    activations = next(iter(loaded.parameters())).dtype
    tokenizer = load_tokenizer(source.folder)
    for warning in _ignored_options(ctx, do_sample, uses_chat(tokenizer, chat)):
        stderr.print(f"[yellow]Warning:[/] {warning}")
    if verbose and not json_output:
        table = Table(show_header=False, box=None)
        add_kernel_rows(
            table,
            {
                "dtype": dtype_name(activations),
                "kernels": kernel_summary(loaded, device, activations),
                "threads": threads,
            },
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
                    "compile_seconds": round(result.compile_seconds, 3),
                    "dtype": dtype_name(activations),
                    "threads": threads,
                }
            )
        )
        return
    if result.max_new_tokens < max_new_tokens:
        stderr.print(f"(capped at {result.max_new_tokens} new tokens: the model's context is full)")
    compiled = f" (after {result.compile_seconds:.1f} s compiling)" if compile_model else ""
    stderr.print(
        f"{result.new_tokens} tokens in {result.seconds:.2f} s{compiled}: first after "
        f"{result.first_token_seconds:.2f} s ({result.prompt_tokens}-token prompt), then "
        f"{result.decode_tokens_per_second:.1f} tokens/s"
    )


def _ignored_options(ctx: typer.Context, do_sample: bool, chat: bool) -> list[str]:
    """The options given on the command line that this run does not use."""
    given = {
        name
        for name in ("temperature", "top_p", "top_k", "seed", "system")
        if ctx.get_parameter_source(name).name == "COMMANDLINE"
    }
    warnings = []
    sampling = sorted(given - {"system"})
    if sampling and not do_sample:
        options = ", ".join("--" + name.replace("_", "-") for name in sampling)
        verb = "applies" if len(sampling) == 1 else "apply"
        warnings.append(f"{options} only {verb} when sampling: add --do-sample.")
    if "system" in given and not chat:
        warnings.append("--system only applies to a chat prompt: it is ignored with --no-chat.")
    return warnings


def _read_stdin() -> str:
    """The prompt piped in, as strict UTF-8: binary data is refused by name rather than
    passed on as undecodable characters that the tokenizer chokes on."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"the prompt on stdin is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}): pipe text, or convert it (iconv -t UTF-8)."
        ) from None
