"""The safetensors writer and the metadata quantcli records, byte by byte and field by field.

The other file-format tests (test_quantize_load.py) go through whole checkpoints; these pin
the two things those let through: the 8-byte alignment of the data section, and every
field of ``quantcli_config`` (not only ``group_size``).
"""

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from quantcli import QuantConfig, __version__
from quantcli.checkpoint import (
    FORMAT_VERSION,
    ShardWriter,
    TensorSpec,
    header_metadata,
    read_all_headers,
    read_header,
    read_tensor,
    weight_files,
)
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

CONFIGS = [
    QuantConfig(bits=8),
    QuantConfig(bits=4),
    QuantConfig(bits=2, scheme="sym", group_size=16, dtype=torch.bfloat16),
    QuantConfig(bits=4, granularity="channel", exclude=("*.fc2", "lm_head"), optimize=True),
    QuantConfig(bits=8, scheme="asym", granularity="tensor", quantize_head=True),
    QuantConfig(bits=4, scheme="sym", quantize_embeddings=True),
]


def expected_quantcli_config(config):
    """The recorded settings, written out by hand from the config's public fields."""
    return {
        "bits": config.bits,
        "scheme": config.scheme.value,
        "granularity": config.granularity.value,
        "group_size": config.group_size,
        "exclude": list(config.exclude),
        "quantize_head": config.quantize_head,
        "quantize_embeddings": config.quantize_embeddings,
        "dtype": {None: None, torch.bfloat16: "bfloat16"}[config.dtype],
        "optimize": config.optimize,
    }


def write_shard(path, tensors, metadata):
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with ShardWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_metadata_round_trips_field_by_field(config, tmp_path):
    metadata = header_metadata(config, "org/model", "abc123")
    write_shard(tmp_path / "m.safetensors", {"x": torch.arange(3, dtype=torch.int8)}, metadata)
    _, read = read_header(tmp_path / "m.safetensors")
    assert set(read) == {
        "format",
        "quantcli_version",
        "quantcli_format_version",
        "quantization_config",
        "quantcli_config",
        "source_model",
        "source_revision",
    }
    assert read["format"] == "pt"
    assert read["quantcli_version"] == __version__
    assert read["quantcli_format_version"] == str(FORMAT_VERSION)
    assert read["source_model"] == "org/model" and read["source_revision"] == "abc123"
    recorded = json.loads(read["quantcli_config"])
    expected = expected_quantcli_config(config)
    assert set(recorded) == set(expected)
    for field, value in expected.items():
        assert recorded[field] == value, field
    weights = json.loads(read["quantization_config"])["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (
        config.bits,
        config.scheme.value == "sym",
        config.granularity.value,
    )
    assert weights["group_size"] == config.group_size


def test_quantized_checkpoint_records_the_settings_it_was_made_with(saved_models, tmp_path):
    """End to end, with settings that differ from the defaults in every recorded field."""
    config = QuantConfig(
        bits=2, scheme="sym", group_size=16, exclude=("*.mlp.*",), dtype=torch.bfloat16
    )
    quantize_checkpoint(resolve_model(str(saved_models("llama"))), tmp_path / "q", config)
    _, metadata = read_all_headers(weight_files(tmp_path / "q"))
    recorded = json.loads(metadata["quantcli_config"])
    assert recorded == expected_quantcli_config(config)
    source = saved_models("llama")
    # a local source is named by its folder and the sha256 of its weights, never its path
    assert metadata["source_model"] == source.name
    weights = hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest()
    assert metadata["source_sha256"] == weights
    assert metadata["source_revision"] == ""


@pytest.mark.parametrize("name_length", range(8))
def test_data_section_starts_8_byte_aligned_and_reads_back(name_length, tmp_path):
    """safetensors readers map the data section and view it as the tensors' dtypes; the
    writer pads the JSON header with spaces (which the format allows) so that the data
    starts on a multiple of 8 whatever the header's length. Eight name lengths cover
    every remainder modulo 8."""
    tensors = {
        "w" * (name_length + 1): torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0], dtype=torch.float32),
        "q": torch.tensor([[7, -8, 3]], dtype=torch.int8),
    }
    path = tmp_path / "m.safetensors"
    write_shard(path, tensors, {"format": "pt"})
    data = path.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    assert header_size % 8 == 0 and (8 + header_size) % 8 == 0
    header = data[8 : 8 + header_size]
    stripped = header.rstrip(b" ")
    assert stripped.endswith(b"}") and len(header) - len(stripped) < 8  # spaces, < 8 of them
    json.loads(header)  # the padded header is still valid JSON
    infos, _ = read_header(path)
    theirs = load_file(path)
    for name, tensor in tensors.items():
        assert torch.equal(read_tensor(infos[name]), tensor)
        assert torch.equal(theirs[name], tensor)
    # the first tensor (declared first) starts right at the aligned data section
    first = next(iter(tensors))
    assert infos[first].offset == 8 + header_size
    assert infos[first].offset % 8 == 0
