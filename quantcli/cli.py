"""The `quantcli` command line: a thin Typer layer over the library.

Commands parse arguments, call the library and print; they hold no quantization logic.
Every failure the user can act on is a `QuantcliError`, printed as one line on stderr
with its exit code and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from quantcli import __version__
from quantcli.errors import NotImplementedYet, QuantcliError

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


def _not_yet(command: str, issue: int) -> NotImplementedYet:
    return NotImplementedYet(
        f"'quantcli {command}' is not available yet in quantcli {__version__} "
        f"(planned in issue #{issue}); nothing was done."
    )


@app.command(epilog="Example: `quantcli quantize facebook/opt-125m --out ./opt-125m-int8`")
def quantize(
    model: Annotated[str, typer.Argument(help="Hub model id or local folder.")],
    out: Annotated[str, typer.Option("--out", help="Output folder.")],
) -> None:
    """Quantize a checkpoint's linear layers into a compressed-tensors checkpoint."""
    raise _not_yet("quantize", 3)


@app.command(epilog="Example: `quantcli load ./opt-125m-int8`")
def load(
    model: Annotated[str, typer.Argument(help="Quantized checkpoint: local folder or Hub id.")],
) -> None:
    """Load a quantized checkpoint without a float copy and run one forward pass."""
    raise _not_yet("load", 3)


@app.command(epilog="Example: `quantcli inspect ./opt-125m-int8`")
def inspect(
    path: Annotated[str, typer.Argument(help="Checkpoint folder or Hub id.")],
) -> None:
    """Show what a checkpoint holds, layer by layer, from its headers only."""
    raise _not_yet("inspect", 3)


@app.command(epilog="Example: `quantcli push ./opt-125m-int8 me/opt-125m-int8`")
def push(
    folder: Annotated[str, typer.Argument(help="Quantized checkpoint folder.")],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, USER/NAME.")],
) -> None:
    """Upload a quantized checkpoint to the Hub with a model card."""
    raise _not_yet("push", 4)


@app.command(epilog='Example: `quantcli generate me/opt-125m-int8 "The capital of France is"`')
def generate(
    model: Annotated[str, typer.Argument(help="Quantized checkpoint: local folder or Hub id.")],
    prompt: Annotated[str, typer.Argument(help="The prompt, or - to read it from stdin.")],
) -> None:
    """Generate text with a quantized model."""
    raise _not_yet("generate", 4)


def main() -> None:
    """Console entry point: run the app, turning `QuantcliError` into one line + exit code."""
    try:
        app()  # usage errors and --help are handled by Typer, which exits itself
    except QuantcliError as error:
        if _state["debug"]:
            raise
        stderr.print(f"[bold red]Error:[/] {error}", soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        stderr.print("Interrupted.")
        sys.exit(130)
