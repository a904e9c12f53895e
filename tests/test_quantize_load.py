"""Streaming quantize -> checkpoint -> load, on tiny random models saved to folders."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import AUTO_CLASS, CONFIGS, build, logits

from quantcli import QuantConfig, replace_linear_layers
from quantcli.checkpoint import FORMAT_VERSION, INDEX_NAME, read_all_headers, weight_files
from quantcli.errors import CheckpointError, InvalidTensorError, UsageError
from quantcli.models.loading import load_quantized, summarize_folder
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

ARCHS = list(CONFIGS)
SCHEMES = {
    "int8": QuantConfig(bits=8),
    "int4-g32": QuantConfig(bits=4),
    "int2-sym-g16": QuantConfig(bits=2, scheme="sym", group_size=16),
}


def quantize_folder(src, out, config, **kwargs):
    return quantize_checkpoint(resolve_model(str(src)), out, config, **kwargs)


def load_folder(path, **kwargs):
    """Load as stored (dtype None): these tests compare with the in-memory float32 model."""
    return load_quantized(resolve_model(str(path)), **{"dtype": None, **kwargs})


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_loaded_checkpoint_gives_the_in_memory_quantized_logits_bit_for_bit(
    arch, scheme, saved_models, tmp_path
):
    config = SCHEMES[scheme]
    summary = quantize_folder(saved_models(arch), tmp_path / "q", config)
    loaded, report = load_folder(tmp_path / "q")

    in_memory = build(arch)
    replaced = replace_linear_layers(in_memory, config)
    assert sorted(summary.quantized) == sorted(replaced.replaced)
    assert report.quantized == len(replaced.replaced)
    assert torch.equal(logits(loaded, arch), logits(in_memory, arch))


def test_output_folder_layout_config_and_metadata(saved_models, tmp_path):
    source = saved_models("llama")  # saved with a tokenizer and a chat template
    summary = quantize_folder(source, tmp_path / "q", QuantConfig(bits=4, group_size=32))
    out = tmp_path / "q"
    side = {
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {"config.json", "model.safetensors", "quantcli_local_source.json"} | side
    )
    for name in side:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    group = quant["config_groups"]["group_0"]
    assert quant["quant_method"] == "compressed-tensors"
    assert quant["format"] == group["format"] == "pack-quantized"
    assert quant["quantization_status"] == "compressed"
    assert quant["ignore"] == ["lm_head"]
    assert group["weights"] == {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 32,
        "dynamic": False,
    }
    with safe_open(out / "model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    assert metadata["quantcli_format_version"] == str(FORMAT_VERSION)
    assert metadata["source_model"] == source.name  # a local source: its name, never its path
    assert json.loads(metadata["quantcli_config"])["group_size"] == 32
    assert int(metadata["source_bytes"]) == summary.source_bytes
    # 4-bit values + an fp32 scale and a 4-bit zero point per 32 weights + 16-byte weight_shape
    shape_bits = len(summary.quantized) * 16 * 8 / summary.quantized_params
    assert summary.bits_per_weight == pytest.approx(4 + 32 / 32 + 4 / 32 + shape_bits, rel=1e-12)


def test_streamed_files_read_back_with_the_safetensors_library(saved_models, tmp_path):
    quantize_folder(saved_models("opt"), tmp_path / "q", QuantConfig(bits=4))
    ours, _ = read_all_headers(weight_files(tmp_path / "q"))
    theirs = load_file(tmp_path / "q" / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert (ours[name].dtype, ours[name].shape) == (tensor.dtype, tuple(tensor.shape))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sharded_input_and_output(arch, saved_models, tmp_path):
    source = saved_models(arch, max_shard_size="60KB")
    assert (source / INDEX_NAME).is_file()
    summary = quantize_folder(source, tmp_path / "q", QuantConfig(bits=8), max_shard_size=30_000)
    out = tmp_path / "q"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == summary.shards > 1
    modules = {}
    for name, shard in index["weight_map"].items():
        modules.setdefault(name.rpartition(".")[0], set()).add(shard)
    assert all(len(files) == 1 for files in modules.values())  # a module never straddles shards
    loaded, _ = load_folder(out)
    in_memory = build(arch)
    replace_linear_layers(in_memory, QuantConfig(bits=8))
    assert torch.equal(logits(loaded, arch), logits(in_memory, arch))


def test_dtype_option_sets_scales_and_float_tensors(saved_models, tmp_path):
    quantize_folder(saved_models("llama"), tmp_path / "q", QuantConfig(dtype=torch.bfloat16))
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert tensors["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert tensors["model.norm.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    loaded, _ = load_folder(tmp_path / "q")
    assert loaded.model.norm.weight.dtype == torch.bfloat16


def test_tied_embeddings_are_stored_once_and_tied_again(saved_models, tmp_path):
    quantize_folder(saved_models("gpt2"), tmp_path / "q", QuantConfig(bits=8))
    names = set(load_file(tmp_path / "q" / "model.safetensors"))
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    loaded, _ = load_folder(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_excluded_and_group_incompatible_layers_are_listed_in_ignore(saved_models, tmp_path):
    config = QuantConfig(bits=8, exclude=("*.fc2",))
    summary = quantize_folder(saved_models("opt"), tmp_path / "q", config)
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"][
        "ignore"
    ]
    assert ignore == sorted(summary.skipped) and "lm_head" in ignore
    assert "model.decoder.layers.0.fc2" in ignore
    loaded, report = load_folder(tmp_path / "q")
    assert report.kept_float == len(ignore)


def test_existing_output_needs_overwrite_and_is_replaced_whole(saved_models, tmp_path):
    out = tmp_path / "q"
    quantize_folder(saved_models("opt"), out, QuantConfig(bits=4))
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="already exists: pass --overwrite"):
        quantize_folder(saved_models("opt"), out, QuantConfig())
    assert (out / "keep.txt").read_text() == "user data"
    quantize_folder(saved_models("opt"), out, QuantConfig(), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary folders left


def test_a_failure_midway_leaves_no_output_and_no_temporary_folder(saved_models, tmp_path):
    calls = []

    def fail_on_third(name):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_folder(saved_models("opt"), tmp_path / "q", QuantConfig(), on_tensor=fail_on_third)
    assert list(tmp_path.iterdir()) == []


def test_nan_weight_names_the_tensor_and_writes_nothing(tmp_path):
    model = build("opt")
    with torch.no_grad():
        model.model.decoder.layers[0].self_attn.k_proj.weight[1, 2] = float("inf")
    model.save_pretrained(tmp_path / "src")
    with pytest.raises(InvalidTensorError, match=r"layers\.0\.self_attn\.k_proj\.weight: .*1 Inf"):
        quantize_folder(tmp_path / "src", tmp_path / "q", QuantConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_already_quantized_input_is_refused(saved_models, tmp_path):
    quantize_folder(saved_models("opt"), tmp_path / "q", QuantConfig())
    with pytest.raises(UsageError, match="already quantized"):
        quantize_folder(tmp_path / "q", tmp_path / "qq", QuantConfig())


def test_pickle_only_checkpoint_is_refused(tmp_path):
    build("opt").save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").rename(tmp_path / "src" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights.*--allow-pickle"):
        quantize_folder(tmp_path / "src", tmp_path / "q", QuantConfig())


def test_allow_pickle_reads_tensors_only_and_gives_the_same_checkpoint(saved_models, tmp_path):
    model = build("llama")  # tied embeddings: the pickle shares one tensor between two names
    model.save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    quantize_folder(tmp_path / "src", tmp_path / "q", QuantConfig(), allow_pickle=True)
    quantize_folder(saved_models("llama"), tmp_path / "ref", QuantConfig())
    ours, reference = load_folder(tmp_path / "q")[0], load_folder(tmp_path / "ref")[0]
    assert torch.equal(logits(ours, "llama"), logits(reference, "llama"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "ref", "src"]  # no temp left


def test_allow_pickle_refuses_code_in_the_pickle(tmp_path):
    build("opt").save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("this would be any code",))

    torch.save({"weight": Payload()}, tmp_path / "src" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a plain tensor checkpoint"):
        quantize_folder(tmp_path / "src", tmp_path / "q", QuantConfig(), allow_pickle=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- the loader checks the files against the config before using them -------------------


@pytest.fixture
def int8_checkpoint(saved_models, tmp_path):
    out = tmp_path / "q"
    quantize_folder(saved_models("llama"), out, QuantConfig(bits=8))
    return out


def rewrite(folder, change):
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)


SCALE = "model.layers.0.self_attn.q_proj.weight_scale"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda t, m: t.update({SCALE: t[SCALE].reshape(1, -1)}),
            r"weight_scale has shape \[1, 64\] in the file but the config implies \[64, 1\]",
        ),
        (lambda t, m: t.pop(SCALE), r"lacks model\.layers\.0\.self_attn\.q_proj\.weight_scale"),
        (lambda t, m: t.update({"model.extra.weight": torch.zeros(2)}), "holds model.extra.weight"),
        (
            lambda t, m: t.update(
                {
                    "model.layers.0.mlp.up_proj.weight_packed": t[
                        "model.layers.0.mlp.up_proj.weight_packed"
                    ].to(torch.int64)
                }
            ),
            "is int64 in the file but the config implies int32",
        ),
        (lambda t, m: m.update({"quantcli_format_version": "99"}), "format version 99"),
        (
            lambda t, m: t[SCALE].__setitem__(3, float("nan")),
            r"q_proj\.weight_scale holds 1 value\(s\) that are not finite and positive "
            r"\(e\.g\. nan\)",
        ),
        (lambda t, m: t[SCALE].neg_(), r"holds 64 value\(s\) that are not finite and positive"),
        (lambda t, m: t[SCALE].zero_(), r"not finite and positive \(e\.g\. 0\.0\)"),
        (
            lambda t, m: t[SCALE.replace("scale", "shape")].__setitem__(1, 63),
            r"q_proj\.weight_shape holds \[64, 63\], not \[64, 64\]",
        ),
    ],
    ids=[
        "scale-shape",
        "missing",
        "unexpected",
        "dtype",
        "newer-format",
        "nan-scale",
        "negative-scales",
        "zero-scales",
        "weight-shape",
    ],
)
def test_tampered_checkpoints_are_refused_by_name(int8_checkpoint, change, message):
    rewrite(int8_checkpoint, change)
    with pytest.raises(CheckpointError, match=message):
        load_folder(int8_checkpoint)


def test_a_scale_without_its_integers_is_refused_by_inspect(int8_checkpoint):
    """Found by the CLI fuzz test: inspect read `weight` beside a lone scale (KeyError)."""
    rewrite(int8_checkpoint, lambda t, m: t.update({"model.extra.weight_scale": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"model\.extra\.weight_scale has no 2-D weight"):
        summarize_folder(int8_checkpoint)


def test_zero_point_outside_the_bit_width_is_refused(saved_models, tmp_path):
    """A 4-bit per-tensor zero point is stored as plain int8: 100 fits the dtype, not 4 bits."""
    out = tmp_path / "q"
    quantize_folder(saved_models("llama"), out, QuantConfig(bits=4, granularity="tensor"))
    zero = SCALE.replace("scale", "zero_point")
    rewrite(out, lambda t, m: t[zero].fill_(100))
    with pytest.raises(CheckpointError, match=r"q_proj\.weight_zero_point holds values outside"):
        load_folder(out)


def test_truncated_file_is_refused(int8_checkpoint):
    path = int8_checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_folder(int8_checkpoint)


def test_float_checkpoint_is_not_loaded_as_quantized(saved_models):
    with pytest.raises(CheckpointError, match="not quantized"):
        load_folder(saved_models("opt"))


def test_skeleton_keeps_real_buffers(saved_models, tmp_path):
    """Rotary tables and position ids are computed, not read: they must not stay on meta."""
    quantize_folder(saved_models("bert"), tmp_path / "q", QuantConfig(bits=4))
    loaded, _ = load_folder(tmp_path / "q")
    reference = AUTO_CLASS["bert"].from_config(CONFIGS["bert"]())
    assert torch.equal(loaded.bert.embeddings.position_ids, reference.bert.embeddings.position_ids)


def test_conv1d_is_a_warning_and_group_misfits_are_refused_with_the_sizes_that_fit(
    saved_models, tmp_path
):
    gpt2 = quantize_folder(saved_models("gpt2"), tmp_path / "g", QuantConfig(bits=8))
    assert any("Conv1D" in warning for warning in gpt2.warnings)
    # groups of 128 fit only down_proj (128 inputs); the 12 other layers have 64 inputs, so
    # the sizes that fit every layer are the divisors of gcd(64, 128) = 64 from 8 up
    with pytest.raises(UsageError) as refused:
        quantize_folder(saved_models("llama"), tmp_path / "l", QuantConfig(bits=4, group_size=128))
    assert str(refused.value) == (
        "--group-size 128 does not divide the input width of 12 layer(s) "
        "(model.layers.0.self_attn.q_proj: 64); group sizes that fit every layer: 8, 16, 32, 64."
    )
    assert not (tmp_path / "l").exists()


def test_optimized_checkpoint_loads_like_its_in_memory_model_and_records_the_setting(
    saved_models, tmp_path
):
    config = QuantConfig(bits=2, group_size=16, optimize=True)
    quantize_folder(saved_models("llama"), tmp_path / "q", config)
    loaded, _ = load_folder(tmp_path / "q")
    in_memory = build("llama")
    replace_linear_layers(in_memory, config)
    assert torch.equal(logits(loaded, "llama"), logits(in_memory, "llama"))
    _, metadata = read_all_headers(weight_files(tmp_path / "q"))
    assert json.loads(metadata["quantcli_config"])["optimize"] is True
    assert summarize_folder(tmp_path / "q").config.label == "int2 asym g16 +clip"  # inspect, eval
