"""Helpers shared by the tests that run quantcli as a user would."""

import subprocess
import sys


def run_quantcli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """`quantcli ARGS...` in a fresh process (paths allowed as arguments), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "quantcli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def assert_one_line_error(result, code: int, fragment: str) -> None:
    """Exit `code`, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
