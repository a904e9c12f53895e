"""Model skeletons: a transformers model built from its config with no weight memory.

Parameters go to the ``meta`` device as they are registered, while buffers (rotary
tables, position ids) are computed for real: they are not in checkpoints, and computing
them here means nothing has to rebuild them after loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from quantcli.errors import CheckpointError, first_line


def load_hf_config(folder: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's transformers config; remote code only when the user allows it."""
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{folder} has no config.json: it is not a transformers model folder."
        )
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except StrictDataclassError as error:  # a field of the wrong type or value
        raise CheckpointError(f"config.json: {_field_problem(error)}") from None
    except ValueError as error:
        message = first_line(error)
        if "trust_remote_code" in message:
            message = (
                "this model needs its own code from the Hub: pass --trust-remote-code to allow it"
            )
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {message}") from None
    except Exception as error:  # noqa: BLE001 - reading a JSON file runs none of ours
        # transformers trusts the file's types (a "dtype" of [] is an IndexError deep in it)
        raise CheckpointError(
            f"cannot read {folder / 'config.json'} ({type(error).__name__}: "
            f"{first_line(error)}): check its fields."
        ) from None
    architectures = getattr(config, "architectures", None)
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
    ):
        raise CheckpointError("config.json: 'architectures' must be a list of class names.")
    return config


def _field_problem(error: Exception) -> str:
    """The field and the reason of a transformers config validation error, on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(error).__name__


def build_skeleton(
    config: PretrainedConfig, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """The model class named by the config, with every parameter on ``meta``."""
    model_class = _model_class(config, trust_remote_code)
    _check_layer_count(config)
    dtype = dtype or _config_dtype(config)
    try:
        with _parameters_on_meta():
            if hasattr(model_class, "from_config"):  # an Auto class: remote code or none named
                return model_class.from_config(
                    config, dtype=dtype, trust_remote_code=trust_remote_code
                )
            return model_class._from_config(config, dtype=dtype)
    except MemoryError:
        raise  # exit 5, as everywhere
    except Exception as error:  # noqa: BLE001 - e.g. an AssertionError on pad_token_id
        # building from a config runs no data: whatever fails here is the config's doing
        raise CheckpointError(
            f"config.json does not describe a buildable {model_class.__name__} "
            f"({type(error).__name__}: {first_line(error)}): check its sizes and fields."
        ) from None


#: More layers than any published model has (405B Llama: 126): a config asking for more is
#: corrupt or hostile, and building its skeleton would take minutes before any check ran.
MAX_LAYERS = 1024
_LAYER_FIELDS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)


def repeated_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Names whose tensor an earlier name already holds (a tied output head, LUKE's entity
    head), each with that first name: a checkpoint holds such a tensor once."""
    first: dict[int, str] = {}
    repeated = {}
    for name, tensor in named:
        if id(tensor) in first:
            repeated[name] = first[id(tensor)]
        first.setdefault(id(tensor), name)
    return repeated


def tied_keys(model: nn.Module, expected: dict[str, torch.Tensor]) -> set[str]:
    """State-dict keys that are another key's tensor (a tied output head): not in files."""
    tied = set(repeated_tensors(expected.items()))
    tied.update(getattr(model, "all_tied_weights_keys", {}) or {})
    return tied


def _check_layer_count(config: PretrainedConfig) -> None:
    for field in _LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > MAX_LAYERS:
            raise CheckpointError(
                f"config.json: '{field}' is {value}, more layers than any model has "
                f"(quantcli takes up to {MAX_LAYERS}): the config is corrupt."
            )


def _model_class(config: PretrainedConfig, trust_remote_code: bool):
    for name in config.architectures or []:
        model_class = getattr(transformers, name, None)
        if model_class is None:
            continue
        expected = getattr(model_class, "config_class", None)
        if (
            isinstance(expected, type)
            and not isinstance(config, expected)
            and name not in _auto_classes(config.model_type)
        ):
            raise CheckpointError(
                f"config.json: architectures names {name}, a '{expected.model_type}' model, "
                f"but model_type is '{config.model_type}': fix one of them."
            )
        return model_class
    if trust_remote_code and getattr(config, "auto_map", None):
        return transformers.AutoModelForCausalLM
    if not config.architectures:
        return transformers.AutoModel
    raise CheckpointError(
        f"transformers {transformers.__version__} has no class {config.architectures[0]}: "
        "upgrade transformers, or pass --trust-remote-code if the model ships its own code."
    )


def _auto_classes(model_type: str) -> set[str]:
    """The classes transformers' auto mappings build for `model_type`: some families reuse
    another's (``exaone``, ``internlm3``: ``LlamaForCausalLM``, its config class Llama's)."""
    from transformers.models.auto import modeling_auto

    names = set()
    for attribute in dir(modeling_auto):
        mapping = getattr(modeling_auto, attribute)
        if attribute.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            value = mapping.get(model_type)
            names.update([value] if isinstance(value, str) else value or [])
    return names


def _config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move each parameter to ``meta`` as a module registers it (buffers stay real).

    Parameters are created with ``torch.empty`` and moved before any initialisation
    touches them, so their memory is never committed.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
