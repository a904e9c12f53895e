"""Fuzzing the parsers that read untrusted files: only quantcli's own clean errors come out."""

import contextlib
import json
import struct

from cli_checks import assert_one_line_error, run_quantcli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantcli.checkpoint import (
    check_format_version,
    parse_quantization_config,
    read_header,
    summarize,
)
from quantcli.config import QuantConfig
from quantcli.errors import QuantcliError

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


@settings(max_examples=200, deadline=None)
@given(
    metadata=st.dictionaries(
        st.sampled_from(["quantcli_format_version", "format", "quantcli_config"]),
        st.text(max_size=10),
    )
)
def test_format_version_check_never_crashes(metadata):
    with contextlib.suppress(QuantcliError):
        check_format_version(metadata, "f")


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
def test_header_reader_and_summary_refuse_junk_cleanly(data, tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    with contextlib.suppress(QuantcliError):
        read_header(path)
        summarize(tmp_path, None)


def test_inspect_on_random_bytes_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"\x93NUMPY junk that is no safetensors")
    assert_one_line_error(run_quantcli("inspect", tmp_path), 4, "model.safetensors")
