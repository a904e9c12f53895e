"""Fuzzing the parsers that read untrusted files: only quantcli's own clean errors come out."""

import json
import math
import re
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from cli_checks import (
    assert_one_line_error,
    fingerprint,
    quantized_checkpoint,
    run_main,
    run_quantcli,
)
from hypothesis import HealthCheck, event, given, settings
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


# --- the whole command line on mutated models (issue #17, item 9) -------------------------
#
# Each example copies a good model, breaks one file in one way, runs the real entry point
# and checks the rules every command keeps: exit 0 or 2-5 (1 would be a bug), one line on
# stderr and no traceback when it fails, the input untouched, and nothing beside it.

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 2**16)  # bounded: a config asking for 2**40 units is a memory test
    | st.floats()
    | st.text(max_size=8)
)
SMALL_JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
DTYPE_NAMES = ["F32", "BF16", "F16", "F64", "I8", "U8", "I32", "I64", "BOOL", "F8_E4M3", "F4", ""]
FILE_NAMES = [
    "model.safetensors",
    "../model.safetensors",
    "/etc/passwd",
    "",
    ".",
    "sub/../model.safetensors",
    "model.safetensors/",
    "missing.safetensors",
    "config.json",
    "tokenizer.json",
    "model.safetensors.index.json",
]


def split_safetensors(path):
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def join_safetensors(path, header, body, size=None):
    encoded = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(encoded) if size is None else size) + encoded + body)


def tensor_names(header):
    return sorted(name for name in header if name != "__metadata__")


def break_header(data, folder):
    """One of seven ways to break model.safetensors's header or data."""
    path = folder / "model.safetensors"
    header, body = split_safetensors(path)
    names = tensor_names(header)
    kind = data.draw(
        st.sampled_from(["junk", "field", "drop", "rename", "metadata", "length", "truncate"])
    )
    if kind == "junk":
        header = data.draw(SMALL_JSON)
    elif kind == "field":
        entry = header[data.draw(st.sampled_from(names))]
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        entry[field] = data.draw(
            st.sampled_from(DTYPE_NAMES) | st.lists(st.integers(-2, 2**20), max_size=3) | SMALL_JSON
        )
    elif kind == "drop":
        del header[data.draw(st.sampled_from(names))]
    elif kind == "rename":
        new = data.draw(st.sampled_from([*names, "lm_head.weight", "", "a.weight_scale"]))
        header[new] = header.pop(data.draw(st.sampled_from(names)))
    elif kind == "metadata":
        header["__metadata__"] = data.draw(
            st.dictionaries(
                st.sampled_from(["quantcli_format_version", "quantcli_config", "format"]),
                st.text(max_size=12),
            )
            | SMALL_JSON
        )
    elif kind == "length":
        join_safetensors(path, header, body, data.draw(st.integers(0, 2**64 - 1)))
        return kind
    else:
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
        return kind
    join_safetensors(path, header, body)
    return kind


def break_index(data, folder):
    """One of five ways to break a model.safetensors.index.json over the one shard."""
    header, _ = split_safetensors(folder / "model.safetensors")
    weight_map = dict.fromkeys(tensor_names(header), "model.safetensors")
    kind = data.draw(st.sampled_from(["junk", "bytes", "entry", "extra", "weight_map"]))
    if kind == "junk":
        index = data.draw(SMALL_JSON)
    elif kind == "bytes":
        (folder / INDEX).write_bytes(data.draw(st.binary(max_size=32)))
        return kind
    elif kind == "entry":
        name = data.draw(st.sampled_from(sorted(weight_map)))
        weight_map[name] = data.draw(st.sampled_from(FILE_NAMES) | SMALL_JSON)
        index = {"weight_map": weight_map}
    elif kind == "extra":
        weight_map[data.draw(st.text(max_size=12))] = data.draw(st.sampled_from(FILE_NAMES))
        index = {"weight_map": weight_map}
    else:
        index = {"metadata": data.draw(SMALL_JSON), "weight_map": data.draw(SMALL_JSON)}
    (folder / INDEX).write_text(json.dumps(index))
    return kind


CONFIG_EXTRAS = ["model_type", "architectures", "dtype", "torch_dtype", "head_dim", "rope_scaling"]


def break_config(data, folder):
    """One of four ways to break config.json: a field's value, a field gone, the file."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    kind = data.draw(st.sampled_from(["field", "drop", "junk", "bytes"]))
    keys = sorted({*config, *CONFIG_EXTRAS} - {"quantization_config"})
    if kind == "field":
        config[data.draw(st.sampled_from(keys))] = data.draw(SMALL_JSON)
    elif kind == "drop":
        config.pop(data.draw(st.sampled_from(sorted(config))), None)
    elif kind == "junk":
        config = data.draw(SMALL_JSON)
    else:
        path.write_bytes(data.draw(st.binary(max_size=32)))
        return kind
    path.write_text(json.dumps(config))
    return kind


def break_quantization_config(data, folder):
    """One of two ways to break `quantization_config`: replaced whole, or one weights
    setting replaced (a float source gets one too: it must then be refused as quantized)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    current = config.get("quantization_config")
    if current is None or data.draw(st.booleans()):
        config["quantization_config"] = data.draw(quantization_configs())
        kind = "replaced"
    else:
        weights = current["config_groups"]["group_0"]["weights"]
        weights[data.draw(st.sampled_from(KEYS))] = data.draw(SMALL_JSON)
        kind = "weights field"
    path.write_text(json.dumps(config))
    return kind


INDEX = "model.safetensors.index.json"
BREAKERS = {
    "header": break_header,
    "index": break_index,
    "config": break_config,
    "quantization_config": break_quantization_config,
}


@pytest.fixture(scope="module")
def fuzz_models(saved_models, tmp_path_factory):
    """The tiny Llama and its int4 checkpoint: each example breaks a copy."""
    quantized = quantized_checkpoint(saved_models, tmp_path_factory.mktemp("fuzz") / "int4")
    return {"source": saved_models("llama"), "quantized": quantized}


def run_on_broken(monkeypatch, capsys, data, model, part, commands):
    """Break a copy of `model` with BREAKERS[part], then run each command on it."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = shutil.copytree(model, Path(tmp) / "model")
        kind = BREAKERS[part](data, folder)
        event(f"{part}: {kind}")
        before = fingerprint(folder)
        for command in commands:
            out = ["--out", Path(tmp) / "q"] if command == "quantize" else []
            result = run_main(monkeypatch, capsys, command, folder, *out)
            event(f"{command} exit {result.returncode}")
            assert result.returncode in (0, 2, 3, 4, 5), f"{command}, {part}: {kind}"
            if result.returncode:
                assert_one_line_error(result, result.returncode, "")
                assert sorted(p.name for p in Path(tmp).iterdir()) == ["model"]
            assert fingerprint(folder) == before
            shutil.rmtree(Path(tmp) / "q", ignore_errors=True)


def fuzz_settings(examples):
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


@pytest.mark.parametrize("part", BREAKERS)
@fuzz_settings(30)
@given(data=st.data())
def test_quantize_on_a_broken_source_fails_cleanly(part, fuzz_models, monkeypatch, capsys, data):
    run_on_broken(monkeypatch, capsys, data, fuzz_models["source"], part, ["quantize"])


@pytest.mark.parametrize("part", BREAKERS)
@fuzz_settings(20)
@given(data=st.data())
def test_inspect_and_load_on_a_broken_checkpoint_fail_cleanly(
    part, fuzz_models, monkeypatch, capsys, data
):
    run_on_broken(monkeypatch, capsys, data, fuzz_models["quantized"], part, ["inspect", "load"])
