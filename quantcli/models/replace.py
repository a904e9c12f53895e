"""Swap a model's linear layers for `QuantLinear`: the one entry point, driven by a config.

Works on any PyTorch model: ``nn.Linear`` and transformers' GPT-2 style ``Conv1D`` (weight
stored transposed) are replaced; the output head and layers matching an exclude pattern
stay in float. On the ``meta`` device it only reshapes the skeleton (no data touched), so a
checkpoint can then be loaded into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantcli.config import Granularity, QuantConfig
from quantcli.errors import InvalidTensorError, UsageError
from quantcli.models.skeleton import repeated_tensors
from quantcli.nn.qembedding import QuantEmbedding, QuantTiedHead
from quantcli.nn.qlinear import QuantLinear


@dataclass
class ReplacementReport:
    """Which linear layers were quantized, and why the others were kept in float."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    group_misfits: list[str] = field(default_factory=list)  # skipped: width % group_size
    unused_excludes: list[str] = field(default_factory=list)  # patterns matching no layer
    embeddings: str | None = None  # the input embeddings, quantized (quantize_embeddings)
    shared_head: str | None = None  # a head tied to them: computes from the quantized table
    heads: set[str] = field(default_factory=set)  # the output head(s), quantized or not


def plan_replacement(model: nn.Module, config: QuantConfig) -> ReplacementReport:
    """Which linear layers `config` quantizes, and why it keeps the others, without changes."""
    report = ReplacementReport(heads=output_head_names(model))
    heads = report.heads
    if config.quantize_embeddings:
        report.embeddings, report.shared_head = _embeddings_to_quantize(model, heads)
    direct = _weights_read_directly(model)
    tied = repeated_tensors(model.named_parameters(remove_duplicate=False))
    for name, module in model.named_modules():
        weight = linear_weight(module)
        if weight is None or name == report.shared_head:
            continue
        reason = _skip_reason(name, config, heads)
        if reason is None and name not in heads and f"{name}.weight" in tied:
            # quantizing it would untie it; the checkpoint holds the weight once, elsewhere
            reason = f"weight tied to {tied[f'{name}.weight']} (kept in float)"
        if reason is None and name in direct:
            # an enclosing module multiplies by (or rescales) `<layer>.weight` itself
            reason = f"{direct[name]} reads its float weight directly"
        in_features, group_size = weight.shape[1], config.group_size
        if reason is None and splits_into_partial_groups(in_features, config):
            reason = f"in_features={in_features} is not a multiple of group_size={group_size}"
            report.group_misfits.append(name)
        if reason:
            report.skipped[name] = reason
        else:
            report.replaced.append(name)
    table = model.get_submodule(report.embeddings) if report.embeddings else None
    if table is not None and splits_into_partial_groups(table.embedding_dim, config):
        report.group_misfits.append(report.embeddings)
    linears = [*report.replaced, *report.skipped]
    report.unused_excludes = [
        pattern for pattern in config.exclude if not any(matches(name, pattern) for name in linears)
    ]
    return report


def splits_into_partial_groups(in_features: int, config: QuantConfig) -> bool:
    """A group-wise `config` whose group size does not divide the input width."""
    return config.granularity is Granularity.GROUP and in_features % config.group_size != 0


def _embeddings_to_quantize(model: nn.Module, heads: set[str]) -> tuple[str, str | None]:
    """The input embeddings' name, and the head tied to them (None when untied).

    Refuses what one quantized table cannot serve: embeddings that are not a plain
    ``nn.Embedding`` (Gemma's scales its rows in `forward`), or a table tied to other
    modules than the head (T5's encoder and decoder share theirs).
    """
    embeddings = _embeddings(model, "get_input_embeddings")
    if type(embeddings) is not nn.Embedding:
        kind = type(embeddings).__name__ if embeddings is not None else "not found"
        raise UsageError(
            f"--quantize-embeddings: this model's input embeddings are {kind}, not a plain "
            "nn.Embedding, which is what quantcli quantizes; leave the option out."
        )
    name = next(n for n, m in model.named_modules() if m is embeddings)
    tied = [
        target.removesuffix(".weight")
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
        if source == f"{name}.weight"
    ]
    others = [
        target
        for target in tied
        if target not in heads or linear_weight(model.get_submodule(target)) is None
    ]
    if others:
        raise UsageError(
            f"--quantize-embeddings: {others[0]} reuses the table of {name} and cannot take "
            "a quantized one; leave the option out."
        )
    biased = [head for head in tied if getattr(model.get_submodule(head), "bias", None) is not None]
    if biased:
        raise UsageError(
            f"--quantize-embeddings: the head {biased[0]}, tied to {name}, has a bias, which "
            "quantcli's shared table does not carry; leave the option out."
        )
    return name, tied[0] if tied else None


def replace_linear_layers(model: nn.Module, config: QuantConfig) -> ReplacementReport:
    """Quantize every eligible linear layer of `model` in place (and the embeddings, with
    the head tied to them, when `config` says so) and report what happened."""
    report = plan_replacement(model, config)
    if report.embeddings:
        module = model.get_submodule(report.embeddings)
        table = QuantEmbedding.from_weight(module.weight, None, config)
        _set_submodule(model, report.embeddings, table)
        if report.shared_head:
            _set_submodule(model, report.shared_head, QuantTiedHead(table))
    for name in report.replaced:
        module = model.get_submodule(name)
        try:
            layer = QuantLinear.from_weight(linear_weight(module), module.bias, config)
        except InvalidTensorError as error:
            raise InvalidTensorError(f"{name}.weight: {error}") from None
        _set_submodule(model, name, layer)
    return report


def linear_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(out, in)`` weight of a linear-like module, or None for anything else."""
    if isinstance(module, nn.Linear):
        return module.weight
    if isinstance(module, Conv1D):
        return module.weight.t()
    return None


def quantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The ``(out, in)`` weight quantcli quantizes: a linear's, or an embedding table's
    ``(num_embeddings, embedding_dim)``, which a tied head uses as ``(out, in)``."""
    return module.weight if isinstance(module, nn.Embedding) else linear_weight(module)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head: ``get_output_embeddings()``, or a linear tied to the input
    embeddings. Kept in float by default: it is the layer most sensitive to quantization."""
    heads: list[nn.Module] = []
    output = _embeddings(model, "get_output_embeddings")
    if output is not None:
        heads.append(output)
    embeddings = _embeddings(model, "get_input_embeddings")
    embedding_weight = getattr(embeddings, "weight", None)
    names = set()
    for name, module in model.named_modules(remove_duplicate=False):
        tied = embedding_weight is not None and getattr(module, "weight", None) is embedding_weight
        if any(module is head for head in heads) or (tied and module is not embeddings):
            names.add(name)
    return names


def _weights_read_directly(model: nn.Module) -> dict[str, str]:
    """Linear layers whose weight an enclosing module's code uses itself (``self.out_proj
    .weight`` in nn.MultiheadAttention, ``self.dense.weight`` in MobileBERT's head, WavLM's
    attention, RWKV's rescaling): a `QuantLinear` there would hand it integers. Each is
    mapped to the class that reads it. Found by reading the classes' methods (initialisation
    and weight tying apart) for ``self.<path>.weight`` (that exact submodule) or
    ``<name>.<path>.weight`` (any submodule ending in that path), even on a branch this
    configuration does not take: kept in float, the layer is right on every branch."""
    found: dict[str, str] = {}
    for owner, module in model.named_modules():
        exact, anywhere = _paths_read(type(module))
        if not exact and not anywhere:
            continue
        prefix = f"{owner}." if owner else ""
        for name, child in module.named_modules():
            if not name or linear_weight(child) is None:
                continue
            if name in exact or any(name == p or name.endswith(f".{p}") for p in anywhere):
                found.setdefault(prefix + name, type(module).__name__)
    return found


#: ``<receiver>.<path>.weight`` used as a tensor: not only its dtype, device or shape looked
#: at (T5 checks ``self.wo.weight.dtype``), nor an isinstance test
_READ = re.compile(
    r"(?<!isinstance\()\b(\w+)\.([A-Za-z_][\w.]*?)\.weight\b"
    r"(?!_|\.(?:dtype|device|shape|size|ndim|is_\w+|requires_grad)\b)"
)
_paths_cache: dict[type, tuple[frozenset[str], frozenset[str]]] = {}
_SKIPPED_MODULES = (
    "torch.nn.modules.module",
    "builtins",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "transformers.pytorch_utils",
)


def _paths_read(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """Submodule paths whose ``.weight`` the class's own methods use: through ``self``, and
    through any other name."""
    if cls not in _paths_cache:
        import inspect

        exact: set[str] = set()
        anywhere: set[str] = set()
        for klass in cls.__mro__:
            if klass.__module__ in _SKIPPED_MODULES:
                continue
            for attribute, function in vars(klass).items():
                if not inspect.isfunction(function) or "init" in attribute or "tie" in attribute:
                    continue
                try:
                    source = inspect.getsource(function)
                except (OSError, TypeError):
                    continue
                for receiver, path in _READ.findall(source):
                    (exact if receiver == "self" else anywhere).add(path)
        _paths_cache[cls] = (frozenset(exact), frozenset(anywhere))
    return _paths_cache[cls]


def _embeddings(model: nn.Module, getter: str) -> nn.Module | None:
    """``model.get_input_embeddings()`` or ``get_output_embeddings()``; None for a model
    that has none (transformers raises NotImplementedError for vision and audio models)."""
    method = getattr(model, getter, None)
    if not callable(method):
        return None
    try:
        return method()
    except NotImplementedError:
        return None


def _skip_reason(name: str, config: QuantConfig, heads: set[str]) -> str | None:
    if name in heads and not config.quantize_head:
        return "output head (kept in float; quantize it with --quantize-head)"
    for pattern in config.exclude:
        if matches(name, pattern):
            return f"excluded by pattern '{pattern}'"
    return None


def matches(name: str, pattern: str) -> bool:
    """A glob on module names, or a regex after ``re:`` matched from the start of the name
    (compressed-tensors' convention for ``ignore`` and ``targets``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return fnmatchcase(name, pattern)


def _set_submodule(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, layer)
