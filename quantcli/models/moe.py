"""Mixture-of-experts layers of a model skeleton: which experts quantcli quantizes, which
routers it keeps in float, and what it refuses.

An experts module is one whose name or class says "expert" and that holds 3-D parameters
(transformers 5 fuses every expert of a layer into them). `QuantExperts` stands in for the
layout it knows (`experts_layout_problem`); any other is refused (exit 4) rather than left
in float while the run reports success. The routers are the other children of an experts
module's parent that hold a 2-D ``weight`` directly (``gate``, Qwen2-MoE's
``shared_expert_gate``): kept in float, as llm-compressor does, and listed in the
checkpoint's ``ignore``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quantcli.config import QuantConfig
from quantcli.models.keys import UnknownLayoutError
from quantcli.models.replace import matches
from quantcli.nn.qexperts import QuantExperts, experts_layout_problem

ROUTER_REASON = "router (kept in float, as llm-compressor does)"


@dataclass
class MoEPlan:
    """The experts modules and routers of a model (module names in the model)."""

    experts: list[str] = field(default_factory=list)
    routers: list[str] = field(default_factory=list)


def plan_experts(model: nn.Module) -> MoEPlan:
    """The model's experts modules and routers; refuses a layout quantcli does not know."""
    plan = MoEPlan()
    for name, module in model.named_modules():
        if not _looks_like_experts(name, module):
            continue
        problem = experts_layout_problem(module)
        if problem is not None:
            raise UnknownLayoutError(
                f"the experts module {name} ({type(module).__name__}) has {problem}: "
                "quantcli does not know this expert layout."
            )
        plan.experts.append(name)
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        for child_name, child in parent.named_children():
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if full == name or not _holds_matrices(child):
                continue  # an MLP (shared experts: plain linear layers), a norm, a bias
            problem = _router_problem(child)
            if problem is not None:
                raise UnknownLayoutError(
                    f"the router {full} ({type(child).__name__}) has {problem}: quantcli "
                    "does not know this router."
                )
            plan.routers.append(full)
    return plan


def _looks_like_experts(name: str, module: nn.Module) -> bool:
    says_expert = "expert" in name.rpartition(".")[2].lower() or (
        "expert" in type(module).__name__.lower()
    )
    return says_expert and any(p.ndim >= 3 for p in module.parameters(recurse=False))


def _holds_matrices(module: nn.Module) -> bool:
    """Whether `module` itself holds a tensor of 2 or more dimensions (a router's weight)."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(tensor.ndim >= 2 for tensor in tensors)


def _router_problem(module: nn.Module) -> str | None:
    """A router holds a 2-D ``weight`` (experts or 1, hidden), and at most 1-D extras
    (DeepSeek-V3's ``e_score_correction_bias``)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return "no 2-D weight"
    others = [
        name
        for name, tensor in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]
        if name != "weight" and tensor.ndim > 1
    ]
    if others or any(True for _ in module.children()):
        return f"tensors or submodules beside its weight ({', '.join(others) or 'children'})"
    return None


def experts_excluded(names: list[str], config: QuantConfig, module: str = "") -> bool | None:
    """Whether `config` excludes an experts module's saved expert matrices: all (True: a
    pattern names them all, or the experts `module` itself), none (False); None when it
    excludes some but not all."""
    if module and any(matches(module, pattern) for pattern in config.exclude):
        return True
    hits = [any(matches(name, pattern) for pattern in config.exclude) for name in names]
    if all(hits):
        return True
    if not any(hits):
        return False
    return None


def replace_experts(model: nn.Module, names: list[str], config: QuantConfig) -> None:
    """Put an empty `QuantExperts` (meta) in place of each named experts module."""
    for name in names:
        experts = model.get_submodule(name)
        dtype = config.dtype or experts.gate_up_proj.dtype
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, QuantExperts.like(experts, config, dtype))
