"""Errors that quantcli raises on purpose.

Each carries a message meant for the user (what went wrong and what to do) and an exit
code, so the CLI can print one line and leave without a traceback. Library callers can
catch them like any other exception.
"""

from __future__ import annotations


def first_line(error: Exception) -> str:
    """The first line of an exception's message (its type when it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class QuantcliError(Exception):
    """Base class: a failure the user can act on.

    Exit codes by class: 2 usage, 3 not found or refused by the Hub, 4 bad checkpoint or
    tensor, 5 out of resources (disk, memory); 1 is left for internal errors (bugs).
    """

    exit_code = 1


class UsageError(QuantcliError, ValueError):
    """A setting or argument that cannot work (bad bit width, group size...)."""

    exit_code = 2


class InvalidTensorError(QuantcliError, ValueError):
    """A tensor that cannot be quantized as it is (NaN, Inf, wrong rank)."""

    exit_code = 4


class NotFoundError(QuantcliError):
    """A local path, Hub repository or revision that does not exist or cannot be reached."""

    exit_code = 3


class CheckpointError(QuantcliError):
    """A checkpoint that is missing pieces, corrupt, or in a format quantcli cannot read."""

    exit_code = 4


class AuthError(QuantcliError):
    """No token, a token the Hub rejects, or no right to write where asked."""

    exit_code = 3


class ResourceError(QuantcliError):
    """Not enough disk space or memory for the job."""

    exit_code = 5
