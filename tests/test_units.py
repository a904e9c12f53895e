import pytest

from quantcli.errors import UsageError
from quantcli.units import format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("500MB", 500 * 10**6), ("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1.5 kb", 1500), ("42", 42)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "5XB", "", "-1GB"])
def test_unreadable_sizes_are_refused(text):
    with pytest.raises(UsageError, match="cannot read the size"):
        parse_size(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 163_200_000, 2.73e9)] == ["512 B", "163.2 MB", "2.7 GB"]
