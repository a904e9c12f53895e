"""The CLI: commands listed, and commands not built yet exit 2 and say so in one line."""

import subprocess
import sys

import pytest


def quantcli(*args):
    return subprocess.run(
        [sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_command():
    result = quantcli("--help")
    assert result.returncode == 0
    for command in ("quantize", "push", "load", "generate", "inspect"):
        assert command in result.stdout


def test_version():
    result = quantcli("--version")
    assert result.returncode == 0 and result.stdout.startswith("quantcli ")


@pytest.mark.parametrize(
    ("args", "issue"),
    [
        (["push", "q", "me/q"], 4),
        (["generate", "q", "hello"], 4),
    ],
)
def test_commands_not_built_yet_exit_2_with_one_line(args, issue, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "quantcli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"issue #{issue}" in lines[0] and "not available yet" in lines[0]
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
