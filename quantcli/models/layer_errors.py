"""Which layers lost the most: each quantized weight of a checkpoint against the original's.

Streaming, like quantize: one layer's integers and its original weight in memory at a
time, read straight from the safetensors files of both folders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from quantcli.checkpoint import (
    parse_quantization_config,
    read_all_headers,
    read_tensor,
    weight_files,
)
from quantcli.errors import CheckpointError, UsageError
from quantcli.models.keys import KeyLayout
from quantcli.models.loading import assign_state
from quantcli.models.replace import linear_weight
from quantcli.models.skeleton import build_skeleton, load_hf_config
from quantcli.models.source import ModelSource
from quantcli.nn.qlinear import QuantLinear


@dataclass
class LayerError:
    name: str
    kind: str  # the layer's own name (q_proj, down_proj...), to group similar layers
    params: int
    relative_error: float  # ||W_q - W|| / ||W||
    snr_db: float  # 20 log10(||W|| / ||W_q - W||)


def layer_errors(
    checkpoint: Path,
    original: ModelSource,
    trust_remote_code: bool = False,
    on_start: Callable[[int], None] | None = None,
    on_layer: Callable[[str], None] | None = None,
) -> list[LayerError]:
    """The error of every quantized layer of `checkpoint`, worst first."""
    hf_config = load_hf_config(checkpoint, trust_remote_code)
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        raise UsageError(f"{checkpoint} is not quantized: --against compares a quantized one.")
    config, weight_format = parse_quantization_config(
        raw if isinstance(raw, dict) else raw.to_dict()
    )
    del hf_config.quantization_config
    skeleton = build_skeleton(hf_config, trust_remote_code=trust_remote_code)
    ours, _ = read_all_headers(weight_files(checkpoint))
    theirs, _ = read_all_headers(weight_files(original.folder))
    layout = KeyLayout(skeleton)  # checkpoint names (per-expert ones too) to the model's
    originals = {layout.slot(key): info for key, info in theirs.items()}
    names = sorted(
        key.removesuffix(".weight_scale") for key in ours if key.endswith(".weight_scale")
    )
    if on_start:
        on_start(len(names))
    results = []
    for name in names:
        slot = layout.slot(f"{name}.weight")
        info = originals.get(slot)
        if info is None:
            raise CheckpointError(
                f"{original.model_id} has no {name}.weight: it is not this checkpoint's original."
            )
        weight = read_tensor(info).float()
        if slot.stacked:  # one expert's matrix, saved as its own 2-D tensor
            out_features, in_features = layout.saved.get(f"{name}.weight", weight.shape)
        else:
            module = skeleton.get_submodule(slot.key.removesuffix(".weight"))
            if isinstance(module, Conv1D):  # GPT-2 stores (in, out)
                weight = weight.t()
            out_features, in_features = linear_weight(module).shape
        if tuple(weight.shape) != (out_features, in_features):
            raise CheckpointError(
                f"{name}.weight is {list(weight.shape)} in {original.model_id} but "
                f"{[out_features, in_features]} in the checkpoint: not its original."
            )
        layer = QuantLinear(in_features, out_features, False, config, device="meta")
        layer.checkpoint_format = weight_format
        state = {
            key: read_tensor(ours[f"{name}.{key}"])
            for key in layer.state_dict()
            if f"{name}.{key}" in ours
        }
        assign_state(layer, name, state, strict=True)
        difference = torch.linalg.vector_norm(layer.dequantize_weight(torch.float32) - weight)
        norm = torch.linalg.vector_norm(weight)
        results.append(_layer_error(name, weight.numel(), float(difference), float(norm)))
        if on_layer:
            on_layer(name)
    return sorted(results, key=lambda result: result.relative_error, reverse=True)


def _layer_error(name: str, params: int, difference: float, norm: float) -> LayerError:
    relative = difference / norm if norm else (0.0 if difference == 0 else math.inf)
    snr = math.inf if difference == 0 else 20 * math.log10(norm / difference) if norm else -math.inf
    return LayerError(name, name.rpartition(".")[2], params, relative, snr)
