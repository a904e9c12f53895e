"""The CLI frame: every command listed, with help that explains it."""

import pytest
from cli_checks import run_quantcli

from quantcli.cli.quantcli import app

COMMANDS = ("quantize", "push", "load", "generate", "inspect", "eval")


def quantcli(*args):
    return run_quantcli(*args, timeout=120)


def test_the_app_registers_exactly_the_documented_commands():
    assert sorted(command.name for command in app.registered_commands) == sorted(COMMANDS)


def test_help_lists_every_command():
    result = quantcli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_version():
    result = quantcli("--version")
    assert result.returncode == 0 and result.stdout.startswith("quantcli ")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    result = quantcli(command, "--help")
    assert result.returncode == 0 and "Example" in result.stdout, command
    assert f"quantcli {command}" in result.stdout  # the example runs this very command
