"""`KeyLayout`: checkpoint keys and model keys through transformers' own conversion mapping."""

from __future__ import annotations

import pytest
import torch
from tiny_models import AUTO_CLASS, CONFIGS, MOE_CONFIGS
from transformers import AutoModelForCausalLM, ViTConfig, ViTForImageClassification
from transformers.core_model_loading import Chunk, WeightConverter

from quantcli import QuantConfig, replace_linear_layers
from quantcli.models.keys import KeyLayout, Slot, UnknownLayoutError
from quantcli.models.loading import load_quantized
from quantcli.models.skeleton import build_skeleton
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint


def skeleton(family: str):
    """The meta skeleton of a tiny model, built the way quantize builds it."""
    config = (CONFIGS.get(family) or MOE_CONFIGS[family])()
    auto = AUTO_CLASS.get(family, AutoModelForCausalLM)
    config.architectures = [auto._model_mapping[type(config)].__name__]
    return build_skeleton(config)


def vit_config() -> ViTConfig:
    return ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
        num_labels=3,
        architectures=["ViTForImageClassification"],
    )


def test_mixtral_experts_and_router_map_both_ways():
    layout = KeyLayout(skeleton("mixtral"))
    assert layout.slot("model.layers.0.block_sparse_moe.experts.3.w3.weight") == Slot(
        "model.layers.0.mlp.experts.gate_up_proj", expert=3, part=1, parts=2
    )
    assert layout.slot("model.layers.1.block_sparse_moe.experts.2.w2.weight") == Slot(
        "model.layers.1.mlp.experts.down_proj", expert=2, part=0, parts=1
    )
    assert layout.slot("model.layers.0.block_sparse_moe.gate.weight").key == (
        "model.layers.0.mlp.gate.weight"
    )
    assert layout.saved_module("model.layers.0.mlp.gate") == "model.layers.0.block_sparse_moe.gate"
    assert layout.saved["model.layers.0.block_sparse_moe.experts.0.w1.weight"] == (64, 64)


@pytest.mark.parametrize("family", [*CONFIGS, *MOE_CONFIGS])
def test_saved_keys_cover_every_model_tensor_once(family):
    layout = KeyLayout(skeleton(family))
    slots = layout.saved_slots.values()
    plain = {slot.key for slot in slots if not slot.stacked}
    stacked = {slot.key for slot in slots if slot.stacked}
    assert plain | stacked == set(layout.expected)
    for key in stacked:  # every expert and every row block of a stacked parameter
        experts, rows, cols = layout.expected[key].shape
        blocks = [s for s in slots if s.key == key]
        assert len(blocks) == experts * blocks[0].parts
        assert {s.expert for s in blocks} == set(range(experts))


def test_base_model_checkpoint_keys_gain_the_prefix():
    layout = KeyLayout(skeleton("llama"))
    assert layout.slot("layers.0.self_attn.q_proj.weight").key == (
        "model.layers.0.self_attn.q_proj.weight"
    )


def test_legacy_renames_map_both_ways_for_vit():
    """ViT checkpoints keep the legacy names (``encoder.layer.N.attention.attention.query``)
    that transformers 5 renames on load and back on save."""
    layout = KeyLayout(build_skeleton(vit_config()))
    slot = layout.slot("vit.encoder.layer.1.attention.attention.query.weight")
    assert slot == Slot("vit.layers.1.attention.q_proj.weight")
    assert layout.saved_module("vit.layers.1.mlp.fc2") == "vit.encoder.layer.1.output.dense"


def test_renamed_layers_are_written_under_their_saved_names_and_load_back(tmp_path):
    torch.manual_seed(0)
    model = ViTForImageClassification(vit_config()).eval()
    model.save_pretrained(tmp_path / "vit")
    summary = quantize_checkpoint(
        resolve_model(str(tmp_path / "vit")), tmp_path / "q", QuantConfig(bits=8)
    )
    assert "vit.encoder.layer.0.attention.attention.query" in summary.quantized
    loaded, _ = load_quantized(resolve_model(str(tmp_path / "q")), dtype=None)
    replace_linear_layers(model, QuantConfig(bits=8))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits)


def test_a_conversion_quantcli_does_not_know_is_refused_by_name():
    layout = KeyLayout(skeleton("llama"))
    layout._converters = [
        WeightConverter(
            "mlp.weights_in.weight",
            ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
            operations=[Chunk(dim=0)],
        )
    ]
    with pytest.raises(UnknownLayoutError, match=r"model\.layers\.0\.mlp\.weights_in.*Chunk"):
        layout.slot("model.layers.0.mlp.weights_in.weight")
