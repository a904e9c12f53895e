"""checkpoint.py on hand-made files: what each refusal says, what each summary counts, and
the compressed-tensors config read and written field by field.

Files are written with the safetensors library (byte by byte only where it would refuse
to write them), configs by hand or by compressed-tensors; every expected number is
counted by hand from the tensors written, never read from quantcli.
"""

import json
import os
import re
import struct

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.utils.match import is_match
from safetensors.torch import load_file, save_file

from quantcli import QuantConfig
from quantcli.checkpoint import (
    INDEX_NAME,
    ShardWriter,
    TensorSpec,
    parse_quantization_config,
    quantization_config,
    read_all_headers,
    read_eval,
    read_header,
    read_local_source,
    read_tensor,
    shard_name,
    summarize,
    weight_files,
    write_index,
    write_local_source,
)
from quantcli.config import Granularity, Scheme
from quantcli.errors import CheckpointError
from quantcli.models.replace import matches


def exact(message: str) -> str:
    """A `pytest.raises` pattern matching the whole message, literally."""
    return "^" + re.escape(message) + "$"


def raw_safetensors(path, header: bytes, data: bytes = b"") -> None:
    """A safetensors file from its JSON header's bytes (for what the library won't write)."""
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


# --- read_header, read_tensor -----------------------------------------------------------


def test_read_header_locates_each_tensor_s_bytes(tmp_path):
    tensors = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1, -2, 3, -4, 5], dtype=torch.int8),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"source_model": "org/model"})
    infos, metadata = read_header(path)
    assert metadata == {"source_model": "org/model"}
    assert set(infos) == {"a", "b"}
    data = path.read_bytes()
    for name, tensor in tensors.items():
        info = infos[name]
        assert (info.name, info.dtype, info.shape, info.file) == (
            name,
            tensor.dtype,
            tuple(tensor.shape),
            path,
        )
        assert info.nbytes == {"a": 6 * 4, "b": 5}[name]
        assert info.numel == {"a": 6, "b": 5}[name]
        # the bytes at the offset are the tensor's own (little-endian, as numpy holds them)
        assert data[info.offset : info.offset + info.nbytes] == tensor.numpy().tobytes()
        assert torch.equal(read_tensor(info), tensor)


def test_a_file_without_metadata_has_empty_metadata(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "m.safetensors")
    assert read_header(tmp_path / "m.safetensors")[1] == {}


def test_a_truncated_file_is_named_with_the_library_s_reason(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4)}, path)
    path.write_bytes(path.read_bytes()[:-1])
    message = (
        "m.safetensors is truncated or corrupt (incomplete metadata, file not fully covered): "
        "download or write it again."
    )
    with pytest.raises(CheckpointError, match=exact(message)) as error:
        read_header(path)
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_a_sub_byte_float_is_refused_by_name(tmp_path):
    """safetensors 0.8 parses F6_E2M3 (6-bit floats, 4 of them in 3 bytes); torch has no
    such dtype."""
    path = tmp_path / "m.safetensors"
    raw_safetensors(path, b'{"x":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', b"abc")
    message = (
        "m.safetensors: tensor 'x' has dtype F6_E2M3, which quantcli cannot read (sub-byte "
        "floats are not supported)."
    )
    with pytest.raises(CheckpointError, match=exact(message)):
        read_header(path)


def test_a_name_given_twice_in_a_header_is_refused(tmp_path):
    """safetensors keeps the last of two equal names silently (its map takes the last);
    which copy a reader gets would be arbitrary. The duplicate is named, not the first key."""
    entry = b'{"dtype":"I8","shape":[1],"data_offsets":[0,1]}'
    header = b'{"a":' + entry.replace(b"[0,1]", b"[1,2]") + b',"x":' + entry + b',"x":'
    header += entry + b"}"
    raw_safetensors(tmp_path / "m.safetensors", header, b"\x01\x02")
    with pytest.raises(CheckpointError, match=exact("m.safetensors: the header names 'x' twice.")):
        read_header(tmp_path / "m.safetensors")


def test_a_tensor_cut_off_after_its_header_was_read_is_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, path)
    infos, _ = read_header(path)
    path.write_bytes(path.read_bytes()[:-1])  # the file shrinks between header and data
    assert torch.equal(read_tensor(infos["a"]), torch.zeros(4))
    with pytest.raises(CheckpointError, match=exact("m.safetensors: tensor 'b' is truncated.")):
        read_tensor(infos["b"])


def test_an_empty_tensor_reads_back_with_its_shape_and_dtype(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"e": torch.zeros(0, 3, dtype=torch.bfloat16)}, path)
    tensor = read_tensor(read_header(path)[0]["e"])
    assert tensor.shape == (0, 3) and tensor.dtype == torch.bfloat16


# --- ShardWriter, write_index, shard_name --------------------------------------------------

#: Dtypes a shard may hold (integers, scales, float tensors kept as the source has them).
WRITABLE = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def test_every_dtype_written_reads_back_with_the_safetensors_library(tmp_path):
    pattern = torch.tensor([[1, 0, 1], [1, 1, 0]])
    tensors = {str(dtype): pattern.to(dtype) for dtype in WRITABLE}
    tensors["empty"] = torch.zeros(0, 2)
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(tmp_path / "m.safetensors", specs, {"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    theirs = load_file(tmp_path / "m.safetensors")
    assert set(theirs) == set(tensors)
    for name, tensor in tensors.items():
        assert theirs[name].dtype == tensor.dtype and torch.equal(theirs[name], tensor), name


def test_tensor_spec_counts_its_bytes():
    assert TensorSpec("w", torch.int32, (3, 5)).nbytes == 60
    assert TensorSpec("s", torch.bfloat16, (7,)).nbytes == 14
    assert TensorSpec("s", torch.float8_e4m3fn, (2, 2)).nbytes == 4


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("b", torch.zeros(2, dtype=torch.int8)),
        ("a", torch.zeros(3, dtype=torch.int8)),
        ("a", torch.zeros(2, dtype=torch.int16)),
    ],
    ids=["name", "shape", "dtype"],
)
def test_the_writer_refuses_a_tensor_other_than_the_next_declared(tmp_path, name, tensor):
    """The header is already written: anything else would put bytes where it says others."""
    specs = [TensorSpec("a", torch.int8, (2,)), TensorSpec("b", torch.int8, (2,))]
    message = f"shard writer expected {specs[0]}, got {(name, tensor.dtype, tuple(tensor.shape))}"
    with (
        pytest.raises(RuntimeError, match=exact(message)),
        ShardWriter(tmp_path / "m.safetensors", specs, {}) as writer,
    ):
        writer.write(name, tensor)


def test_a_shard_closed_before_every_tensor_is_written_is_an_error(tmp_path):
    specs = [TensorSpec(name, torch.int8, (1,)) for name in "abc"]
    with (
        pytest.raises(RuntimeError, match=exact("shard closed with 2 tensors unwritten")),
        ShardWriter(tmp_path / "m.safetensors", specs, {}) as writer,
    ):
        writer.write("a", torch.ones(1, dtype=torch.int8))
    # an error inside the block is the one reported, not the unwritten tensors
    with (
        pytest.raises(KeyError, match="the real failure"),
        ShardWriter(tmp_path / "n.safetensors", specs, {}),
    ):
        raise KeyError("the real failure")


def test_the_index_lists_tensors_sorted_with_the_total_size(tmp_path):
    """The layout transformers' `save_pretrained` writes (indent 2, names sorted)."""
    write_index(tmp_path, {"b.w": "model-00002-of-00002.safetensors", "a.w": "x"}, 1234)
    assert (tmp_path / INDEX_NAME).read_text() == (
        "{\n"
        '  "metadata": {\n'
        '    "total_size": 1234\n'
        "  },\n"
        '  "weight_map": {\n'
        '    "a.w": "x",\n'
        '    "b.w": "model-00002-of-00002.safetensors"\n'
        "  }\n"
        "}\n"
    )


def test_shards_are_named_as_transformers_names_them():
    assert shard_name(0, 1) == "model.safetensors"
    assert shard_name(0, 2) == "model-00001-of-00002.safetensors"
    assert shard_name(11, 12) == "model-00012-of-00012.safetensors"


# --- weight_files: which files a folder's weights are in ---------------------------------


def save(folder, name, tensors, metadata=None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / name, metadata=metadata)
    return folder / name


def test_model_safetensors_wins_over_other_safetensors_files(tmp_path):
    save(tmp_path, "model.safetensors", {"a": torch.zeros(1)})
    save(tmp_path, "adapter.safetensors", {"b": torch.zeros(1)})
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]


def test_without_model_safetensors_every_safetensors_file_counts_sorted(tmp_path):
    save(tmp_path, "b.safetensors", {"b": torch.zeros(1)})
    save(tmp_path, "a.safetensors", {"a": torch.zeros(1)})
    assert weight_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]


@pytest.mark.parametrize(
    ("files", "named"),
    [(["b.bin", "a.bin", "c.pt"], "a.bin"), (["model.pt"], "model.pt")],
)
def test_pickle_only_folders_are_refused_naming_a_pickle(tmp_path, files, named):
    for name in files:
        (tmp_path / name).write_bytes(b"not read")
    message = (
        f"{tmp_path} holds only pickle weights ({named}), which can run code when loaded: "
        "convert the model to safetensors, or pass --allow-pickle to read them with "
        "torch.load(weights_only=True)."
    )
    with pytest.raises(CheckpointError, match=exact(message)):
        weight_files(tmp_path)


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=exact(f"{tmp_path} holds no safetensors weights.")):
        weight_files(tmp_path)


def test_a_broken_link_to_the_weights_is_named_not_skipped(tmp_path):
    save(tmp_path, "other.safetensors", {"a": torch.zeros(1)})
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "model.safetensors")
    # named as resolved: the link's target
    with pytest.raises(CheckpointError, match=r"^gone\.safetensors is missing or unreadable"):
        weight_files(tmp_path)


def test_a_broken_link_to_the_index_is_named_not_skipped(tmp_path):
    save(tmp_path, "model.safetensors", {"a": torch.zeros(1)})
    os.symlink(tmp_path / "gone.json", tmp_path / INDEX_NAME)
    with pytest.raises(CheckpointError, match=r"^gone\.json is missing or unreadable"):
        weight_files(tmp_path)


def sharded(folder, weight_map, shards):
    """A folder with `shards` ({file: tensor names}) and an index of `weight_map`."""
    for file, names in shards.items():
        save(folder, file, {name: torch.zeros(2) for name in names})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    return folder


def test_an_index_gives_each_shard_once_in_the_order_it_names_them(tmp_path):
    """The index wins over model.safetensors beside it, and each shard is read once."""
    shards = {"s2.safetensors": ["a", "b"], "s1.safetensors": ["c", "d"]}
    weight_map = {"a": "s2.safetensors", "c": "s1.safetensors", "b": "s2.safetensors"}
    weight_map["d"] = "s1.safetensors"
    sharded(tmp_path, weight_map, shards)
    save(tmp_path, "model.safetensors", {"z": torch.zeros(1)})
    assert weight_files(tmp_path) == [tmp_path / "s2.safetensors", tmp_path / "s1.safetensors"]


@pytest.mark.parametrize(
    "text",
    ["{not json", '["weight_map"]', '{"no_map": {}}', "[" * 100_000 + "]" * 100_000],
    ids=["syntax", "list", "no-map", "deep"],
)
def test_an_index_that_is_no_index_is_refused(tmp_path, text):
    save(tmp_path, "model.safetensors", {"a": torch.zeros(1)})
    (tmp_path / INDEX_NAME).write_text(text)
    message = f"{INDEX_NAME} is not a valid safetensors index."
    with pytest.raises(CheckpointError, match=exact(message)):
        weight_files(tmp_path)


def test_an_index_in_another_encoding_is_refused(tmp_path):
    (tmp_path / INDEX_NAME).write_bytes(b'{"weight_map": {"\xff": "a"}}')
    message = f"{INDEX_NAME} is not a valid safetensors index."
    with pytest.raises(CheckpointError, match=exact(message)):
        weight_files(tmp_path)


@pytest.mark.parametrize(
    ("weight_map", "message"),
    [
        (["a"], f"{INDEX_NAME}: 'weight_map' must map tensor names to files."),
        ({"a": 3}, f"{INDEX_NAME}: the file of tensor 'a' must be a file name, not 3."),
        ({"a": ""}, f"{INDEX_NAME}: the file of tensor 'a' must be a file name, not ''."),
        (
            {"a": "/etc/x.safetensors"},
            f"{INDEX_NAME}: tensor 'a' points outside the model folder (/etc/x.safetensors): "
            "refusing to read it.",
        ),
        (
            {"a": "sub/../../x.safetensors"},
            f"{INDEX_NAME}: tensor 'a' points outside the model folder (sub/../../x.safetensors)"
            ": refusing to read it.",
        ),
    ],
    ids=["list", "number", "empty", "absolute", "dotdot"],
)
def test_bad_index_entries_are_refused_by_tensor(tmp_path, weight_map, message):
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=exact(message)):
        weight_files(tmp_path)


def test_missing_shards_are_all_named(tmp_path):
    weight_map = {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s3.safetensors"}
    sharded(tmp_path, weight_map, {"s2.safetensors": ["b"]})
    message = f"{tmp_path} lacks the shard(s) s1.safetensors, s3.safetensors named in its index."
    with pytest.raises(CheckpointError, match=exact(message)):
        weight_files(tmp_path)


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    shards = {"s1.safetensors": ["a"], "s2.safetensors": ["b"]}
    sharded(tmp_path, {"a": "s1.safetensors", "b": "s1.safetensors"}, shards)
    message = f"{INDEX_NAME} puts tensor 'b' in s1.safetensors, which does not hold it."
    with pytest.raises(CheckpointError, match=exact(message)):
        weight_files(tmp_path)


def test_read_all_headers_merges_shards_and_keeps_the_first_metadata(tmp_path):
    first = save(tmp_path, "s1.safetensors", {"a": torch.zeros(1)}, {"k": "1"})
    second = save(tmp_path, "s2.safetensors", {"b": torch.zeros(2)}, {"k": "2", "j": "x"})
    tensors, metadata = read_all_headers([first, second])
    assert metadata == {"k": "1"}
    assert {name: info.file for name, info in tensors.items()} == {"a": first, "b": second}
    bare = save(tmp_path, "s0.safetensors", {"c": torch.zeros(1)})
    assert read_all_headers([bare, second])[1] == {}  # the first shard's, even when empty
    assert read_all_headers([]) == ({}, {})


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    first = save(tmp_path, "s1.safetensors", {"a": torch.zeros(1), "x": torch.zeros(1)})
    second = save(tmp_path, "s2.safetensors", {"x": torch.ones(1)})
    message = "tensor 'x' is in both s1.safetensors and s2.safetensors: keep one copy."
    with pytest.raises(CheckpointError, match=exact(message)):
        read_all_headers([first, second])


# --- the compressed-tensors quantization config --------------------------------------------


def test_the_written_config_is_compressed_tensors_pack_quantized_field_by_field():
    """The dict written out by hand from compressed-tensors' schema; its own pydantic model
    then reads it back to the same settings."""
    config = QuantConfig(bits=4, scheme="asym", group_size=64)
    written = quantization_config(config, ["model.b", "lm_head"])
    assert written == {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head", "model.b"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "pack-quantized",
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": False,
                    "strategy": "group",
                    "group_size": 64,
                    "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "transform_config": {},
        "global_compression_ratio": None,
        "version": "0.20.0",
    }
    theirs = QuantizationConfig.model_validate(written)
    weights = theirs.config_groups["group_0"].weights
    assert (theirs.format, theirs.quantization_status, theirs.ignore) == (
        "pack-quantized",
        "compressed",
        ["lm_head", "model.b"],
    )
    assert (weights.num_bits, weights.symmetric, weights.strategy, weights.group_size) == (
        4,
        False,
        "group",
        64,
    )
    channel = quantization_config(QuantConfig(bits=8), [])["config_groups"]["group_0"]
    assert channel["weights"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": True,
        "strategy": "channel",
        "group_size": None,
        "dynamic": False,
    }


def raw_config(weights=None, fmt="pack-quantized", **group):
    """A compressed-tensors quantization_config: int8 weights, symmetric per channel."""
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"} | (
        weights or {}
    )
    group = {"targets": ["Linear"], "format": fmt, "weights": weights} | group
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"g": group}}


@pytest.mark.parametrize(
    ("preset", "group_size", "expected"),
    [
        ("W8A16", None, QuantConfig(bits=8, scheme="sym", group_size=128)),
        ("W4A16", 128, QuantConfig(bits=4, scheme="sym", group_size=128)),
        ("W4A16_ASYM", 32, QuantConfig(bits=4, scheme="asym", group_size=32)),
    ],
)
def test_compressed_tensors_presets_read_as_their_settings(preset, group_size, expected):
    """Configs made by compressed-tensors itself from llm-compressor's preset schemes."""
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if group_size is not None:
        scheme.weights.group_size = group_size
    theirs = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", ignore=["lm_head"]
    )
    raw = theirs.model_dump(mode="json")
    raw["quant_method"] = "compressed-tensors"
    config, fmt = parse_quantization_config(raw)
    assert fmt == "pack-quantized"
    assert (config.bits, config.scheme, config.granularity, config.group_size) == (
        expected.bits,
        expected.scheme,
        expected.granularity,
        expected.group_size,
    )
    assert config.exclude == ("lm_head",)
    assert config.quantize_head  # a float head is named in `ignore`, not left implicit
    assert not config.optimize and config.dtype is None


NOT_CT = (
    "this checkpoint is quantized with '{}', not compressed-tensors: quantcli loads only "
    "compressed-tensors int checkpoints."
)
ONE_GROUP = "quantcli loads compressed-tensors checkpoints with one config group."
NO_WEIGHTS = "the quantization config has no 'weights' settings."
WEIGHT_ONLY = "quantcli loads int weight-only checkpoints (no activation quantization)."


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, NOT_CT.format(None)),
        (["compressed-tensors"], NOT_CT.format(None)),
        ({"quant_method": "gptq", "bits": 4}, NOT_CT.format("gptq")),
        (raw_config() | {"config_groups": []}, ONE_GROUP),
        (raw_config() | {"config_groups": {}}, ONE_GROUP),
        (raw_config() | {"config_groups": {"a": {}, "b": {}}}, ONE_GROUP),
        (raw_config() | {"config_groups": {"a": ["weights"]}}, NO_WEIGHTS),
        (raw_config() | {"config_groups": {"a": {"targets": ["Linear"]}}}, NO_WEIGHTS),
        (raw_config() | {"config_groups": {"a": {"weights": [8]}}}, NO_WEIGHTS),
        (raw_config(input_activations={"num_bits": 8}), WEIGHT_ONLY),
        (raw_config({"type": "float"}), WEIGHT_ONLY),
        (
            raw_config({"num_bits": 8.0}),
            "the quantization config's 'num_bits' must be an integer, not 8.0.",
        ),
        (
            raw_config({"num_bits": True}),
            "the quantization config's 'num_bits' must be an integer, not True.",
        ),
        (
            raw_config({"strategy": "group", "group_size": 32.0}),
            "the quantization config's 'group_size' must be an integer, not 32.0.",
        ),
        (
            raw_config(fmt="marlin-24"),
            "format 'marlin-24' with 8-bit weights is not a layout quantcli reads (it reads "
            "pack-quantized or int-quantized).",
        ),
        (
            raw_config({"num_bits": 4}, fmt="int-quantized"),
            "format 'int-quantized' with 4-bit weights is not a layout quantcli reads (it reads"
            " pack-quantized).",
        ),
        (
            raw_config(fmt=None) | {"format": None},
            "format 'None' with 8-bit weights is not a layout quantcli reads (it reads "
            "pack-quantized or int-quantized).",
        ),
        (
            raw_config({"num_bits": 3}),
            "unsupported quantization config: bits=3 is not supported: choose one of 8, 4, 2.",
        ),
        (
            raw_config({"strategy": "block"}),
            "unsupported quantization config: 'block' is not a valid Granularity",
        ),
        (
            raw_config(targets=["Linear", 3]),
            "the quantization config's 'targets' must be a list of names.",
        ),
        (
            raw_config(targets={"Linear": 1}),
            "the quantization config's 'targets' must be a list of names.",
        ),
        (
            raw_config() | {"ignore": [None]},
            "the quantization config's 'ignore' must be a list of names.",
        ),
    ],
)
def test_configs_quantcli_cannot_read_are_refused_with_the_reason(raw, message):
    with pytest.raises(CheckpointError, match=exact(message)) as error:
        parse_quantization_config(raw)
    assert error.value.__cause__ is None


@pytest.mark.parametrize(("field", "change"), [("targets", {"targets": ["re:("]}), ("ignore", {})])
def test_a_bad_regex_is_quoted_with_the_regex_engine_s_reason(field, change):
    try:
        re.compile("(")
    except re.error as error:
        reason = str(error)
    raw = raw_config(**change) | ({"ignore": "re:("} if field == "ignore" else {})
    message = f"the quantization config's '{field}' holds a bad regex 're:(': {reason}."
    with pytest.raises(CheckpointError, match=exact(message)):
        parse_quantization_config(raw)


def int8_channel(**weights):
    """`raw_config()` with `weights` changed (None: the field left out)."""
    raw = raw_config()
    group = raw["config_groups"]["g"]["weights"]
    for key, value in weights.items():
        if value is None:
            del group[key]
        else:
            group[key] = value
    return raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (int8_channel(), (8, Scheme.SYM, Granularity.CHANNEL, None)),
        (int8_channel(symmetric=False), (8, Scheme.ASYM, Granularity.CHANNEL, None)),
        (int8_channel(type=None, symmetric=None), (8, Scheme.SYM, Granularity.CHANNEL, None)),
        (int8_channel(strategy="tensor"), (8, Scheme.SYM, Granularity.TENSOR, None)),
        (int8_channel(group_size=128), (8, Scheme.SYM, Granularity.CHANNEL, None)),
        (
            int8_channel(num_bits=2, strategy="group", group_size=16, symmetric=False),
            (2, Scheme.ASYM, Granularity.GROUP, 16),
        ),
    ],
    ids=["int8-channel", "asym", "defaults", "tensor", "channel-ignores-group-size", "int2"],
)
def test_settings_are_read_field_by_field(raw, expected):
    """Absent, ``type`` is int and ``symmetric`` true (compressed-tensors' defaults)."""
    config, fmt = parse_quantization_config(raw)
    assert (config.bits, config.scheme, config.granularity, config.group_size) == expected
    assert fmt == "pack-quantized"


def test_the_group_s_format_wins_and_the_top_level_one_is_the_fallback():
    raw = raw_config(fmt="int-quantized")
    raw["format"] = "pack-quantized"
    assert parse_quantization_config(raw)[1] == "int-quantized"
    raw = raw_config()
    del raw["config_groups"]["g"]["format"]
    raw["format"] = "int-quantized"
    assert parse_quantization_config(raw)[1] == "int-quantized"


def test_ignore_is_read_as_a_list_or_a_single_name():
    assert parse_quantization_config(raw_config())[0].exclude == ()
    assert parse_quantization_config(raw_config() | {"ignore": None})[0].exclude == ()
    raw = raw_config() | {"ignore": "lm_head"}
    assert parse_quantization_config(raw)[0].exclude == ("lm_head",)
    raw = raw_config() | {"ignore": ["lm_head", "re:.*gate"]}
    assert parse_quantization_config(raw)[0].exclude == ("lm_head", "re:.*gate")


def test_a_group_without_targets_quantizes_every_linear():
    """compressed-tensors requires targets; quantcli reads none as the class Linear (every
    linear layer), so nothing is excluded."""
    raw = raw_config()
    del raw["config_groups"]["g"]["targets"]
    config, _ = parse_quantization_config(raw)
    assert config.exclude == ()
    assert parse_quantization_config(raw_config(targets=[]))[0].exclude == ()


MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.mlp.down_proj_extra",
    "model.layers.1.mlp.down_proj",
    "model.layers.12.self_attn.q_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    ("targets", "ignore"),
    [
        (["Linear"], ["lm_head", "re:.*k_proj"]),
        (["re:.*q_proj", "model.layers.0.mlp.down_proj"], []),
        ("re:.*self_attn", ["model.layers.12.self_attn.q_proj"]),
        (["re:model\\.layers\\.1\\.", "re:.*down_proj$"], ["lm_head"]),
    ],
)
def test_targets_and_ignore_pick_the_modules_compressed_tensors_picks(targets, ignore):
    """compressed-tensors' own `is_match` on a Linear decides which modules it quantized;
    quantcli must quantize those and keep every other in float."""
    raw = raw_config(targets=targets) | {"ignore": ignore}
    config, _ = parse_quantization_config(raw)
    linear = torch.nn.Linear(1, 1)
    for name in MODULES:
        theirs = is_match(name, linear, targets, ignore)
        ours = not any(matches(name, pattern) for pattern in config.exclude)
        assert ours == theirs, name


# --- summarize: what inspect reports, from headers only -------------------------------------


def int4_layer(prefix, out_features, in_features, group_size=32):
    """A pack-quantized int4 asym group layer's tensors (values are not read)."""
    groups = in_features // group_size
    return {
        f"{prefix}.weight_packed": torch.zeros(out_features, in_features // 8, dtype=torch.int32),
        f"{prefix}.weight_shape": torch.tensor([out_features, in_features]),
        f"{prefix}.weight_scale": torch.ones(out_features, groups, dtype=torch.float16),
        f"{prefix}.weight_zero_point": torch.zeros(out_features // 8, groups, dtype=torch.int32),
    }


INT4_CONFIG = quantization_config(QuantConfig(bits=4, group_size=32), ["lm_head"])


def quantized_folder(folder, metadata=None):
    """Two int4 layers (numbered 10 and 2, listed alphabetically by safetensors), a float
    head, a norm and position ids."""
    tensors = int4_layer("model.layers.10.mlp", 16, 64) | int4_layer("model.layers.2.mlp", 8, 96)
    tensors |= {
        "lm_head.weight": torch.zeros(128, 64, dtype=torch.float16),
        "model.norm.weight": torch.ones(64, dtype=torch.float16),
        "model.position_ids": torch.arange(5),
    }
    save(folder, "model.safetensors", tensors, metadata)
    return folder


def test_a_quantcli_checkpoint_is_summarized_layer_by_layer(tmp_path):
    metadata = {"quantcli_version": "0.1", "quantcli_format_version": "2"}
    summary = summarize(quantized_folder(tmp_path, metadata), INT4_CONFIG)
    assert summary.kind == "quantcli"
    assert (summary.config.bits, summary.config.group_size, summary.config.optimize) == (
        4,
        32,
        False,
    )
    assert summary.files == 1 and summary.metadata == metadata
    # (name, kind, shape, bytes, params), counted by hand:
    #   layers.2:  packed 8x12 int32 384 + shape 16 + scale 8x3 fp16 48 + zero 1x3 int32 12
    #   layers.10: packed 16x8 int32 512 + shape 16 + scale 16x2 fp16 64 + zero 2x2 int32 16
    #   lm_head:   128x64 fp16 16384
    rows = [(x.name, x.kind, tuple(x.shape), x.nbytes, x.params) for x in summary.layers]
    assert rows == [
        ("lm_head", "float", (128, 64), 16384, 8192),
        ("model.layers.2.mlp", "int4", (8, 96), 460, 768),
        ("model.layers.10.mlp", "int4", (16, 64), 608, 1024),
    ]
    assert summary.other_bytes == 64 * 2 + 5 * 8  # the norm and the position ids
    assert summary.total_bytes == 16384 + 460 + 608 + 128 + 40
    assert [x.name for x in summary.quantized] == ["model.layers.2.mlp", "model.layers.10.mlp"]
    assert summary.bits_per_weight == 8 * (460 + 608) / (768 + 1024)


def test_int8_layers_in_the_older_plain_layout_are_summarized(tmp_path):
    """quantcli before format 2 (``int-quantized``): int8 ``weight`` (out, in)."""
    tensors = {
        "m.weight": torch.zeros(8, 40, dtype=torch.int8),
        "m.weight_scale": torch.ones(8, 1, dtype=torch.float16),
        "m.bias": torch.zeros(8, dtype=torch.float16),
    }
    save(tmp_path, "model.safetensors", tensors)
    raw = quantization_config(QuantConfig(bits=8), [])
    raw["format"] = raw["config_groups"]["group_0"]["format"] = "int-quantized"
    (layer,) = summarize(tmp_path, raw).layers
    # 320 integers + 16 bytes of scales + 16 of bias
    assert (layer.name, layer.kind, layer.shape, layer.nbytes, layer.params) == (
        "m",
        "int8",
        (8, 40),
        352,
        320,
    )


def test_a_compressed_tensors_checkpoint_from_another_tool_is_named_so(tmp_path):
    summary = summarize(quantized_folder(tmp_path, {"format": "pt"}), INT4_CONFIG)
    assert summary.kind == "compressed-tensors" and summary.config.bits == 4


@pytest.mark.parametrize(
    ("recorded", "optimize"),
    [
        ('{"optimize": true, "bits": 4}', True),
        ('{"optimize": false}', False),
        ('{"optimize": "true"}', False),
        ('{"optimize": 1}', False),
        ("[true]", False),
        ("{not json", False),
        (None, False),
    ],
)
def test_the_clipping_search_is_read_from_quantcli_s_metadata(tmp_path, recorded, optimize):
    metadata = {"quantcli_version": "0.1"}
    if recorded is not None:
        metadata["quantcli_config"] = recorded
    summary = summarize(quantized_folder(tmp_path, metadata), INT4_CONFIG)
    assert summary.config.optimize is optimize


def test_a_newer_format_is_refused_before_it_is_summarized(tmp_path):
    folder = quantized_folder(tmp_path, {"quantcli_version": "9", "quantcli_format_version": "3"})
    message = (
        f"{folder} uses quantcli format version 3; this quantcli reads up to 2: upgrade quantcli."
    )
    with pytest.raises(CheckpointError, match=exact(message)):
        summarize(folder, INT4_CONFIG)


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(None, "float"), ({"quant_method": "gptq"}, "other:gptq"), ("awq", "other:None")],
)
def test_unquantized_and_foreign_checkpoints_list_their_float_layers(tmp_path, raw, kind):
    tensors = {
        "model.layers.10.fc.weight": torch.zeros(4, 6),
        "model.layers.10.fc.bias": torch.zeros(4),
        "model.layers.9.fc.weight": torch.zeros(2, 3, dtype=torch.bfloat16),
        "model.embed.weight": torch.zeros(5, 2, dtype=torch.float16),
        "model.norm.weight": torch.zeros(6),
        "model.layers.9.fc.weight_scale": torch.ones(2, 1),  # no config: not read as one
    }
    save(tmp_path, "model.safetensors", tensors)
    summary = summarize(tmp_path, raw)
    assert (summary.kind, summary.config, summary.quantized) == (kind, None, [])
    rows = [(x.name, x.kind, tuple(x.shape), x.nbytes, x.params) for x in summary.layers]
    assert rows == [
        ("model.embed", "float", (5, 2), 20, 10),
        ("model.layers.9.fc", "float", (2, 3), 12 + 8, 6),
        ("model.layers.10.fc", "float", (4, 6), 96 + 16, 24),
    ]
    assert (summary.other_bytes, summary.total_bytes) == (24, 20 + 20 + 112 + 24)
    assert summary.bits_per_weight == 0.0


def test_layers_are_listed_in_the_model_s_order_not_alphabetically(tmp_path):
    """Numbers compare as numbers; names and odd digits (not ASCII) compare as text."""
    names = ["h.10", "h.9", "h.1", "h.1.x", "h.x", "h.١", "emb", "h.0010b"]
    save(tmp_path, "model.safetensors", {f"{n}.weight": torch.zeros(1, 1) for n in names})
    listed = [layer.name for layer in summarize(tmp_path, None).layers]
    assert listed == ["emb", "h.1", "h.1.x", "h.9", "h.10", "h.0010b", "h.x", "h.١"]


def shaped_layer(folder, parts):
    save(folder, "model.safetensors", {f"m.{k}": v for k, v in parts.items()})
    return summarize(folder, INT4_CONFIG)


@pytest.mark.parametrize(
    "parts",
    [
        {"weight_scale": torch.ones(2, 1)},
        {"weight_scale": torch.ones(2, 1), "weight": torch.zeros(8, dtype=torch.int8)},
        {"weight_scale": torch.ones(2), "weight_packed": torch.zeros(2, 4, dtype=torch.int32)},
        {"weight_scale": torch.ones(2, 1), "weight_packed": torch.zeros(8, dtype=torch.int32)},
    ],
    ids=["alone", "1-d-weight", "1-d-grouped-scale", "1-d-packed"],
)
def test_a_scale_without_2d_integers_or_with_the_wrong_shape_is_refused(tmp_path, parts):
    message = (
        "m.weight_scale has no 2-D weight_packed or weight beside it, or the wrong shape: "
        "the checkpoint is incomplete or corrupt."
    )
    with pytest.raises(CheckpointError, match=exact(message)):
        shaped_layer(tmp_path, parts)


@pytest.mark.parametrize(
    ("config", "packed_shape", "scale_shape", "expected"),
    [
        (QuantConfig(bits=4, group_size=32), (8, 12), (8, 3), (8, 96)),
        (QuantConfig(bits=4, group_size=128), (8, 12), (8, 1), (8, 128)),  # 96 padded to 128
        (QuantConfig(bits=4, granularity="channel"), (8, 12), (8, 1), (8, 96)),
        (QuantConfig(bits=2, granularity="tensor"), (8, 3), (1,), (8, 48)),
        (QuantConfig(bits=8), (8, 24), (8, 1), (8, 96)),
    ],
    ids=["g32", "g128", "channel", "tensor-2bit", "int8"],
)
def test_packed_layers_count_their_inputs_from_shapes(
    tmp_path, config, packed_shape, scale_shape, expected
):
    """in_features from the header alone: 32 // bits values a word, or groups times their
    size (``weight_shape``'s values are data, not read by inspect)."""
    tensors = {
        "m.weight_packed": torch.zeros(packed_shape, dtype=torch.int32),
        "m.weight_scale": torch.ones(scale_shape),
    }
    save(tmp_path, "model.safetensors", tensors)
    (layer,) = summarize(tmp_path, quantization_config(config, [])).layers
    assert (layer.kind, layer.shape, layer.params) == (
        f"int{config.bits}",
        expected,
        expected[0] * expected[1],
    )
    # as `inspect --json` prints them: integers
    assert json.dumps([layer.shape, layer.params]) == json.dumps(
        [expected, expected[0] * expected[1]]
    )


# --- side files: the local source, eval results --------------------------------------------


def test_the_local_source_is_recorded_as_json_and_read_back(tmp_path):
    write_local_source(tmp_path, tmp_path / "src model")
    path = tmp_path / "quantcli_local_source.json"
    assert path.read_text() == json.dumps({"path": str(tmp_path / "src model")}) + "\n"
    assert read_local_source(tmp_path) == str(tmp_path / "src model")


@pytest.mark.parametrize("text", [None, "{broken", '["/x"]', '{"path": 3}', '{"other": "/x"}'])
def test_an_unreadable_local_source_record_is_none(tmp_path, text):
    if text is not None:
        (tmp_path / "quantcli_local_source.json").write_text(text)
    assert read_local_source(tmp_path) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("{broken", None),
        ("[1, 2]", None),
        ('{"perplexity": 12.5}', {"perplexity": 12.5}),
    ],
)
def test_recorded_eval_results_are_read_or_none(tmp_path, text, expected):
    if text is not None:
        (tmp_path / "quantcli_eval.json").write_text(text)
    assert read_eval(tmp_path) == expected
