"""`--quantize-head` on models whose head is tied to the input embeddings.

Tied heads are the norm for small models (SmolLM2, Llama 3.2 1B/3B, Qwen2.5 up to 3B,
OPT, GPT-2, BERT). The output unties them: the embeddings stay float, bit for bit the
source's, the head is quantized from the same table, and config.json says
``tie_word_embeddings: false`` so every loader builds a head of its own.

References that are not quantcli's code: the source's bytes (read with safetensors),
compressed-tensors' `unpack_from_int32` and its dequantization formula for the head, and
transformers' own loading of the checkpoint (with compressed-tensors).
"""

import json
import re

import pytest
import torch
from cli_checks import assert_one_line_error, run_quantcli
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from ct_reference import ct_dequantized
from safetensors.torch import load_file
from tiny_models import char_tokenizer, sample_inputs
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig

from quantcli import QuantConfig
from quantcli.models.loading import load_quantized
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

HEADS = {  # arch: (head module, input embeddings, auto class)
    "llama-tied": ("lm_head", "model.embed_tokens", AutoModelForCausalLM),
    "opt": ("lm_head", "model.decoder.embed_tokens", AutoModelForCausalLM),
    "gpt2": ("lm_head", "transformer.wte", AutoModelForCausalLM),
    "bert": ("cls.predictions.decoder", "bert.embeddings.word_embeddings", AutoModelForMaskedLM),
}


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A SmolLM2-shaped Llama: head tied to the embeddings."""
    folder = tmp_path_factory.mktemp("llama-tied")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def source_of(arch, saved_models, tied_llama):
    return tied_llama if arch == "llama-tied" else saved_models(arch)


def head_only(head: str, bits: int, scheme: str) -> QuantConfig:
    """Only the head quantized: every other linear excluded, so logits isolate it."""
    exclude = (f"re:(?!{re.escape(head)}$)",)
    return QuantConfig(bits=bits, scheme=scheme, quantize_head=True, exclude=exclude)


@pytest.mark.parametrize("arch", HEADS)
def test_the_sources_really_tie_their_heads(arch, saved_models, tied_llama):
    head, embeddings, auto = HEADS[arch]
    model = auto.from_pretrained(source_of(arch, saved_models, tied_llama))
    assert model.get_submodule(head).weight is model.get_submodule(embeddings).weight
    assert f"{head}.weight" not in load_file(
        source_of(arch, saved_models, tied_llama) / "model.safetensors"
    )


@pytest.mark.parametrize("bits,scheme", [(8, "sym"), (4, "sym"), (4, "asym")])
@pytest.mark.parametrize("arch", HEADS)
def test_a_tied_head_is_quantized_from_the_embeddings_and_the_output_unties_it(
    arch, bits, scheme, saved_models, tied_llama, tmp_path
):
    head, embeddings, auto = HEADS[arch]
    source = source_of(arch, saved_models, tied_llama)
    out = tmp_path / "q"
    summary = quantize_checkpoint(resolve_model(str(source)), out, head_only(head, bits, scheme))
    assert summary.quantized == [head]

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["ignore"] == sorted(summary.skipped)
    # by name: vLLM's head is a ParallelLMHead, which the class name "Linear" misses
    assert config["quantization_config"]["config_groups"]["group_0"]["targets"] == [
        "Linear",
        head,
    ]
    files, original = load_file(out / "model.safetensors"), load_file(source / "model.safetensors")
    table = original[f"{embeddings}.weight"]
    assert torch.equal(files[f"{embeddings}.weight"], table)  # the lookup stays exact

    # the head by compressed-tensors' unpacking and formula: within half a step of the table
    packed = files[f"{head}.weight_packed"]
    codes = unpack_from_int32(packed, bits, torch.Size(table.shape)).float()
    scale = files[f"{head}.weight_scale"].float()
    zero = files.get(f"{head}.weight_zero_point")
    if zero is not None:
        zero = unpack_from_int32(zero, bits, torch.Size(scale.shape), packed_dim=0).float()
    step = scale.repeat_interleave(table.shape[1] // scale.shape[1], dim=1)
    zero = 0 if zero is None else zero.repeat_interleave(table.shape[1] // scale.shape[1], dim=1)
    dequantized = step * (codes - zero)
    error = (dequantized - table.float()).abs()
    # half a step, plus float32 rounding of scale * code (relative 2^-24, with margin)
    assert (error <= step / 2 * (1 + 2**-20)).all()
    assert error.max() > step.max() / 8  # really rounded: not a float copy

    # quantcli's logits are the float model's with that head (only the head is quantized)
    reference = auto.from_pretrained(source).eval()
    reference.get_submodule(head).weight = torch.nn.Parameter(dequantized)  # unties it
    ours, _ = load_quantized(resolve_model(str(out)), dtype=torch.float32)
    inputs = sample_inputs("llama")
    with torch.no_grad():
        expected, got = reference(**inputs).logits, ours(**inputs).logits
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(got, auto.from_pretrained(source)(**inputs).logits, atol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_transformers_loads_the_untied_quantized_head_with_the_same_logits(
    bits, tied_llama, tmp_path
):
    """The oracle: transformers, with compressed-tensors, reads the untied checkpoint."""
    out = tmp_path / "q"
    quantize_checkpoint(
        resolve_model(str(tied_llama)),
        out,
        QuantConfig(bits=bits, scheme="sym", quantize_head=True),
    )
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ours, _ = load_quantized(resolve_model(str(out)), dtype=torch.float32)
    assert hasattr(theirs.lm_head, "weight_scale")  # quantized, not the embeddings
    ids = sample_inputs("llama")["input_ids"]
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)


def test_a_model_that_always_ties_its_head_is_refused_with_nothing_written(saved_models, tmp_path):
    """T5's config ties the head whatever tie_word_embeddings says (and reads the field as
    another switch): an untied output would load tied, so quantize refuses up front."""
    out = tmp_path / "q"
    result = run_quantcli("quantize", str(saved_models("t5")), "--out", str(out), "--quantize-head")
    assert_one_line_error(result, 2, "its config ties lm_head.weight to the embeddings")
    assert not out.exists() and not any(tmp_path.iterdir())


EMBEDDING_SCHEMES = {
    "int8": QuantConfig(bits=8),
    "int4-sym-g32": QuantConfig(bits=4, scheme="sym"),
    "int4-asym-g32": QuantConfig(bits=4),
    "int2-asym-channel": QuantConfig(bits=2, granularity="channel"),
    "int4-asym-tensor": QuantConfig(bits=4, granularity="tensor"),
}


@pytest.mark.parametrize("scheme", EMBEDDING_SCHEMES)
def test_a_shared_quantized_table_serves_lookup_and_head(scheme, tied_llama, tmp_path):
    """--quantize-embeddings on a tied model: one quantized table on disk (no head
    tensors), the config still tied; quantcli's logits are those of the float model whose
    shared table is compressed-tensors' dequantization of the files."""
    base = EMBEDDING_SCHEMES[scheme]
    config = QuantConfig(**{**base.__dict__, "quantize_embeddings": True, "exclude": ("re:.*",)})
    out = tmp_path / "q"
    summary = quantize_checkpoint(resolve_model(str(tied_llama)), out, config)
    assert summary.quantized == ["model.embed_tokens"]
    written = json.loads((out / "config.json").read_text())
    assert written["tie_word_embeddings"] is True
    assert written["quantization_config"]["config_groups"]["group_0"]["targets"] == [
        "Linear",
        "Embedding",
    ]
    files = load_file(out / "model.safetensors")
    assert not [key for key in files if key.startswith("lm_head")]
    assert "model.embed_tokens.weight" not in files

    table = load_file(tied_llama / "model.safetensors")["model.embed_tokens.weight"]
    dequantized = ct_dequantized(files, "model.embed_tokens", base.bits, table.shape)
    reference = AutoModelForCausalLM.from_pretrained(tied_llama).eval()
    reference.model.embed_tokens.weight.data = dequantized  # the head too: tied
    ours, _ = load_quantized(resolve_model(str(out)), dtype=torch.float32)
    assert ours.lm_head.table is ours.model.embed_tokens
    ids = sample_inputs("llama")["input_ids"]
    with torch.no_grad():
        expected, got = reference(ids).logits, ours(ids).logits
        # the lookup alone: exactly the dequantized rows (same float32 arithmetic)
        assert torch.equal(ours.model.embed_tokens(ids), dequantized[ids])
    # rounding of the head matmul only (fp32, 64 terms): far below one quantization step
    assert torch.allclose(got, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert not torch.allclose(got, AutoModelForCausalLM.from_pretrained(tied_llama)(ids).logits)


def test_on_an_untied_model_only_the_lookup_table_is_quantized(saved_models, tmp_path):
    source = saved_models("llama")  # its head is a separate float matrix
    out = tmp_path / "q"
    config = QuantConfig(bits=4, scheme="sym", quantize_embeddings=True)
    quantize_checkpoint(resolve_model(str(source)), out, config)
    files = load_file(out / "model.safetensors")
    original = load_file(source / "model.safetensors")
    assert torch.equal(files["lm_head.weight"], original["lm_head.weight"])
    assert "model.embed_tokens.weight_packed" in files
    ours, _ = load_quantized(resolve_model(str(out)), dtype=torch.float32)
    ids = sample_inputs("llama")["input_ids"]
    table = ct_dequantized(
        files, "model.embed_tokens", 4, original["model.embed_tokens.weight"].shape
    )
    assert torch.equal(ours.model.embed_tokens(ids), table[ids])
    assert type(ours.lm_head) is torch.nn.Linear


@pytest.mark.parametrize(
    "arch,message",
    [
        ("t5", "encoder.embed_tokens reuses the table of shared"),
        (
            "bert",
            "the head cls.predictions.decoder, tied to bert.embeddings.word_embeddings, has a bias",
        ),
    ],
)
def test_tables_one_quantized_copy_cannot_serve_are_refused(arch, message, saved_models, tmp_path):
    out = tmp_path / "q"
    result = run_quantcli(
        "quantize", str(saved_models(arch)), "--out", str(out), "--quantize-embeddings"
    )
    assert_one_line_error(result, 2, message)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("tied", [True, False], ids=["shared-table", "untied"])
def test_transformers_refuses_quantized_embeddings(tied, tied_llama, saved_models, tmp_path):
    """Measured upstream limit (transformers 5.24, compressed-tensors 0.20): its loader
    reads ``embed_tokens.weight`` (to tie the head, or to initialize the table), which a
    quantized table does not have. The card and `inspect` say so; this test fails when
    upstream starts loading it."""
    out = tmp_path / "q"
    config = QuantConfig(bits=4, scheme="sym", quantize_embeddings=True)
    source = tied_llama if tied else saved_models("llama")
    quantize_checkpoint(resolve_model(str(source)), out, config)
    with pytest.raises(AttributeError, match="has no attribute .?weight"):
        AutoModelForCausalLM.from_pretrained(out)
