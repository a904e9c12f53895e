"""Mixtures of experts: experts quantized while streaming, saved per expert under the names
transformers saves, loaded into `QuantExperts`, and run.

The reference for the logits is independent of quantcli's arithmetic: compressed-tensors'
own decompressor (`PackedQuantizationCompressor.decompress`) turns every quantized matrix
of the checkpoint back into a float weight, the result is saved as a float checkpoint under
the same names, and transformers' `from_pretrained` loads it (its own key mapping fuses the
experts). quantcli's model must then compute what transformers computes on those weights.

Error analysis of that comparison (float32 throughout, `dtype=None`): both sides compute
each weight as ``scale * (q - zero)`` in float32 from the same integers and scales, so the
weights are equal bit for bit; what differs is only the order of float32 sums: transformers
runs its experts with ``grouped_mm`` and adds the top-2 outputs in a different order than
quantcli's loop, and its attention may use another matmul path. Each such difference is a
few float32 roundings (relative 6e-8 each) of values below 1 over 2 layers, 64-wide dot
products: far below 1e-5 on logits of magnitude ~0.5. A routing flip (a token sent to
another expert because two router scores tie within rounding) would cost ~1e-2; the
routers are float and equal on both sides, so it does not happen on these inputs.
Measured here (transformers 5.24, torch 2.13, CPU): the logits are equal bit for bit for all
five families, int8 and int4 g32; quantization itself moves them by up to 0.005 (int8) and
0.09 (int4) against the float model, logits up to 0.63.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from cli_checks import assert_one_line_error, run_quantcli
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import MOE_CONFIGS, VOCAB, build, char_tokenizer
from transformers import AutoModelForCausalLM

from quantcli import QuantConfig
from quantcli.errors import CheckpointError, UsageError
from quantcli.models.loading import load_quantized
from quantcli.models.moe import plan_experts
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint
from quantcli.nn.qexperts import QuantExperts

FAMILIES = list(MOE_CONFIGS)
SCHEMES = {
    "int8": QuantConfig(bits=8),  # symmetric per channel
    "int4-g32": QuantConfig(bits=4, group_size=32),  # asymmetric groups of 32
}
#: Each family's saved names: an expert matrix, the router, and what the model calls them.
EXPERT_KEY = {
    "mixtral": "model.layers.1.block_sparse_moe.experts.{e}.{w}",
    "qwen2_moe": "model.layers.1.mlp.experts.{e}.{w}",
    "qwen3_moe": "model.layers.1.mlp.experts.{e}.{w}",
    "olmoe": "model.layers.1.mlp.experts.{e}.{w}",
    "deepseek_v3": "model.layers.1.mlp.experts.{e}.{w}",
}
MATRICES = {
    "mixtral": ("w1", "w2", "w3"),
    **{f: ("gate_proj", "up_proj", "down_proj") for f in FAMILIES if f != "mixtral"},
}
ROUTERS = {
    "mixtral": ["model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate"],
    "qwen2_moe": [
        "model.layers.0.mlp.gate",
        "model.layers.0.mlp.shared_expert_gate",
        "model.layers.1.mlp.gate",
        "model.layers.1.mlp.shared_expert_gate",
    ],
    "qwen3_moe": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
    "olmoe": ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"],
    "deepseek_v3": ["model.layers.1.mlp.gate"],  # layer 0 is dense (first_k_dense_replace)
}
#: Expert-holding layers per family (DeepSeek-V3's first layer is a dense MLP).
MOE_LAYERS = {family: 2 for family in FAMILIES} | {"deepseek_v3": 1}


def inputs(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs()).logits


@pytest.fixture(scope="module")
def moe_source(tmp_path_factory):
    """Tiny MoE models saved by transformers (`save_pretrained`), once per module."""
    root = tmp_path_factory.mktemp("moe")
    folders = {}

    def folder(family: str):
        if family not in folders:
            path = root / family
            build(family).save_pretrained(path)
            char_tokenizer().save_pretrained(path)
            folders[family] = path
        return folders[family]

    return folder


def quantize(source, out, config):
    return quantize_checkpoint(resolve_model(str(source)), out, config)


def scheme_of(quant: dict) -> QuantizationScheme:
    group = quant["config_groups"]["group_0"]
    return QuantizationScheme(
        targets=group["targets"], weights=QuantizationArgs(**group["weights"])
    )


def decompressed_reference(source, quantized, out):
    """The float model transformers loads from compressed-tensors' decompression of every
    quantized matrix of `quantized` (other tensors as they are), saved under the same names."""
    quant = json.loads((quantized / "config.json").read_text())["quantization_config"]
    scheme = scheme_of(quant)
    tensors = load_file(quantized / "model.safetensors")
    modules = {key.rpartition(".")[0] for key in tensors if key.endswith(".weight_packed")}
    dense = {}
    for module in modules:
        state = {
            leaf: tensors.pop(f"{module}.{leaf}")
            for leaf in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
            if f"{module}.{leaf}" in tensors
        }
        dense[f"{module}.weight"] = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    out.mkdir()
    save_file({**tensors, **dense}, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copyfile(source / "config.json", out / "config.json")
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    # every tensor under the name transformers expects: nothing random, nothing left over
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_logits_equal_compressed_tensors_decompression(family, scheme, moe_source, tmp_path):
    source = moe_source(family)
    summary = quantize(source, tmp_path / "q", SCHEMES[scheme])
    loaded, report = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    reference = decompressed_reference(source, tmp_path / "q", tmp_path / "ref")

    experts = 4 * 3 * MOE_LAYERS[family]
    assert sum(".experts." in name for name in summary.quantized) == experts
    quantized_experts = [m for m in loaded.modules() if isinstance(m, QuantExperts)]
    assert len(quantized_experts) == MOE_LAYERS[family]
    ours, theirs = run(loaded), run(reference)
    float_logits = run(AutoModelForCausalLM.from_pretrained(source).eval())
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours - theirs).abs().max()
    # and quantization did change the experts: the comparison is not float against float
    assert (theirs - float_logits).abs().max() > 1e-3


ALL_SCHEMES = [
    QuantConfig(bits=bits, scheme=scheme, granularity=granularity)
    for bits in (8, 4, 2)
    for scheme in ("sym", "asym")
    for granularity in ("tensor", "channel", "group")
]


@pytest.mark.parametrize("config", ALL_SCHEMES, ids=lambda c: c.label.replace(" ", "-"))
def test_every_scheme_quantizes_and_runs_the_experts(config, moe_source, tmp_path):
    source = moe_source("qwen2_moe")  # shared expert and its gate beside the routed experts
    quantize(source, tmp_path / "q", config)
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    reference = decompressed_reference(source, tmp_path / "q", tmp_path / "ref")
    assert torch.allclose(run(loaded), run(reference), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_expert_is_saved_per_expert_under_its_transformers_name(family, moe_source, tmp_path):
    source = moe_source(family)
    quantize(source, tmp_path / "q", QuantConfig(bits=4, group_size=32))
    with safe_open(source / "model.safetensors", "pt") as f:
        saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
    ours = load_file(tmp_path / "q" / "model.safetensors")
    expert_keys = [key for key in saved if ".experts." in key]
    assert len(expert_keys) == 4 * 3 * MOE_LAYERS[family]
    for e in range(4):
        for w in MATRICES[family]:
            assert f"{EXPERT_KEY[family].format(e=e, w=w)}.weight" in saved
    for key in expert_keys:
        module = key.removesuffix(".weight")
        out_features, in_features = saved[key]
        assert key not in ours
        assert ours[f"{module}.weight_packed"].shape == (out_features, in_features // 8)
        assert ours[f"{module}.weight_packed"].dtype == torch.int32
        assert ours[f"{module}.weight_scale"].shape == (out_features, in_features // 32)
        assert ours[f"{module}.weight_shape"].tolist() == [out_features, in_features]
        assert ours[f"{module}.weight_zero_point"].shape == (out_features // 8, in_features // 32)
    assert all(tensor.ndim <= 2 for tensor in ours.values())  # no fused 3-D experts on disk
    # routers: float, bit for bit the source's, listed in `ignore` under their saved names
    original = load_file(source / "model.safetensors")
    for router in ROUTERS[family]:
        assert torch.equal(ours[f"{router}.weight"], original[f"{router}.weight"])
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert quant["ignore"] == sorted(["lm_head", *ROUTERS[family]])
    assert quant["config_groups"]["group_0"]["targets"] == ["Linear"]
    # every saved tensor name is the source's, module for module
    modules = {key.rpartition(".")[0] for key in ours}
    assert modules == {key.rpartition(".")[0] for key in saved}


def test_a_fused_source_is_written_per_expert(moe_source, tmp_path):
    """A source holding the experts as the model's fused 3-D parameters (the names of the
    model's state dict) is quantized into the same per-expert checkpoint."""
    source = moe_source("mixtral")
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file(build("mixtral").state_dict(), fused / "model.safetensors", {"format": "pt"})
    shutil.copyfile(source / "config.json", fused / "config.json")
    config = QuantConfig(bits=4, group_size=32)
    quantize(source, tmp_path / "a", config)
    quantize(fused, tmp_path / "b", config)
    a, b = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_transformers_loads_a_symmetric_checkpoint_by_dequantizing_the_experts(
    moe_source, tmp_path
):
    """transformers' compressed-tensors integration reads the per-expert tensors and fuses
    them, dequantized, into its float experts (no memory saved): same logits as quantcli."""
    source = moe_source("qwen3_moe")
    quantize(source, tmp_path / "q", QuantConfig(bits=4, scheme="sym", group_size=32))
    theirs, info = AutoModelForCausalLM.from_pretrained(tmp_path / "q", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert theirs.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    assert torch.allclose(run(loaded), run(theirs.eval()), rtol=0, atol=1e-5)


@pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason="transformers 5.24 + compressed-tensors 0.20 refuse asymmetric packed checkpoints: "
    "the attention zero points are size mismatches (llm-compressor#1618, as for dense models "
    "in test_oracle), and transformers' expert dequantization (CompressedTensorsDequantize "
    "in integrations/compressed_tensors.py) rebuilds each expert from weight_packed, "
    "weight_scale and weight_shape only, without its zero point ('Asymmetric quant requires "
    "zero-point values'); both are reported as conversion errors. "
    "This test starts passing when upstream fixes it.",
)
def test_transformers_loads_asymmetric_expert_checkpoints(moe_source, tmp_path):
    source = moe_source("mixtral")
    quantize(source, tmp_path / "q", QuantConfig(bits=4, group_size=32))  # asymmetric
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    assert torch.allclose(run(loaded), run(theirs), rtol=0, atol=1e-5)


def test_cli_quantize_inspect_load_generate_eval_on_moe(moe_source, tmp_path):
    source = moe_source("mixtral")
    out = tmp_path / "q"
    result = run_quantcli("quantize", source, "--out", out, "--bits", "4")
    assert result.returncode == 0, result.stderr
    inspect = run_quantcli("inspect", out, "--json")
    assert inspect.returncode == 0, inspect.stderr
    layers = json.loads(inspect.stdout)["layers"]
    experts = [layer for layer in layers if ".experts." in layer["name"]]
    assert len(experts) == 24 and all(layer["kind"] == "int4" for layer in experts)
    routers = [layer for layer in layers if layer["name"].endswith("block_sparse_moe.gate")]
    assert len(routers) == 2 and all(layer["kind"] == "float" for layer in routers)
    # dense int4 asym g32 runs in vLLM for CPU; its MoE kernel refuses it (make test-vllm)
    assert json.loads(inspect.stdout)["runs_in"]["vLLM (CPU)"] == {
        "runs": False,
        "why": "its CPU MoE kernel takes symmetric int4 in groups other than 32 only "
        "(make test-vllm)",
    }
    against = run_quantcli("inspect", out, "--against", source, "--json")
    assert against.returncode == 0, against.stderr
    errors = json.loads(against.stdout)["layer_errors"]
    assert sum(".experts." in error["name"] for error in errors) == 24
    assert all(0 < error["relative_error"] < 0.2 for error in errors)
    loaded = run_quantcli("load", out)
    assert loaded.returncode == 0, loaded.stderr
    generated = run_quantcli("generate", out, "abc", "--max-new-tokens", "4", "--json")
    assert generated.returncode == 0, generated.stderr
    assert json.loads(generated.stdout)["new_tokens"] == 4
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    scored = run_quantcli(
        "eval", out, "--baseline", source, "--text", text, "--window", "32", "--json"
    )
    assert scored.returncode == 0, scored.stderr


def test_quantize_reads_each_expert_alone_and_never_builds_the_float_model(
    moe_source, tmp_path, monkeypatch
):
    """Streaming: the model is a skeleton on meta throughout (its fused experts never hold
    data), and each source expert is read and quantized as its own 2-D tensor."""
    import quantcli.models.streaming as streaming

    reads = []
    original = streaming.read_tensor

    def spy(info):
        tensor = original(info)
        reads.append((info.name, tuple(tensor.shape)))
        return tensor

    monkeypatch.setattr(streaming, "read_tensor", spy)
    skeletons = []
    build_skeleton = streaming.build_skeleton

    def keep(*args, **kwargs):
        skeletons.append(build_skeleton(*args, **kwargs))
        return skeletons[-1]

    monkeypatch.setattr(streaming, "build_skeleton", keep)
    quantized = []
    quantize_weight = streaming.quantize_weight

    def record(weight, *args):
        quantized.append(tuple(weight.shape))
        return quantize_weight(weight, *args)

    monkeypatch.setattr(streaming, "quantize_weight", record)
    quantize(moe_source("olmoe"), tmp_path / "q", QuantConfig(bits=4))
    (skeleton,) = skeletons
    assert all(p.is_meta for p in skeleton.parameters())  # the fused experts never got data
    assert len(quantized) == 8 + 24 and all(len(shape) == 2 for shape in quantized)
    expert_reads = [shape for name, shape in reads if ".experts." in name]
    assert len(expert_reads) == 24 and all(len(shape) == 2 for shape in expert_reads)


# --- refusals: one line, exit 4, nothing written ----------------------------------------


def edited_copy(source, out, **config_changes):
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_experts_the_config_does_not_describe_are_refused(moe_source, tmp_path):
    bad = edited_copy(moe_source("mixtral"), tmp_path / "bad", num_local_experts=3)
    result = run_quantcli("quantize", bad, "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "block_sparse_moe.experts.3.w1.weight")
    assert not (tmp_path / "q").exists()


def test_expert_shapes_the_config_does_not_describe_are_refused(moe_source, tmp_path):
    bad = edited_copy(moe_source("qwen3_moe"), tmp_path / "bad", moe_intermediate_size=32)
    result = run_quantcli("quantize", bad, "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "mlp.experts.0.")
    assert not (tmp_path / "q").exists()


def test_a_quantized_checkpoint_whose_experts_disagree_with_its_config_is_refused(
    moe_source, tmp_path
):
    quantize(moe_source("mixtral"), tmp_path / "q", QuantConfig(bits=4))
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["num_local_experts"] = 3
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    result = run_quantcli("load", tmp_path / "q")
    assert_one_line_error(result, 4, "experts.3.w1.weight_packed")
    with pytest.raises(CheckpointError):
        load_quantized(resolve_model(str(tmp_path / "q")))


def test_a_quantized_checkpoint_missing_an_expert_is_refused(moe_source, tmp_path):
    quantize(moe_source("qwen3_moe"), tmp_path / "q", QuantConfig(bits=4))
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    gone = [k for k in tensors if k.startswith("model.layers.1.mlp.experts.2.up_proj.")]
    assert len(gone) == 4
    for key in gone:
        del tensors[key]
    save_file(tensors, tmp_path / "q" / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.experts\.gate_up_proj"):
        load_quantized(resolve_model(str(tmp_path / "q")))


def gpt_oss(tmp_path):
    from transformers import GptOssConfig

    config = GptOssConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt-oss")
    return tmp_path / "gpt-oss"


def test_an_expert_layout_quantcli_does_not_know_is_refused(tmp_path):
    """GPT-OSS keeps its experts transposed, with biases and its own gating: refused by
    name, never quantized with the experts silently left in float."""
    result = run_quantcli("quantize", gpt_oss(tmp_path), "--out", tmp_path / "q")
    assert_one_line_error(result, 4, "model.layers.0.mlp.experts (GptOssExperts)")
    assert "expert layout" in result.stderr
    assert not (tmp_path / "q").exists()


def test_a_router_quantcli_does_not_know_is_refused():
    class Block(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.experts = model.model.layers[0].mlp.experts
            self.gate = torch.nn.Module()
            self.gate.weight = torch.nn.Parameter(torch.empty(4, 64, 2))

    model = build("mixtral")
    with pytest.raises(CheckpointError, match=r"router block\.gate .*does not know"):
        plan_experts(torch.nn.ModuleDict({"block": Block(model)}))


def test_excluded_experts_stay_float_and_load(moe_source, tmp_path):
    source = moe_source("qwen3_moe")
    config = QuantConfig(bits=4, exclude=("re:.*experts.*",))
    summary = quantize(source, tmp_path / "q", config)
    assert not any(".experts." in name for name in summary.quantized)
    ours = load_file(tmp_path / "q" / "model.safetensors")
    original = load_file(source / "model.safetensors")
    expert_keys = [key for key in original if ".experts." in key]
    assert all(torch.equal(ours[key], original[key]) for key in expert_keys)
    quant = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {key.removesuffix(".weight") for key in expert_keys} <= set(quant["ignore"])
    loaded, report = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    assert not any(isinstance(m, QuantExperts) for m in loaded.modules())
    reference = decompressed_reference(source, tmp_path / "q", tmp_path / "ref")
    assert torch.allclose(run(loaded), run(reference), rtol=0, atol=1e-5)


def test_excluding_some_experts_of_a_layer_is_refused(moe_source, tmp_path):
    config = QuantConfig(bits=4, exclude=("re:.*experts\\.0\\..*",))
    with pytest.raises(UsageError, match="some experts"):
        quantize(moe_source("qwen3_moe"), tmp_path / "q", config)
    assert not (tmp_path / "q").exists()


def test_a_group_size_that_does_not_divide_the_experts_is_refused_with_the_sizes_that_fit(
    tmp_path,
):
    """Experts 48 wide (attention and routers 64): groups of 32 would leave the experts'
    down_proj with a partial group. The sizes offered fit every layer, experts included:
    the divisors of gcd(64, 48) = 16 from 8 up."""
    config = MOE_CONFIGS["qwen3_moe"]()
    config.moe_intermediate_size = 48
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    with pytest.raises(UsageError) as refused:
        quantize(tmp_path / "src", tmp_path / "q", QuantConfig(bits=4, group_size=32))
    assert str(refused.value) == (
        "--group-size 32 does not divide the input width of 2 layer(s) "
        "(model.layers.0.mlp.experts.down_proj: 48); group sizes that fit every layer: 8, 16."
    )
    assert not (tmp_path / "q").exists()
    quantize(tmp_path / "src", tmp_path / "q", QuantConfig(bits=4, group_size=16))


def test_sharded_moe_source_and_output(moe_source, tmp_path):
    source = tmp_path / "sharded"
    build("qwen2_moe").save_pretrained(source, max_shard_size="100KB")
    assert (source / "model.safetensors.index.json").is_file()
    summary = quantize_checkpoint(
        resolve_model(str(source)), tmp_path / "q", QuantConfig(bits=8), max_shard_size=30_000
    )
    assert summary.shards > 1
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    modules = {}
    for name, shard in index["weight_map"].items():
        modules.setdefault(name.rpartition(".")[0], set()).add(shard)
    assert all(len(files) == 1 for files in modules.values())  # an expert never straddles
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    unsharded = tmp_path / "q1"
    quantize(moe_source("qwen2_moe"), unsharded, QuantConfig(bits=8))
    reference, _ = load_quantized(resolve_model(str(unsharded)), dtype=None)
    assert torch.equal(run(loaded), run(reference))


def test_bf16_load_keeps_scales_in_the_asked_dtype(moe_source, tmp_path):
    quantize(moe_source("mixtral"), tmp_path / "q", QuantConfig(bits=4))
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=torch.bfloat16)
    experts = loaded.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts)
    assert experts.gate_up_proj_scale.dtype == torch.bfloat16
    reference, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    ours, theirs = run(loaded).float(), run(reference)
    assert ours.dtype == torch.float32 and (ours - theirs).abs().max() < 0.05


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"is_concatenated": False}, "interleaved"),
        ({"is_transposed": True}, "transposed"),
        ({"has_bias": True}, "biased"),
    ],
)
def test_experts_flagged_otherwise_by_transformers_are_refused(change, problem):
    model = build("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    for attribute, value in change.items():
        setattr(experts, attribute, value)
    with pytest.raises(CheckpointError, match=f"layers.1.mlp.experts .*{problem}"):
        plan_experts(model)


def test_a_norm_beside_the_experts_is_neither_router_nor_refused():
    model = build("olmoe")
    model.model.layers[0].mlp.norm = torch.nn.LayerNorm(64)
    plan = plan_experts(model)
    assert plan.routers == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert plan.experts == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_excluding_the_experts_module_by_its_model_name_keeps_all_its_experts_float(
    moe_source, tmp_path
):
    config = QuantConfig(bits=4, exclude=("model.layers.0.mlp.experts",))
    summary = quantize(moe_source("mixtral"), tmp_path / "q", config)
    assert not any(
        n.startswith("model.layers.0.block_sparse_moe.experts") for n in summary.quantized
    )
    assert sum(".experts." in n for n in summary.quantized) == 12  # layer 1's
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    assert not isinstance(loaded.model.layers[0].mlp.experts, QuantExperts)
    assert isinstance(loaded.model.layers[1].mlp.experts, QuantExperts)
