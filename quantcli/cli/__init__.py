"""The `quantcli` command line: a thin Typer layer over the library, one module a command.

Commands parse arguments, call the library and print; they hold no quantization logic.
`options` holds the option types several commands share, `output` the printing they
share; `quantcli` assembles the app. `main`, the console entry point, is defined here,
before anything imports torch: OpenMP reads its environment once, when torch loads it.
"""

from __future__ import annotations

import os

# OpenMP's threads spin while they wait for work by default: alone on the machine that
# saves microseconds, but when another process shares the cores the spinning threads take
# turns with it and decoding slows several-fold (docs/benchmarks.md). A value the user set
# is kept.
WAIT_POLICY = ("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    """Console entry point (``quantcli``, ``python -m quantcli``): OpenMP's wait policy,
    then the app (`quantcli.cli.quantcli.main`)."""
    name, value = WAIT_POLICY
    os.environ.setdefault(name, value)
    from quantcli.cli.quantcli import main as run

    run()


def __getattr__(name: str):
    if name == "app":  # imported on first use, like the commands it assembles
        from quantcli.cli.quantcli import app

        return app
    raise AttributeError(f"module 'quantcli.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
