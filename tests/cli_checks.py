"""Assertions shared by the tests that run quantcli as a user would."""


def assert_one_line_error(result, code: int, fragment: str) -> None:
    """Exit `code`, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr
