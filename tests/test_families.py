"""Every family transformers ships for causal LM, seq2seq, masked LM, image and audio
classification, as a tiny random model: quantized (int8, int4 sym g32), loaded back by
quantcli, and compared with the float model whose quantized layers hold their dequantized
weights. That dense model is what `QuantLinear` computes exactly (it is F.linear with the
dequantized weight, ``test_qlinear``), in the same float32 order, so the bound is equality:
any difference is a layer loaded wrong, a buffer rebuilt differently or a tensor lost.

A family either passes or is refused before anything is written, with one line and exit 4.
The table in docs/generated/families.md comes from the same code (scripts/family_matrix.py).
"""

import copy
import json

import families as F
import pytest
import torch
from cli_checks import run_main

from quantcli import QuantConfig
from quantcli.models.generation import generate_text, load_tokenizer
from quantcli.models.loading import load_quantized
from quantcli.models.replace import plan_replacement
from quantcli.models.skeleton import build_skeleton
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

FAMILIES = F.families()
BY_TYPE = {family.model_type: family for family in FAMILIES}
#: The matrix's floor: families passing both schemes (measured: see the docs table).
MIN_PASSING = 40


@pytest.fixture(scope="session")
def matrix(tmp_path_factory):
    """Each family's outcomes per scheme (or why it is left out), computed once."""
    root = tmp_path_factory.mktemp("families")
    cache: dict[str, dict] = {}

    def outcomes(model_type: str) -> dict:
        if model_type not in cache:
            family = BY_TYPE[model_type]
            with F.quiet():
                model, folder = F.prepare(family, root)
                if model is None:
                    cache[model_type] = dict.fromkeys(F.SCHEMES, folder)
                else:
                    cache[model_type] = {s: F.run(family, model, folder, s) for s in F.SCHEMES}
        return cache[model_type]

    return outcomes


@pytest.mark.parametrize("scheme", list(F.SCHEMES))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.model_type)
def test_family_passes_or_is_refused_up_front(family, scheme, matrix):
    outcome = matrix(family.model_type)[scheme]
    if isinstance(outcome, str):
        pytest.skip(outcome.removeprefix("skipped: "))
    known = F.KNOWN_FAILURES.get(family.model_type)
    if known and not outcome.quantcli.startswith(("pass", "refused")):
        pytest.xfail(known)
    if outcome.quantcli.startswith("refused"):
        assert outcome.detail["exit"] == 4, outcome.quantcli
        assert not outcome.detail["written"]
        assert "\n" not in outcome.quantcli
    else:
        assert outcome.quantcli == "pass", outcome.quantcli
        assert outcome.detail["max_float_diff"] > 0  # the layers were quantized at all
    assert not known, f"{family.model_type} now passes: drop it from KNOWN_FAILURES"


def test_at_least_40_families_pass_both_schemes(matrix):
    passing = [
        family.model_type
        for family in FAMILIES
        if all(
            not isinstance(o, str) and o.quantcli == "pass"
            for o in matrix(family.model_type).values()
        )
    ]
    assert len(passing) >= MIN_PASSING, passing


# --- regressions the matrix found, one test each ------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A family's tiny model saved, and quantized int8 by quantcli: (source, output)."""
    root = tmp_path_factory.mktemp("regressions")
    folders = {}

    def make(model_type: str):
        if model_type not in folders:
            with F.quiet():
                model, src = F.prepare(BY_TYPE[model_type], root)
                out = src.parent / "int8"
                quantize_checkpoint(resolve_model(str(src)), out, QuantConfig(bits=8))
            folders[model_type] = (model, src, out)
        return folders[model_type]

    return make


@pytest.mark.parametrize("model_type", ["t5", "bart", "fsmt"])
def test_seq2seq_generate_returns_transformers_tokens(model_type, quantized, monkeypatch, capsys):
    """On main, generate cut the encoder-decoder's output at the prompt's length: T5 gave
    0 new tokens or the wrong ones; FSMT, whose generation_config asks for beam search,
    refused the streamer (exit 1). Now the tokens equal transformers' greedy generate on
    the same quantized model, in the library and through the CLI."""
    _, _, out = quantized(model_type)
    loaded, _ = load_quantized(resolve_model(str(out)), dtype=None)
    tokenizer = load_tokenizer(out)
    prompt = "The quick brown fox"
    result = generate_text(loaded, tokenizer, prompt, max_new_tokens=6, chat=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        theirs = loaded.generate(**inputs, max_new_tokens=6, do_sample=False, num_beams=1)[0]
    assert theirs[0] == loaded.config.decoder_start_token_id
    assert result.new_tokens == theirs.shape[0] - 1 > 0
    assert result.text == tokenizer.decode(theirs[1:], skip_special_tokens=True)
    args = ("generate", out, prompt, "--no-chat", "--max-new-tokens", "6", "--dtype", "fp32")
    cli = run_main(monkeypatch, capsys, *args, "--json")
    assert cli.returncode in (0, None), cli.stderr
    assert json.loads(cli.stdout)["text"] == result.text


@pytest.mark.parametrize(
    ("model_type", "kind"),
    [("siglip", "images"), ("wav2vec2", "audio"), ("whisper", "audio features")],
)
def test_generate_refuses_models_that_take_no_text(
    model_type, kind, quantized, monkeypatch, capsys
):
    """On main: exit 4 (no tokenizer) or 1 (Whisper). Now one line, exit 2, for the
    quantized checkpoint and for the float folder alike."""
    _, src, out = quantized(model_type)
    for folder in (out, src):
        result = run_main(monkeypatch, capsys, "generate", folder, "hello")
        assert result.returncode == 2, result.stderr
        [line] = result.stderr.strip().splitlines()
        assert f"takes {kind}, not a text prompt" in line


@pytest.mark.parametrize("model_type", ["whisper", "siglip", "wav2vec2", "t5"])
def test_cli_load_runs_a_forward_pass_with_the_models_own_input(
    model_type, quantized, monkeypatch, capsys
):
    """On main `quantcli load` fed token ids to every model: Whisper exited 1."""
    _, _, out = quantized(model_type)
    result = run_main(monkeypatch, capsys, "load", out)
    assert result.returncode in (0, None), result.stderr
    assert "finite outputs" in result.stdout + result.stderr


def test_families_whose_keys_transformers_renames_are_written_under_the_saved_names(
    tmp_path, monkeypatch, capsys
):
    """ViT: transformers renames its keys when loading; quantcli once said "the weights and
    the config disagree" about a checkpoint transformers itself wrote. Through
    transformers' own mapping (quantcli/models/keys.py) it quantizes, under the module
    names transformers saves (the matrix compares its logits)."""
    from safetensors import safe_open

    with F.quiet():
        _, src = F.prepare(BY_TYPE["vit"], tmp_path)
    out = tmp_path / "q"
    result = run_main(monkeypatch, capsys, "quantize", src, "--out", out)
    assert result.returncode in (0, None), result.stderr

    def modules(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {key.rpartition(".")[0] for key in f.keys()}  # noqa: SIM118

    assert modules(out) == modules(src)
    assert any(".attention.attention.query" in name for name in modules(out))  # legacy names


def test_marian_positions_that_transformers_never_saves_are_computed_at_load(quantized):
    """Marian's sinusoidal positions are parameters left out of every checkpoint
    (_keys_to_ignore_on_save): load refused the checkpoint as incomplete (exit 4)."""
    model, _, out = quantized("marian")
    loaded, _ = load_quantized(resolve_model(str(out)), dtype=None)
    for side in ("encoder", "decoder"):
        ours = getattr(loaded.model, side).embed_positions.weight
        assert torch.equal(ours, getattr(model.model, side).embed_positions.weight)


def test_families_that_reuse_another_familys_class_build():
    """exaone, internlm3, iquestcoder: transformers maps them to LlamaForCausalLM, whose
    config class is Llama's; quantcli refused them as a config that contradicts itself."""
    config = F.tiny_config(BY_TYPE["internlm3"])
    assert config.architectures == ["LlamaForCausalLM"] and config.model_type == "internlm3"
    assert type(build_skeleton(config)).__name__ == "LlamaForCausalLM"


def test_a_linear_tied_to_embeddings_stays_float():
    """LUKE's entity head is its entity embeddings: quantize looked for the head's own
    weight in the checkpoint and refused it ("has no tensor entity_predictions...")."""
    with F.quiet():
        model = F.build(BY_TYPE["luke"])
    report = plan_replacement(copy.deepcopy(model), QuantConfig(bits=8))
    reason = report.skipped["entity_predictions.decoder"]
    assert (
        reason == "weight tied to luke.entity_embeddings.entity_embeddings.weight (kept in float)"
    )


@pytest.mark.parametrize(
    ("model_type", "layer", "reader"),
    [
        ("mobilebert", "cls.predictions.dense", "MobileBertLMPredictionHead"),
        ("wavlm", "wavlm.encoder.layers.0.attention.q_proj", "WavLMAttention"),
        ("rwkv", "rwkv.blocks.1.attention.output", "RwkvModel"),
    ],
)
def test_linears_whose_weight_the_model_reads_itself_stay_float(model_type, layer, reader):
    """MobileBERT's head multiplies by ``self.dense.weight``, WavLM's attention passes its
    projections' weights to F.multi_head_attention_forward, RWKV rescales its output
    layers' weights in place: quantized, these crashed (exit 1) or gave NaN."""
    with F.quiet():
        model = F.build(BY_TYPE[model_type])
    report = plan_replacement(model, QuantConfig(bits=8))
    assert report.skipped[layer] == f"{reader} reads its float weight directly"


@pytest.mark.parametrize(
    ("model_type", "kind"), [("siglip", "images"), ("whisper", "audio features")]
)
def test_eval_refuses_models_that_take_no_text(model_type, kind, quantized, monkeypatch, capsys):
    """On main: exit 4 "no usable tokenizer" (SigLIP) or exit 2 "the text has fewer than 2
    tokens" (Whisper), neither the reason. Now the same line as generate's, exit 2."""
    _, src, out = quantized(model_type)
    result = run_main(monkeypatch, capsys, "eval", out, "--baseline", src)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"takes {kind}, not a text prompt: eval works with text models only" in line
