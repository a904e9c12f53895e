"""Helpers shared by the tests that run quantcli as a user would."""

import hashlib
import os
import subprocess
import sys

import pytest

from quantcli import QuantConfig
from quantcli.cli import quantcli as entry_point
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint


def run_quantcli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`quantcli ARGS...` in a fresh process (paths allowed as arguments), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "quantcli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def hub_env(url: str, home, token: str | None = None) -> dict[str, str]:
    """The environment of a quantcli run against the local Hub double: its address, a
    private HF_HOME, xet off, no proxy for loopback, no inherited HF_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_PROXY="127.0.0.1,localhost",
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def assert_one_line_error(result, code: int, fragment: str) -> None:
    """Exit `code`, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def quantized_checkpoint(saved_models, out, arch="llama", config=None):
    """A quantcli checkpoint of the tiny `arch` model written to `out` (int4 by default)."""
    quantize_checkpoint(resolve_model(str(saved_models(arch))), out, config or QuantConfig(bits=4))
    return out


def run_main(monkeypatch, capsys, *args) -> subprocess.CompletedProcess:
    """quantcli's entry point in this process (faster than `run_quantcli`, and faults can be
    injected), with its exit code and stderr as `run_quantcli` reports them."""
    monkeypatch.setattr(sys, "argv", ["quantcli", *map(str, args)])
    monkeypatch.setitem(entry_point._state, "debug", False)
    with pytest.raises(SystemExit) as exit_info:
        entry_point.main()
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, exit_info.value.code, captured.out, captured.err)


def fingerprint(folder):
    """Every file under `folder` with its sha256: equal before and after means untouched."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
