"""compressed-tensors' own code as the reference for quantcli's files, both ways.

- quantcli writes what compressed-tensors' writer would: the format its
  `infer_module_format` picks for the scheme, the tensors its pack-quantized compressor
  makes, and its decompressor reads quantcli's files back to the same integers and weights.
- quantcli reads what compressed-tensors' writer makes (`ModelCompressor`, as
  llm-compressor uses it: W8A16, W4A16, W4A16_ASYM, ignore lists, regex targets), and the
  int8 layout quantcli wrote before format 2 (``int-quantized``).
"""

import json

import pytest
import torch
from cli_checks import run_quantcli
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from tiny_models import build, char_tokenizer, logits

from quantcli import QuantConfig
from quantcli.checkpoint import parse_quantization_config
from quantcli.errors import CheckpointError
from quantcli.models.loading import load_quantized
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

WRITTEN = [
    QuantConfig(bits=bits, scheme=scheme, granularity=granularity)
    for bits in (8, 4, 2)
    for scheme in ("sym", "asym")
    for granularity in ("tensor", "channel", "group")
]
LAYER = "model.layers.1.mlp.down_proj"  # (64, 128): 4 groups of 32 per row


def quantized(saved_models, out, config):
    quantize_checkpoint(resolve_model(str(saved_models("llama"))), out, config)
    return json.loads((out / "config.json").read_text())["quantization_config"], load_file(
        out / "model.safetensors"
    )


def scheme_of(group: dict) -> QuantizationScheme:
    return QuantizationScheme(
        targets=group["targets"], weights=QuantizationArgs(**group["weights"])
    )


def layer_state(tensors: dict, name: str) -> dict:
    return {k.removeprefix(f"{name}."): t for k, t in tensors.items() if k.startswith(f"{name}.")}


@pytest.mark.parametrize("config", WRITTEN, ids=lambda c: c.label.replace(" ", "-"))
def test_quantcli_writes_what_compressed_tensors_writes(config, saved_models, tmp_path):
    quant, tensors = quantized(saved_models, tmp_path / "q", config)
    group = quant["config_groups"]["group_0"]
    scheme = scheme_of(group)
    assert quant["format"] == group["format"] == infer_module_format(torch.nn.Linear, scheme).value

    ours = layer_state(tensors, LAYER)
    weight = load_file(saved_models("llama") / "model.safetensors")[f"{LAYER}.weight"]
    # compressed-tensors compresses the float weight with our scales and zero points: the same
    # tensors, names, dtypes, shapes and integers bit for bit (both round x / s half to even)
    zero = None
    if "weight_zero_point" in ours:
        zero = ours["weight_zero_point"]
        if config.granularity.value != "tensor":
            zero_shape = (weight.shape[0], ours["weight_scale"].shape[1])
            zero = unpack_from_int32(zero, config.bits, zero_shape, packed_dim=0)
    given = {"weight": weight, "weight_scale": ours["weight_scale"]}
    if zero is not None:
        given["weight_zero_point"] = zero
    theirs = PackedQuantizationCompressor.compress(given, scheme)
    assert sorted(theirs) == sorted(ours)
    for key, tensor in theirs.items():
        assert tensor.dtype == ours[key].dtype and torch.equal(tensor, ours[key]), key

    # and its decompressor reads our words back to the weight quantcli's layer dequantizes
    decompressed = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    layer = loaded.get_submodule(LAYER)
    assert torch.equal(decompressed, layer.dequantize_weight())
    integers, _ = layer.integers()
    assert torch.equal(
        unpack_from_int32(ours["weight_packed"], config.bits, weight.shape), integers
    )


def third_party(out, preset, ignore, targets=("Linear",), **weights):
    """A checkpoint written by compressed-tensors' `ModelCompressor` the way llm-compressor
    writes one: scheme applied, weight qparams from min/max (`calculate_qparams`), compressed,
    saved by transformers, config updated by the compressor."""
    model = build("llama")
    scheme = preset_name_to_scheme(preset, list(targets))
    scheme.weights = scheme.weights.model_copy(update=weights)
    apply_quantization_config(
        model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore))
    )
    reference = build("llama")  # the same float weights, dequantized by compressed-tensors
    for name, module in model.named_modules():
        if getattr(module, "quantization_scheme", None) is None:
            continue
        args = module.quantization_scheme.weights
        weight = module.weight.detach()
        if args.strategy == "group":
            grouped = weight.reshape(weight.shape[0], -1, args.group_size)
            low, high = grouped.amin(-1), grouped.amax(-1)
        else:
            low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
        scale, zero = calculate_qparams(low, high, args)
        module.weight_scale.data = scale.to(module.weight_scale.dtype)
        module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype)
        state = {"weight": weight, "weight_scale": module.weight_scale.data}
        state["weight_zero_point"] = module.weight_zero_point.data
        compressed = PackedQuantizationCompressor.compress(state, module.quantization_scheme)
        dense = PackedQuantizationCompressor.decompress(compressed, module.quantization_scheme)
        reference.get_submodule(name).weight.data = dense["weight"]
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    char_tokenizer().save_pretrained(out)
    return reference


THIRD_PARTY = {
    "W8A16-channel": ("W8A16", {"strategy": "channel", "group_size": None}),
    "W8A16-g32": ("W8A16", {"group_size": 32}),
    "W4A16-g32": ("W4A16", {"group_size": 32}),
    "W4A16_ASYM-g32": ("W4A16_ASYM", {"group_size": 32}),
}


@pytest.mark.parametrize("name", THIRD_PARTY)
def test_checkpoints_written_by_compressed_tensors_load_with_their_logits(name, tmp_path):
    preset, weights = THIRD_PARTY[name]
    reference = third_party(tmp_path / "ct", preset, ["lm_head", "re:.*down_proj"], **weights)
    loaded, report = load_quantized(resolve_model(str(tmp_path / "ct")), dtype=None)
    assert report.quantized == 12 and report.kept_float == 3  # down_proj x2 and the head
    # both dequantize s * (q - z) in float32 in the same order: equal logits
    assert torch.equal(logits(loaded, "llama"), logits(reference, "llama"))


def test_regex_targets_quantize_only_the_modules_they_name(tmp_path):
    reference = third_party(
        tmp_path / "ct", "W4A16", [], targets=[r"re:.*self_attn\.(q|v)_proj$"], group_size=32
    )
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert group["config_groups"]["group_0"]["targets"] == [r"re:.*self_attn\.(q|v)_proj$"]
    loaded, report = load_quantized(resolve_model(str(tmp_path / "ct")), dtype=None)
    assert report.quantized == 4  # q_proj and v_proj of two layers
    assert torch.equal(logits(loaded, "llama"), logits(reference, "llama"))


def test_a_third_party_checkpoint_inspects_evaluates_and_generates(tmp_path):
    third_party(tmp_path / "ct", "W4A16_ASYM", ["lm_head"], group_size=32)
    inspect = run_quantcli("inspect", tmp_path / "ct", "--json")
    assert inspect.returncode == 0, inspect.stderr
    summary = json.loads(inspect.stdout)
    assert (summary["kind"], summary["scheme"]) == ("compressed-tensors", "int4 asym g32")
    assert sum(layer["kind"] == "int4" for layer in summary["layers"]) == 14
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    scored = run_quantcli(
        "eval", tmp_path / "ct", "--no-baseline", "--text", text, "--window", "32", "--json"
    )
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["perplexity"] > 1
    generated = run_quantcli("generate", tmp_path / "ct", "abc", "--max-new-tokens", "4", "--json")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["new_tokens"] == 4


def as_int_quantized(folder):
    """Rewrite a pack-quantized int8 checkpoint as quantcli format 1 wrote it: plain int8
    ``weight`` and ``"format": "int-quantized"``."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        module = key.removesuffix(".weight_packed")
        words = tensors.pop(key)
        shape = tensors.pop(f"{module}.weight_shape").tolist()
        tensors[f"{module}.weight"] = unpack_from_int32(words, 8, torch.Size(shape))
    save_file(tensors, path, metadata={"format": "pt", "quantcli_format_version": "1"})
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    quant["format"] = quant["config_groups"]["group_0"]["format"] = "int-quantized"
    (folder / "config.json").write_text(json.dumps(config))


def test_int8_checkpoints_of_format_1_still_load_with_the_same_logits(saved_models, tmp_path):
    quantized(saved_models, tmp_path / "packed", QuantConfig(bits=8))
    quantized(saved_models, tmp_path / "plain", QuantConfig(bits=8))
    as_int_quantized(tmp_path / "plain")
    packed, _ = load_quantized(resolve_model(str(tmp_path / "packed")))
    plain, _ = load_quantized(resolve_model(str(tmp_path / "plain")))
    assert torch.equal(logits(plain, "llama"), logits(packed, "llama"))


def test_files_that_disagree_with_their_format_are_refused_by_name(saved_models, tmp_path):
    quantized(saved_models, tmp_path / "q", QuantConfig(bits=8))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    quant = config["quantization_config"]
    quant["format"] = quant["config_groups"]["group_0"]["format"] = "int-quantized"
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"holds model\.layers\.0\..*weight_packed"):
        load_quantized(resolve_model(str(tmp_path / "q")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "float-quantized"}, "format 'float-quantized' with 8-bit weights"),
        ({"num_bits": 3}, "bits=3 is not supported"),
        ({"format": "int-quantized", "num_bits": 4}, "(it reads pack-quantized)"),
        ({"targets": ["re:("]}, "'targets' holds a bad regex"),
        ({"ignore": [3]}, "'ignore' must be a list of names"),
    ],
)
def test_unknown_formats_widths_and_patterns_are_refused_by_name(change, message):
    group = {"targets": ["Linear"], "format": "pack-quantized"}
    group["weights"] = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    raw = {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}
    for key, value in change.items():
        target = raw if key == "ignore" else group["weights"] if key == "num_bits" else group
        target[key] = value
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_quantization_config(raw)
