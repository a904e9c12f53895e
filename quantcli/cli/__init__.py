"""The `quantcli` command line: a thin Typer layer over the library, one module a command.

Commands parse arguments, call the library and print; they hold no quantization logic.
`options` holds the option types several commands share, `output` the printing they
share; `quantcli` assembles the app and is the console entry point.
"""

from quantcli.cli.quantcli import app, main

__all__ = ["app", "main"]
