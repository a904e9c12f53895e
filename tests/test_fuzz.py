"""Fuzzing the parsers that read untrusted files: only quantcli's own clean errors come out."""

import json
import math
import re
import struct

import pytest
import torch
from cli_checks import assert_one_line_error, run_quantcli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantcli.checkpoint import (
    FORMAT_VERSION,
    check_format_version,
    parse_quantization_config,
    read_header,
    read_tensor,
    summarize,
)
from quantcli.config import QuantConfig
from quantcli.errors import CheckpointError, QuantcliError

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)
KEYS = ["num_bits", "type", "symmetric", "strategy", "group_size", "dynamic", "actorder"]


@st.composite
def quantization_configs(draw):
    """Mostly well-formed compressed-tensors configs with fields replaced by junk."""
    weights = {key: draw(JSON) for key in draw(st.lists(st.sampled_from(KEYS), unique=True))}
    if draw(st.booleans()):
        weights.update(num_bits=draw(st.sampled_from([2, 4, 8, 3, 16])), type="int")
    group = {"targets": draw(st.sampled_from([["Linear"], "Linear", None])), "weights": weights}
    raw = {
        "quant_method": draw(st.sampled_from(["compressed-tensors", "awq", None])),
        "format": draw(st.sampled_from(["int-quantized", "pack-quantized", "float", 3])),
        "config_groups": draw(st.sampled_from([{"group_0": group}, {}, [group], None])),
        "ignore": draw(st.sampled_from([[], ["lm_head"], "lm_head", None])),
    }
    return raw if draw(st.booleans()) else draw(JSON)


@settings(max_examples=300, deadline=None)
@given(raw=quantization_configs())
def test_quantization_config_parser_never_crashes(raw):
    try:
        config, weight_format = parse_quantization_config(raw)
    except QuantcliError:
        return
    assert isinstance(config, QuantConfig)
    assert weight_format in ("pack-quantized", "int-quantized")


def format_version_verdict(version):
    """What check_format_version must do, decided without it: accept a missing version
    (another tool's file) or an ASCII decimal up to FORMAT_VERSION; refuse the rest."""
    if version is None:
        return True
    return version.isascii() and version.isdecimal() and int(version) <= FORMAT_VERSION


@settings(max_examples=200, deadline=None)
@given(
    metadata=st.dictionaries(
        st.sampled_from(["quantcli_format_version", "format", "quantcli_config"]),
        st.text(max_size=10) | st.sampled_from(["0", "1", "2", "01", "99", "-1", "1.0", " 1", ""]),
    )
)
def test_format_version_check_accepts_or_refuses_by_name(metadata):
    version = metadata.get("quantcli_format_version")
    if format_version_verdict(version):
        check_format_version(metadata, "f")  # accepted: no exception
    else:
        with pytest.raises(
            CheckpointError, match=f"f uses quantcli format version {re.escape(version)}"
        ):
            check_format_version(metadata, "f")


def test_format_version_with_a_unicode_digit_is_refused_cleanly():
    """str.isdigit() accepts '\u00b2', which int() refuses: the check must not use it."""
    with pytest.raises(CheckpointError):
        check_format_version({"quantcli_format_version": "\u00b2"}, "f")


def header_bytes(header) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body


@st.composite
def safetensors_files(draw):
    """Random bytes, or a header of junk or of plausible tensors with bad offsets."""
    kind = draw(st.sampled_from(["bytes", "json", "tensors"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return header_bytes(draw(JSON)) + draw(st.binary(max_size=16))
    tensor = {
        "dtype": draw(st.sampled_from(["F32", "BF16", "I8", "I32", "Q4", 7])),
        "shape": draw(st.lists(st.integers(-2, 5), max_size=3) | JSON),
        "data_offsets": draw(st.lists(st.integers(-4, 64), min_size=0, max_size=3) | JSON),
    }
    header = {draw(st.text(max_size=6)): tensor}
    return header_bytes(header) + draw(st.binary(max_size=64))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=safetensors_files())
def test_header_reader_refuses_junk_or_returns_only_tensors_inside_the_file(data, tmp_path):
    """Either a CheckpointError, or every tensor it reports lies wholly inside the data
    section with the byte size its dtype and shape imply, and reads back with that shape."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    try:
        tensors, metadata = read_header(path)
    except CheckpointError:
        with pytest.raises(CheckpointError):
            summarize(tmp_path, None)  # the summary refuses the same file
        assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
        assert path.read_bytes() == data  # nothing written
        return
    assert len(data) >= 8
    (header_size,) = struct.unpack("<Q", data[:8])
    for info in tensors.values():
        element = torch.empty((), dtype=info.dtype).element_size()
        assert info.nbytes == math.prod(info.shape) * element
        assert 8 + header_size <= info.offset and info.offset + info.nbytes <= len(data)
        assert read_tensor(info).shape == info.shape
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert summarize(tmp_path, None).total_bytes == sum(i.nbytes for i in tensors.values())
    assert path.read_bytes() == data


def test_inspect_on_random_bytes_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x93NUMPY junk that is no safetensors")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert_one_line_error(run_quantcli("inspect", tmp_path), 4, "model.safetensors")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written
