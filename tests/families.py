"""The family matrix: a tiny random model of every family transformers ships for causal LM,
seq2seq, masked LM, image and audio classification, quantized and loaded back by quantcli.

Shared by ``tests/test_families.py`` (which asserts) and ``scripts/family_matrix.py`` (which
also tries transformers' own loader and writes ``docs/generated/families.md``).

Configs are the family's defaults shrunk by one generic table of common attributes
(`SHRINK`), applied recursively to sub-configs, plus `OVERRIDES` only where a family needs
its own fields. Nothing is downloaded and no remote code runs.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto

VOCAB = 128
#: One task per family: the first mapping (in this order) that lists it.
TASKS = {
    "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "speech-seq2seq": "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",  # Whisper: only as below
    "causal-lm": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "masked-lm": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "image-classification": "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "audio-classification": "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
}
SCHEMES = {
    "int8": {"bits": 8},
    "int4-sym-g32": {"bits": 4, "scheme": "sym", "group_size": 32},
}

#: Common config attributes and their tiny values, set wherever a config has them.
SHRINK = {
    "hidden_size": 64,
    "d_model": 64,
    "n_embd": 64,
    "n_embed": 64,
    "dim": 64,
    "embed_dim": 64,
    "word_embed_proj_dim": 64,
    "embedding_size": 64,
    "intermediate_size": 128,
    "ffn_dim": 128,
    "d_ff": 128,
    "n_inner": 128,
    "hidden_dim": 128,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
    "num_hidden_layers": 2,
    "n_layer": 2,
    "n_layers": 2,
    "num_layers": 2,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 4,
    "n_head": 4,
    "n_heads": 4,
    "num_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "d_kv": 16,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "n_positions": 128,
    "n_ctx": 128,
    "max_source_positions": 64,
    "max_target_positions": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 0,
    "sep_token_id": 2,
    "cls_token_id": 1,
    "mask_token_id": 3,
    "image_size": 32,
    "patch_size": 8,
    "num_channels": 3,
    "num_mel_bins": 16,
    "num_labels": 4,
    "sliding_window": 16,
}
#: Per-layer lists a sub-config derives from its layer count: not copied from its defaults.
PER_LAYER = ("layer_types", "layers_block_type", "attn_layer_indices")
#: Families that need fields of their own (the generic table breaks a relation they check).
OVERRIDES: dict[str, dict] = {
    # large by default in fields of their own (minutes of the test's budget otherwise)
    "luke": {"entity_vocab_size": 64, "entity_emb_size": 32},
    "perceiver": {"num_latents": 16, "d_latents": 64, "num_self_attends_per_block": 2},
    "falcon_h1": {"mamba_d_ssm": 64, "mamba_n_heads": 8, "mamba_d_state": 16},
    # T5 keeps its decoder's start token in the config (0, the padding token)
    "t5": {"decoder_start_token_id": 0},
    # rotary dimensions of their own, larger than a tiny head
    "codegen": {"rotary_dim": 8},
    "gptj": {"rotary_dim": 8},
    # relations their configs check
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"num_heads": 8, "n_groups": 1, "state_size": 16, "chunk_size": 16},
    "xmod": {"default_language": "en_XX"},
    # convolutional stages: widths and depths as lists
    "convnext": {"hidden_sizes": [16, 32, 32, 64], "depths": [1, 1, 1, 1]},
    "convnextv2": {"hidden_sizes": [16, 32, 32, 64], "depths": [1, 1, 1, 1]},
}

#: Families left out before building, with the reason (the docs table shows it).
SKIP = {
    "blt": "four sub-models the generic shrinker leaves large (35 s to build), and its "
    "float model does not run at these sizes",
    "vibevoice_asr": "acoustic and semantic tokenizer sub-models the generic shrinker leaves "
    "large (15 s to build); measured once built: refused, transformers renames its keys",
    "efficientnet": "its float model does not run at these sizes (its stages are sized in "
    "lists of their own)",
}

#: Families with mixture-of-experts layers: the other branch adds them.


@dataclass
class Family:
    model_type: str
    task: str
    model_class: str


@dataclass
class Outcome:
    """What happened to one family under one scheme."""

    family: str
    task: str
    scheme: str
    quantcli: str  # "pass", or "refused: ...", "skipped: ...", "FAIL: ..."
    transformers: str = ""  # "pass", "FAIL: ...", "" when not tried
    generate: str = ""
    detail: dict = field(default_factory=dict)


def families() -> list[Family]:
    seen: dict[str, Family] = {}
    listed = {
        model_type
        for task, mapping in TASKS.items()
        if task != "speech-seq2seq"
        for model_type in getattr(modeling_auto, mapping)
    }
    for task, mapping in TASKS.items():
        for model_type, class_name in getattr(modeling_auto, mapping).items():
            if model_type in listed and model_type not in seen:
                seen[model_type] = Family(model_type, task, class_name)
    return sorted(seen.values(), key=lambda f: f.model_type)


def _shrunk_kwargs(config_class, overrides: dict) -> dict:
    """The generic tiny values a config class accepts, with sub-configs shrunk in turn."""
    try:
        default = config_class()
    except Exception:  # noqa: BLE001 - a config that needs arguments gets the overrides only
        return dict(overrides)
    kwargs = {
        key: value
        for key, value in SHRINK.items()
        if hasattr(default, key)
        and not isinstance(getattr(type(default), key, None), property)  # derived
        and (getattr(default, key) is None or type(getattr(default, key)) is type(value))
    }
    for name in getattr(config_class, "sub_configs", None) or {}:
        sub = getattr(default, name, None)
        if sub is None or not hasattr(sub, "to_dict"):
            continue
        sub_kwargs = _shrunk_kwargs(type(sub), overrides.get(name, {}))
        # per-layer lists follow the new layer count when left out
        kwargs[name] = {
            **{k: v for k, v in sub.to_dict().items() if k not in PER_LAYER},
            **sub_kwargs,
        }
    kwargs.update({k: v for k, v in overrides.items() if not isinstance(v, dict)})
    return kwargs


def tiny_config(family: Family):
    config_class = CONFIG_MAPPING[family.model_type]
    kwargs = _shrunk_kwargs(config_class, OVERRIDES.get(family.model_type, {}))
    config = config_class(**kwargs)
    config.architectures = [family.model_class]
    return config


def build(family: Family, seed: int = 0):
    config = tiny_config(family)
    torch.manual_seed(seed)
    model = getattr(transformers, family.model_class)._from_config(config)
    return model.eval()


def sample_inputs(model, batch: int = 1, length: int = 8) -> dict[str, torch.Tensor]:
    config = model.config
    generator = torch.Generator().manual_seed(1)
    name = model.main_input_name
    if name in ("input_ids", "inputs"):
        ids = torch.randint(4, VOCAB, (batch, length), generator=generator)
        inputs = {name: ids}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids[:, :4]
        return inputs
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(batch, channels, size, size, generator=generator)}
    if name == "input_values":
        return {"input_values": torch.randn(batch, 1600, generator=generator)}
    if name == "input_features":
        bins = getattr(config, "num_mel_bins", 16)
        if config.model_type == "whisper":
            frames = 2 * config.max_source_positions
            inputs = {"input_features": torch.randn(batch, bins, frames, generator=generator)}
            inputs["decoder_input_ids"] = torch.tensor([[1, 5, 6, 7]] * batch)
            return inputs
        frames = getattr(config, "max_length", 64)
        return {"input_features": torch.randn(batch, frames, bins, generator=generator)}
    raise ValueError(f"no sample input for main_input_name {name!r}")


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    result = getattr(output, "logits", None)
    return result if result is not None else output[0]


@contextlib.contextmanager
def quiet():
    """transformers' warnings about random weights and unused fields, out of the way."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantcli", *args], capture_output=True, text=True, cwd=cwd
    )


def exit_code(error: BaseException) -> int:
    from quantcli.errors import QuantcliError

    return error.exit_code if isinstance(error, QuantcliError) else 1


def one_line(error: BaseException) -> str:
    from quantcli.errors import first_line

    return first_line(error)[:200]


def prepare(family: Family, root: Path):
    """The float model saved in ``root/<family>/src`` (with a tokenizer for text models),
    or the reason it cannot be built or is left out of the matrix."""
    from tiny_models import char_tokenizer

    if family.model_type in SKIP:
        return None, f"skipped: {SKIP[family.model_type]}"
    try:
        tiny_config(family)
    except Exception as error:  # noqa: BLE001 - the family's own config refuses tiny sizes
        return None, f"skipped: tiny config does not build ({_why(error)})"
    try:
        model = build(family)
    except Exception as error:  # noqa: BLE001
        return None, f"skipped: tiny model does not build ({_why(error)})"
    try:
        logits(model, sample_inputs(model))
    except Exception as error:  # noqa: BLE001 - the float model itself: a config to fix here
        return None, f"skipped: tiny float model does not run ({_why(error)})"
    folder = root / family.model_type.replace("/", "_") / "src"
    try:
        model.save_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - transformers' own writer fails on this config
        return None, f"skipped: transformers cannot save the tiny model ({_why(error)})"
    if model.main_input_name in ("input_ids", "inputs"):
        char_tokenizer().save_pretrained(folder)
    return model, folder


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {one_line(error)[:100]}"


def run(family: Family, model, folder: Path, scheme: str) -> Outcome:
    """Quantize `folder` with quantcli, load it back, compare with the float model whose
    quantized layers use their dequantized weights (what `QuantLinear` computes exactly)."""
    import copy

    from quantcli import QuantConfig, replace_linear_layers
    from quantcli.errors import UsageError
    from quantcli.models.loading import load_quantized
    from quantcli.models.moe import plan_experts
    from quantcli.models.replace import plan_replacement
    from quantcli.models.source import resolve_model
    from quantcli.models.streaming import quantize_checkpoint
    from quantcli.nn.qexperts import QuantExperts

    config = QuantConfig(**SCHEMES[scheme])
    out = folder.parent / scheme
    outcome = Outcome(family.model_type, family.task, scheme, "")
    try:
        try:
            quantize_checkpoint(resolve_model(str(folder)), out, config)
        except UsageError as error:  # a group size that does not fit: take the largest that does
            fitting = re.search(r"group sizes that fit every layer: ([\d, ]+)\.", str(error))
            if fitting:
                sizes = [int(size) for size in fitting.group(1).split(", ")]
                size = max([s for s in sizes if s <= config.group_size] or sizes)
                config = QuantConfig(**{**SCHEMES[scheme], "group_size": size})
                outcome.detail["group_size"] = size
            elif "use --granularity channel" in str(error):
                config = QuantConfig(bits=config.bits, scheme=config.scheme, granularity="channel")
                outcome.detail["group_size"] = "channel"
            else:
                raise
            quantize_checkpoint(resolve_model(str(folder)), out, config)
    except Exception as error:  # noqa: BLE001 - recorded, judged by the caller
        written = out.exists()
        outcome.quantcli = f"refused (exit {exit_code(error)}): {one_line(error)}"
        outcome.detail.update(stage="quantize", exit=exit_code(error), written=written)
        return outcome
    report = plan_replacement(model, config)
    outcome.detail["quantized"] = len(report.replaced)
    outcome.detail["direct"] = sorted(
        f"{name} ({why.split()[0]})"
        for name, why in report.skipped.items()
        if "reads its float weight" in why
    )
    try:
        loaded, _ = load_quantized(resolve_model(str(out)), dtype=None)
    except Exception as error:  # noqa: BLE001
        outcome.quantcli = f"FAIL: load (exit {exit_code(error)}): {one_line(error)}"
        outcome.detail.update(stage="load", exit=exit_code(error))
        return outcome
    reference = copy.deepcopy(model)
    routers = tuple(plan_experts(model).routers)  # kept in float, as quantize keeps them
    replace_linear_layers(reference, QuantConfig(**{**config.__dict__, "exclude": routers}))
    _dequantized_experts_into(reference, loaded)
    inputs = sample_inputs(model)
    try:
        ours, dense, float_ = (
            logits(loaded, inputs),
            logits(reference, inputs),
            logits(model, inputs),
        )
    except Exception as error:  # noqa: BLE001
        outcome.quantcli = f"FAIL: forward: {type(error).__name__}: {one_line(error)}"
        return outcome
    outcome.detail.update(
        stage="compare",
        max_dense_diff=float((ours - dense).abs().max()),
        max_float_diff=float((ours.float() - float_).abs().max()),
        float_scale=float(float_.abs().max()),
    )
    # QuantExperts sums its experts in its own order (fp32): n * eps relative for ~100-term
    # sums is about 1e-5; a wrong expert, scale or zero point moves logits by 1e-3 and more
    moe = any(isinstance(module, QuantExperts) for module in loaded.modules())
    bound = 1e-5 * float(dense.abs().max()) if moe else 0.0
    if not torch.isfinite(ours).all():
        outcome.quantcli = "FAIL: non-finite logits"
    elif not torch.allclose(ours, dense, rtol=0, atol=bound):
        outcome.quantcli = (
            f"FAIL: logits differ from the dense model by {outcome.detail['max_dense_diff']:.3g}"
        )
    else:
        outcome.quantcli = "pass"
    outcome.detail["loaded"] = loaded
    return outcome


def _dequantized_experts_into(reference, loaded) -> None:
    """The reference's fused experts set to the loaded `QuantExperts`' dequantized weights
    (expert by expert, stacked as transformers holds them)."""
    from quantcli.nn.qexperts import PROJECTIONS, QuantExperts

    for name, module in loaded.named_modules():
        if isinstance(module, QuantExperts):
            experts = reference.get_submodule(name)
            for proj in PROJECTIONS:
                param = getattr(experts, proj)
                weights = [module.expert_weight(proj, e, param.dtype) for e in range(len(param))]
                param.data = torch.stack(weights)


#: Families that fail for a reason not fixed yet, with it (the test expects them to fail).
KNOWN_FAILURES: dict[str, str] = {}
