"""replace_linear_layers on tiny random OPT, Llama, GPT-2, BERT and T5 models."""

import copy

import pytest
import torch
from tiny_models import AUTO_CLASS, CONFIGS, build, logits
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantcli import QuantConfig, QuantLinear, replace_linear_layers
from quantcli.errors import InvalidTensorError
from quantcli.models.replace import linear_weight

ARCHS = list(CONFIGS)
HEADS = {
    "opt": "lm_head",
    "llama": "lm_head",
    "gpt2": "lm_head",
    "bert": "cls.predictions.decoder",
    "t5": "lm_head",
}


def linear_names(model):
    return {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def relative_error(approx, exact):
    return float((approx - exact).norm() / exact.norm())


# A model's logits drift by about as much as its weights do (measured ratios: 0.9 to 1.9,
# the most for T5, whose decoder also reads the perturbed encoder); 2.5 leaves margin.
PROPAGATION = 2.5


def float_weights(model):
    return {
        name: linear_weight(module).detach().clone()
        for name, module in model.named_modules()
        if linear_weight(module) is not None
    }


def weight_error(model, originals, names):
    """Relative error of all quantized weights together, ||W_q - W|| / ||W||."""
    squared = sum(
        float((model.get_submodule(n).dequantize_weight(torch.float32) - originals[n]).norm() ** 2)
        for n in names
    )
    return (squared / sum(float(originals[n].norm() ** 2) for n in names)) ** 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_but_the_head_is_replaced_and_the_model_still_runs(arch):
    model = build(arch)
    reference = logits(model, arch)
    linears = linear_names(model)
    report = replace_linear_layers(model, QuantConfig(bits=8))

    assert set(report.replaced) == linears - {HEADS[arch]}
    assert report.skipped == {
        HEADS[arch]: "output head (kept in float; quantize it with --quantize-head)"
    }
    for name in report.replaced:
        assert isinstance(model.get_submodule(name), QuantLinear)
    assert not isinstance(model.get_submodule(HEADS[arch]), QuantLinear)
    assert not linear_names(model) - {HEADS[arch]}  # nothing float left behind

    quantized = logits(model, arch)
    assert torch.isfinite(quantized).all()
    assert relative_error(quantized, reference) < 0.02


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "config",
    [QuantConfig(bits=8), QuantConfig(bits=4), QuantConfig(bits=2, group_size=16)],
    ids=["int8", "int4-g32", "int2-g16"],
)
def test_logits_drift_no_more_than_the_weights_do(arch, config):
    model = build(arch)
    reference = logits(model, arch)
    originals = float_weights(model)
    report = replace_linear_layers(model, config)
    drift = relative_error(logits(model, arch), reference)
    assert drift < PROPAGATION * weight_error(model, originals, report.replaced)


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_skeleton_takes_the_quantized_state_dict_bit_identically(arch):
    quantized = build(arch)
    config = QuantConfig(bits=4, group_size=32)
    replace_linear_layers(quantized, config)

    with torch.device("meta"):
        skeleton = AUTO_CLASS[arch].from_config(CONFIGS[arch]())
    report = replace_linear_layers(skeleton, config)
    assert all(
        b.is_meta for name in report.replaced for b in skeleton.get_submodule(name).buffers()
    )
    state = quantized.state_dict()
    skeleton.load_state_dict(state, assign=True, strict=False)
    skeleton.tie_weights()
    # non-persistent buffers (rotary tables, position ids) are not in the state_dict
    for name, buffer in quantized.named_buffers():
        if name not in state:
            parent, _, attr = name.rpartition(".")
            skeleton.get_submodule(parent).register_buffer(attr, buffer.clone(), persistent=False)
    skeleton.eval()
    assert not any(t.is_meta for t in list(skeleton.parameters()) + list(skeleton.buffers()))
    assert torch.equal(logits(skeleton, arch), logits(quantized, arch))


def test_gpt2_conv1d_is_quantized_as_its_transpose():
    model = build("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D)
    x = torch.randn(3, conv.weight.shape[0])
    expected = conv(x).detach()
    replace_linear_layers(model, QuantConfig(bits=8))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantLinear)
    assert (layer.out_features, layer.in_features) == (conv.nf, conv.weight.shape[0])
    assert relative_error(layer(x), expected) < 0.01


def test_exclude_patterns_and_quantize_head():
    model = build("llama")
    config = QuantConfig(bits=8, exclude=("*.mlp.*",), quantize_head=True)
    report = replace_linear_layers(model, config)
    assert "lm_head" in report.replaced
    mlp = {name for name in linear_names(build("llama")) if ".mlp." in name}
    assert mlp and set(report.skipped) == mlp
    assert all(reason == "excluded by pattern '*.mlp.*'" for reason in report.skipped.values())


def test_tied_head_is_found_through_the_input_embeddings():
    model = build("gpt2")  # lm_head.weight is wte.weight
    assert model.lm_head.weight is model.transformer.wte.weight
    report = replace_linear_layers(model, QuantConfig(bits=8))
    assert "lm_head" in report.skipped


def test_layers_whose_width_the_group_does_not_divide_stay_float_with_a_reason():
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))
    report = replace_linear_layers(model, QuantConfig(bits=4, group_size=32))
    assert report.replaced == ["0"]
    assert report.skipped == {"2": "in_features=48 is not a multiple of group_size=32"}


def test_nan_weight_is_reported_with_the_layer_name():
    model = build("opt")
    with torch.no_grad():
        model.model.decoder.layers[1].fc1.weight[0, 0] = float("nan")
    expected = r"model\.decoder\.layers\.1\.fc1\.weight: .*1 NaN"
    with pytest.raises(InvalidTensorError, match=expected):
        replace_linear_layers(model, QuantConfig(bits=8))


def test_plain_pytorch_models_work_too():
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    reference = copy.deepcopy(model)
    report = replace_linear_layers(model, QuantConfig(bits=8))
    assert report.replaced == ["0", "2"] and report.skipped == {}
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < 0.01


def test_models_without_input_embeddings_are_walked():
    """Found by the family matrix: vision and audio models raise NotImplementedError from
    get_input_embeddings(), which crashed quantize (exit 1) for 20 families."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], num_labels=4)
    model = ConvNextForImageClassification(config).eval()
    with pytest.raises(NotImplementedError):
        model.get_input_embeddings()
    report = replace_linear_layers(model, QuantConfig(bits=8))
    assert "classifier" in report.replaced
    assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 4)


def test_linears_that_multihead_attention_reads_directly_stay_float():
    """Found by the family matrix (SigLIP's pooling head): nn.MultiheadAttention multiplies
    by ``out_proj.weight`` itself, so a quantized out_proj gave int8 @ float (exit 1)."""
    model = nn.Sequential(nn.Linear(32, 32))
    model.add_module("attn", nn.MultiheadAttention(32, 4, batch_first=True))
    report = replace_linear_layers(model, QuantConfig(bits=8))
    assert report.replaced == ["0"]
    assert report.skipped == {"attn.out_proj": "MultiheadAttention reads its float weight directly"}
    x = torch.randn(1, 5, 32)
    assert model.attn(x, x, x)[0].shape == (1, 5, 32)
