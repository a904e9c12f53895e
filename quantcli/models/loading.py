"""Load a quantized checkpoint into a ready model, with no float copy of its weights.

The model is built from ``config.json`` with parameters on ``meta`` (its
``quantization_config`` removed so transformers does not apply its own quantizer), the
linear layers are swapped for empty `QuantLinear`s, every tensor in the files is checked
against that skeleton, and ``load_state_dict(assign=True)`` hands the file's tensors to the
modules. Peak memory is about the size of the quantized checkpoint.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from quantcli.checkpoint import (
    CheckpointSummary,
    TensorInfo,
    check_format_version,
    parse_quantization_config,
    read_all_headers,
    read_tensor,
    summarize,
    weight_files,
)
from quantcli.config import QuantConfig
from quantcli.errors import CheckpointError
from quantcli.models.keys import KeyLayout, Slot
from quantcli.models.moe import experts_excluded, plan_experts, replace_experts
from quantcli.models.replace import replace_linear_layers
from quantcli.models.skeleton import build_skeleton, load_hf_config, tied_keys
from quantcli.models.source import ModelSource, resolve_model
from quantcli.nn.kernels import preferred_dtype, prepare_kernels
from quantcli.nn.qexperts import QuantExperts
from quantcli.nn.qlinear import QuantLinear


@dataclass
class LoadReport:
    """What was loaded, for `quantcli load` to print."""

    model_class: str
    config: QuantConfig
    quantized: int
    kept_float: int
    tensor_bytes: int
    seconds: float
    peak_rss_bytes: int
    dtype: torch.dtype | None  # of the float tensors and activations; None: as stored


def load_quantized(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = "auto",
    trust_remote_code: bool = False,
) -> tuple[nn.Module, LoadReport]:
    """The model of a quantcli (compressed-tensors int) checkpoint, in eval mode on `device`.

    `dtype` casts the float tensors (norms, embeddings, scales, biases), and so sets the
    activations' dtype; the integers stay. "auto" picks the fastest for the device and the
    layers' kernels (`preferred_dtype`), None keeps what the files hold.
    """
    started = time.perf_counter()
    hf_config = load_hf_config(source.folder, trust_remote_code)
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        raise CheckpointError(
            f"{source.model_id} is not quantized (no quantization_config in config.json): "
            "run quantcli quantize on it first."
        )
    config, weight_format = parse_quantization_config(
        raw if isinstance(raw, dict) else raw.to_dict()
    )
    if dtype == "auto":
        dtype = preferred_dtype(config, torch.device(device).type)
    del hf_config.quantization_config
    files = weight_files(source.folder)
    tensors, metadata = read_all_headers(files)
    check_format_version(metadata, source.model_id)

    model = build_skeleton(hf_config, trust_remote_code=trust_remote_code)
    layout = KeyLayout(model)  # before any replacement: it needs the fused expert parameters
    moe = plan_experts(model)
    config = _with_model_names(config, layout)
    report = replace_linear_layers(model, config)
    quantized_experts = _quantized_experts(model, layout, moe, config)
    replace_experts(model, list(quantized_experts), config)
    set_checkpoint_format(model, weight_format)
    expected = {
        key: tensor
        for key, tensor in model.state_dict().items()
        if key.rpartition(".")[0] not in quantized_experts
    }
    unsaved = _unsaved_keys(model, expected)
    names, pieces = _route(tensors, layout, expected)
    _check_against_skeleton(
        {names[key]: info for key, info in tensors.items() if key in names},
        expected,
        tied_keys(model, expected) | _stacked_keys(pieces) | unsaved,
    )

    # one module at a time, so that a layer's file tensors are freed once it has taken them
    by_module: dict[str, dict[str, TensorInfo]] = {}
    for key, name in names.items():
        module, _, leaf = name.rpartition(".")
        by_module.setdefault(module, {})[leaf] = tensors[key]
    for module, infos in by_module.items():
        state = {}
        for leaf, info in infos.items():
            tensor = read_tensor(info)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[leaf] = tensor.to(device)
        assign_state(model.get_submodule(module), module, state)
    _load_pieces(model, pieces, quantized_experts, dtype, device)
    if report.shared_head is None:  # a head on a quantized table was tied when replaced
        model.tie_weights()
    _compute_unsaved(model, unsaved, device, dtype)
    still_empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_empty:
        raise CheckpointError(
            f"the checkpoint does not hold {still_empty[0]}"
            + (f" (and {len(still_empty) - 1} more)." if len(still_empty) > 1 else ".")
        )
    model.to(device).eval()
    if dtype is not None:
        prepare_kernels(model, torch.device(device).type, dtype)
    return model, LoadReport(
        model_class=type(model).__name__,
        config=config,
        quantized=len(report.replaced) + sum(quantized_experts.values()),
        kept_float=len(report.skipped),
        tensor_bytes=sum(info.nbytes for info in tensors.values()),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        dtype=dtype,
    )


def load_any(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = "auto",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A quantcli checkpoint through `load_quantized`, or a float model through transformers
    (its config's architecture, safetensors only: never a pickle)."""
    hf_config = load_hf_config(source.folder, trust_remote_code)
    if getattr(hf_config, "quantization_config", None) is not None:
        return load_quantized(source, device, dtype, trust_remote_code)[0]
    import transformers

    weight_files(source.folder)  # refuses pickle-only folders with the reason
    architectures = getattr(hf_config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise CheckpointError(
            f"{source.model_id} names no architecture transformers knows in config.json "
            f"({architectures or 'none'})."
        )
    model = model_class.from_pretrained(
        source.folder,
        dtype=None if dtype == "auto" else dtype,
        use_safetensors=True,
        trust_remote_code=trust_remote_code,
    )
    return model.to(device).eval()


def summarize_folder(folder: Path) -> CheckpointSummary:
    """What a model folder holds, from config.json and the safetensors headers only."""
    raw = load_hf_config(folder).to_dict().get("quantization_config")
    return summarize(folder, raw)


def _unsaved_keys(model: nn.Module, expected: dict[str, torch.Tensor]) -> set[str]:
    """Parameters transformers never writes (``_keys_to_ignore_on_save``: Marian's
    sinusoidal positions): the model computes them, so checkpoints lack them."""
    patterns = list(getattr(model, "_keys_to_ignore_on_save", None) or [])
    return {name for name in expected if any(re.search(p, name) for p in patterns)}


def _compute_unsaved(model: nn.Module, names: set[str], device, dtype) -> None:
    """Give the parameters of `_unsaved_keys` their values, as the model's own
    initialisation computes them (``_init_weights`` of the module that holds them)."""
    for name in sorted(names):
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if not getattr(module, leaf).is_meta:
            continue
        module.to_empty(device=device, recurse=False)
        with torch.no_grad():
            model._init_weights(module)
            if dtype is not None:
                module.to(dtype)


def assign_state(module: nn.Module, name: str, state: dict, strict: bool = False) -> None:
    """``load_state_dict(assign=True)`` on one module of a model; a tensor it refuses is
    named in full (``model.layers.0.mlp.up_proj.weight_scale``), not relative to it."""
    try:
        module.load_state_dict(state, strict=strict, assign=True)
    except CheckpointError as error:
        raise CheckpointError(f"{name}.{error}" if name else str(error)) from None


def set_checkpoint_format(model: nn.Module, weight_format: str) -> None:
    """Tell 8-bit layers how the files store their integers (packed words or plain int8)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.checkpoint_format = weight_format


#: The tensors of a quantized layer in the checkpoint, beside its float ``bias``.
QUANTIZED_LEAVES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight")


@dataclass(frozen=True)
class _Piece:
    """A checkpoint tensor that fills one expert's block of a stacked parameter."""

    slot: Slot
    leaf: str  # "weight" for float experts, else a QUANTIZED_LEAVES entry
    info: TensorInfo


def _with_model_names(config: QuantConfig, layout: KeyLayout) -> QuantConfig:
    """`config` whose excluded names (saved module names, as ``ignore`` lists them) also
    hold the model's names for the same modules, when transformers renames them."""
    extra = []
    for pattern in config.exclude:
        if pattern.startswith("re:") or any(c in pattern for c in "*?["):
            continue
        slot = layout.model_module(pattern)
        module = slot.key.removesuffix(".weight")
        if not slot.stacked and module != pattern:
            extra.append(module)
    return replace(config, exclude=(*config.exclude, *extra)) if extra else config


def _quantized_experts(model, layout: KeyLayout, moe, config: QuantConfig) -> dict[str, int]:
    """The experts modules whose matrices the checkpoint holds quantized (none ignored),
    with how many matrices each has on disk."""
    quantized = {}
    for experts in moe.experts:
        names = [key.removesuffix(".weight") for key in layout.stacked.get(experts, [])]
        verdict = experts_excluded(names, config, experts)
        if verdict is None:
            raise CheckpointError(
                f"the quantization config ignores some experts of {experts} but not all: "
                "quantcli loads an experts module either quantized or float, whole."
            )
        if not verdict:
            quantized[experts] = len(names)
    return quantized


def _route(tensors: dict[str, TensorInfo], layout: KeyLayout, expected: dict):
    """Each file tensor's model state-dict key, or the expert block it fills."""
    names: dict[str, str] = {}
    pieces: list[_Piece] = []
    for key, info in tensors.items():
        slot = layout.slot(key)
        if not slot.stacked and slot.key in expected:
            names[key] = slot.key
            continue
        if slot.stacked and slot in layout.saved_names:  # a float expert matrix
            pieces.append(_Piece(slot, "weight", info))
            continue
        module, _, leaf = key.rpartition(".")
        if leaf in QUANTIZED_LEAVES:
            weight_slot = layout.model_module(module)
            if weight_slot.stacked and weight_slot in layout.saved_names:
                pieces.append(_Piece(weight_slot, leaf, info))
                continue
            if weight_slot.key.endswith(".weight"):
                names[key] = weight_slot.key.removesuffix("weight") + leaf
                continue
        names[key] = key  # refused by _check_against_skeleton, by its file name
    return names, pieces


def _stacked_keys(pieces: list[_Piece]) -> set[str]:
    return {piece.slot.key for piece in pieces if piece.leaf == "weight"}


def _load_pieces(model, pieces: list[_Piece], quantized, dtype, device) -> None:
    """Fill the stacked expert parameters: `QuantExperts` per expert, float ones by rows."""
    by_matrix: dict[Slot, dict[str, TensorInfo]] = {}
    for piece in pieces:
        by_matrix.setdefault(piece.slot, {})[piece.leaf] = piece.info
    floats: dict[str, torch.Tensor] = {}
    filled: dict[str, set[Slot]] = {}
    for slot, infos in sorted(by_matrix.items(), key=lambda kv: kv[0].key):
        module_name, _, proj = slot.key.rpartition(".")
        module = model.get_submodule(module_name)
        where = f"{module_name}.{proj}[{slot.expert}]"
        if isinstance(module, QuantExperts):
            state = {}
            for leaf, info in infos.items():
                tensor = read_tensor(info)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[leaf] = tensor.to(device)
            module.set_piece(proj, slot.expert, slot.part, slot.parts, state, where)
            continue
        if set(infos) != {"weight"}:
            raise CheckpointError(
                f"{where} is stored quantized ({', '.join(sorted(infos))}) but the config "
                "keeps these experts in float."
            )
        parameter = getattr(module, proj)
        full = floats.get(slot.key)
        if full is None:
            full = floats[slot.key] = torch.empty(
                parameter.shape, dtype=dtype or infos["weight"].dtype, device=device
            )
        rows = parameter.shape[1] // slot.parts
        tensor = read_tensor(infos["weight"])
        if tuple(tensor.shape) != (rows, parameter.shape[2]):
            raise CheckpointError(
                f"{where} has shape {list(tensor.shape)} in the file but the config implies "
                f"{[rows, parameter.shape[2]]}."
            )
        full[slot.expert, slot.part * rows : (slot.part + 1) * rows] = tensor
        filled.setdefault(slot.key, set()).add(slot)
    for key, full in floats.items():
        if len(filled[key]) != full.shape[0] * next(iter(filled[key])).parts:
            raise CheckpointError(
                f"the checkpoint lacks some experts of {key}: the files are incomplete or do "
                "not match config.json."
            )
        module_name, _, proj = key.rpartition(".")
        setattr(model.get_submodule(module_name), proj, nn.Parameter(full, requires_grad=False))
    for name in quantized:
        missing = model.get_submodule(name).missing_pieces()
        if missing:
            raise CheckpointError(
                f"the checkpoint lacks {name}.{missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": the files are incomplete or do not match config.json."
            )


def _check_against_skeleton(tensors, expected, tied) -> None:
    """Every file tensor must be one the model has, of its shape (and integer dtype)."""
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"the checkpoint holds {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + ", which its config does not describe: the files and config.json disagree."
        )
    missing = sorted(set(expected) - set(tensors) - tied)
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + ": the files are incomplete or do not match config.json."
        )
    for name, info in tensors.items():
        want = expected[name]
        if tuple(want.shape) != info.shape:
            raise CheckpointError(
                f"tensor {name} has shape {list(info.shape)} in the file but the config "
                f"implies {list(want.shape)}: the checkpoint does not match its config."
            )
        if info.dtype.is_floating_point != want.dtype.is_floating_point or (
            not info.dtype.is_floating_point and info.dtype != want.dtype
        ):
            raise CheckpointError(
                f"tensor {name} is {str(info.dtype).removeprefix('torch.')} in the file but "
                f"the config implies {str(want.dtype).removeprefix('torch.')}."
            )


def sanity_forward(model: nn.Module) -> str:
    """Run one short forward pass; say what came out, or raise if it is not finite."""
    device = next(iter(model.buffers()), torch.empty(0)).device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    inputs = probe_inputs(model, device, dtype)
    with torch.no_grad():
        output = model(**inputs)
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = output[0]
    if not torch.isfinite(logits).all():
        raise CheckpointError("the loaded model produced NaN or Inf on a test input.")
    name = model.main_input_name
    shape = tuple(inputs[name].shape)
    what = "tokens" if name == "input_ids" else name
    return f"ok: {shape} {what} -> {tuple(logits.shape)} finite outputs"


def probe_inputs(model: nn.Module, device, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A small input of the kind the model reads (its ``main_input_name``): token ids,
    an image, a waveform or audio features (Whisper's, or frames of mel bins)."""
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    generator = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        channels = getattr(vision, "num_channels", 3)
        inputs[name] = torch.randn(1, channels, height, width, generator=generator)
    elif name == "input_values":
        inputs[name] = torch.randn(1, 16000, generator=generator)  # a second at 16 kHz
    elif name == "input_features":
        bins = getattr(config, "num_mel_bins", 80)
        source = getattr(config, "max_source_positions", None)
        if getattr(config, "is_encoder_decoder", False) and isinstance(source, int):
            # Whisper: mel bins first, then twice the encoder's positions (two strided convs)
            inputs[name] = torch.randn(1, bins, 2 * source, generator=generator)
        else:
            inputs[name] = torch.randn(
                1, getattr(config, "max_length", 64), bins, generator=generator
            )
    else:
        inputs[name] = torch.arange(1, 9).unsqueeze(0)
    if getattr(config, "is_encoder_decoder", False):
        start = getattr(config, "decoder_start_token_id", None)
        start = start if isinstance(start, int) else 0
        inputs["decoder_input_ids"] = torch.tensor([[start, 1, 2, 3]])
    return {
        key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
        for key, value in inputs.items()
    }


def load(
    model: str,
    *,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = "auto",
    token: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a quantized checkpoint (local folder or Hub id) as a ready model.

    `dtype` "auto" picks the fastest activation dtype for the device; None keeps the files'.
    """
    source = resolve_model(model, revision, token)
    loaded, _ = load_quantized(source, device, dtype, trust_remote_code)
    return loaded
