"""The Typer app, assembled from one module a command, and the console entry point.

Every failure the user can act on is a `QuantcliError`, printed as one line on stderr with
its exit code and no traceback (``--debug`` shows it).
"""

from __future__ import annotations

import errno
import signal
import sys
from typing import Annotated

import typer
from huggingface_hub.utils import disable_progress_bars
from rich.markup import escape
from transformers.utils import logging as transformers_logging
from typer._click.exceptions import NoArgsIsHelpError
from typer._click.exceptions import UsageError as CommandLineError

from quantcli import __version__
from quantcli.cli import eval as eval_command
from quantcli.cli import generate, inspect, load, push, quantize
from quantcli.cli.help import Command, Group
from quantcli.cli.options import check_range
from quantcli.cli.output import stderr
from quantcli.errors import QuantcliError, first_line
from quantcli.network import (
    DEFAULT_HUB_TIMEOUT,
    HUB_TIMEOUT_ENV,
    bound_hub_requests,
    is_network_failure,
)

app = typer.Typer(
    name="quantcli",
    cls=Group,
    help="Quantize Hugging Face checkpoints (int8, int4, int2), publish them to the Hub and "
    "run them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state: dict = {"debug": False, "hub_timeout": DEFAULT_HUB_TIMEOUT}


def _epilog(examples: list[str]) -> str:
    return "Examples:\n\n" + "\n\n".join(f"`{example}`" for example in examples)


for module, function, name in (
    (quantize, quantize.quantize, "quantize"),
    (load, load.load, "load"),
    (inspect, inspect.inspect, "inspect"),
    (push, push.push, "push"),
    (eval_command, eval_command.evaluate_command, "eval"),
    (generate, generate.generate, "generate"),
):
    app.command(name, cls=Command, epilog=_epilog(module.EXAMPLES))(function)


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
    hub_timeout: Annotated[
        float,
        typer.Option(
            "--hub-timeout",
            metavar="SECONDS",
            envvar=HUB_TIMEOUT_ENV,
            help="Seconds a Hub request may wait to connect, and then for each answer, "
            "before the command stops with exit 3.",
        ),
    ] = DEFAULT_HUB_TIMEOUT,
) -> None:
    """Quantize Hugging Face checkpoints, publish them to the Hub and run them."""
    _state["debug"] = debug
    check_range("--hub-timeout", hub_timeout, 0.1)
    _state["hub_timeout"] = hub_timeout
    bound_hub_requests(hub_timeout)


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
    # transformers' and the Hub's warnings and progress bars would break the one-line rule
    # (quantcli draws its own)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()
    try:
        code = app(prog_name="quantcli", standalone_mode=False)  # --help, --version: 0
    except NoArgsIsHelpError as error:
        error.show()  # the help, as a bare `quantcli` asks for
        sys.exit(2)
    except CommandLineError as error:  # unknown option or command, bad value, no argument
        command = error.ctx.command_path if error.ctx else "quantcli"
        message = error.format_message().replace("Value error, ", "")
        _fail(error, f"{message} (see {command} --help)", 2)
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
        if is_network_failure(error):
            _fail(
                error,
                f"the Hub did not answer in time or dropped the connection "
                f"({type(error).__name__}; each request may wait {_state['hub_timeout']:g} s): "
                f"check your connection or HF_ENDPOINT, or raise --hub-timeout / "
                f"{HUB_TIMEOUT_ENV}.",
                3,
            )
        _fail(
            error,
            f"internal error ({type(error).__name__}: {first_line(error)}): a bug in quantcli; "
            "run again with --debug for the traceback and report it.",
            1,
        )
    sys.exit(code or 0)


def _fail(error: BaseException, message: str, code: int) -> None:
    if _state["debug"]:
        raise error
    stderr.print(f"[bold red]Error:[/] {escape(_printable(message))}", soft_wrap=True)
    sys.exit(code)


def _printable(message: str) -> str:
    """`message` on one line: names from files (a tensor called '\\x85', an ANSI escape)
    are shown escaped, so they can neither break the one-line rule nor drive the terminal."""
    return "".join(
        " " if char in "\n\r\t" else char if char.isprintable() else ascii(char)[1:-1]
        for char in message
    )
