"""The CLI frame: every command listed, with help that explains it."""

from cli_checks import run_quantcli


def quantcli(*args):
    return run_quantcli(*args, timeout=120)


def test_help_lists_every_command():
    result = quantcli("--help")
    assert result.returncode == 0
    for command in ("quantize", "push", "load", "generate", "inspect"):
        assert command in result.stdout


def test_version():
    result = quantcli("--version")
    assert result.returncode == 0 and result.stdout.startswith("quantcli ")


def test_every_command_has_help_with_an_example():
    for command in ("quantize", "push", "load", "generate", "inspect"):
        result = quantcli(command, "--help")
        assert result.returncode == 0 and "Example" in result.stdout, command
