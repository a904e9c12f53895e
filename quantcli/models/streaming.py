"""Quantize a checkpoint on disk into a new one, one tensor at a time.

The float model is never built: its skeleton on ``meta`` tells which tensors are linear
weights; headers tell every output shape in advance, so each output shard is declared,
then filled tensor by tensor. Memory holds one float tensor and its quantized form, however
large the model. Output goes to a temporary folder beside the target, renamed when done.
"""

from __future__ import annotations

import copy
import errno
import glob
import hashlib
import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from quantcli.checkpoint import (
    ShardWriter,
    TensorInfo,
    TensorSpec,
    header_metadata,
    quantization_config,
    read_all_headers,
    read_tensor,
    shard_name,
    weight_files,
    write_index,
    write_local_source,
)
from quantcli.config import QuantConfig
from quantcli.errors import (
    CheckpointError,
    InvalidTensorError,
    QuantcliError,
    ResourceError,
    UsageError,
)
from quantcli.files import model_root, umask_mode
from quantcli.models.gptq import GPTQ_RECORD, GPTQSettings
from quantcli.models.keys import KeyLayout, Slot, UnknownLayoutError
from quantcli.models.moe import ROUTER_REASON, experts_excluded, plan_experts
from quantcli.models.replace import (
    matches,
    plan_replacement,
    quantized_weight,
    splits_into_partial_groups,
)
from quantcli.models.skeleton import build_skeleton, load_hf_config, tied_keys
from quantcli.models.source import (
    ModelSource,
    card_license,
    check_tokenizer_file,
    safetensors_copy,
    side_files,
)
from quantcli.nn.qlinear import QuantLinear, compressed_state, quantize_weight
from quantcli.runtimes import vllm_warning
from quantcli.units import format_bytes

DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3


@dataclass
class QuantizeSummary:
    """What a quantize run did, with the figures its summary prints."""

    output: Path
    quantized: list[str]
    skipped: dict[str, str]
    source_bytes: int
    output_bytes: int
    quantized_params: int  # weights of the quantized layers
    quantized_bytes: int  # their integers, scales and zero points
    shards: int
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / self.quantized_params if self.quantized_params else 0.0


@dataclass
class _Item:
    """One output module's tensors and how to produce them from the source."""

    module: str
    specs: list[TensorSpec]
    produce: Callable[[], dict[str, torch.Tensor]]
    quantized_params: int = 0


@dataclass
class _Plan:
    items: list[_Item] = field(default_factory=list)

    def add(self, item: _Item) -> None:
        self.items.append(item)

    def shards(self, max_shard_size: int) -> list[list[_Item]]:
        """Items grouped by module, modules packed into shards in order."""
        by_module: dict[str, list[_Item]] = {}
        for item in self.items:
            by_module.setdefault(item.module, []).append(item)
        shards: list[list[_Item]] = [[]]
        size = 0
        for items in by_module.values():
            module_size = sum(spec.nbytes for item in items for spec in item.specs)
            if shards[-1] and size + module_size > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].extend(items)
            size += module_size
        return shards


def quantize_checkpoint(
    source: ModelSource,
    out: Path,
    config: QuantConfig,
    *,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    command: str | None = None,
    on_start: Callable[[int], None] | None = None,
    on_tensor: Callable[[str], None] | None = None,
    allow_pickle: bool = False,
    gptq: GPTQSettings | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> QuantizeSummary:
    """Write `source` quantized per `config` to the folder `out`.

    `command` (how the user asked for this run) is recorded for the model card. `on_start`
    receives the number of output modules, `on_tensor` each one's name as it is written
    (for progress bars). `allow_pickle` converts a pickle-only source to safetensors first
    (with ``torch.load(weights_only=True)``, in a temporary folder beside `out`).
    `gptq`: quantize with GPTQ on these calibration samples instead of rounding to nearest
    (`quantcli.models.gptq`); `on_block` then receives (blocks done, blocks) as they are.
    """
    out = out.expanduser().resolve()
    _check_output_target(source, out, overwrite)
    if allow_pickle and not any(source.folder.glob("*.safetensors")):
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        pickles = [*source.folder.glob("*.bin"), *source.folder.glob("*.pt")]
        _check_free_space(out.parent, sum(path.stat().st_size for path in pickles))
        with tempfile.TemporaryDirectory(
            prefix=f"{_temporary_prefixes(out)[1]}{os.getpid()}-", dir=out.parent
        ) as tmp:
            try:
                converted = safetensors_copy(source, Path(tmp))
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise _disk_full(out) from None
                raise
            return quantize_checkpoint(
                converted,
                out,
                config,
                max_shard_size=max_shard_size,
                overwrite=overwrite,
                trust_remote_code=trust_remote_code,
                command=command,
                on_start=on_start,
                on_tensor=on_tensor,
                gptq=gptq,
                on_block=on_block,
            )
    started = time.perf_counter()
    if max_shard_size < 1:
        raise UsageError("--max-shard-size must be positive.")
    hf_config = load_hf_config(source.folder, trust_remote_code)
    if getattr(hf_config, "quantization_config", None):
        raise UsageError(
            f"{source.model_id} is already quantized: quantize the original float model instead."
        )
    files = weight_files(source.folder)
    tensors, _ = read_all_headers(files)
    skeleton = build_skeleton(hf_config, trust_remote_code=trust_remote_code)
    layout = KeyLayout(skeleton)
    moe = plan_experts(skeleton)
    report = plan_replacement(skeleton, config)
    for router in moe.routers:  # an nn.Linear router (shared_expert_gate) stays float too
        if router in report.replaced:
            report.replaced.remove(router)
        report.skipped[router] = ROUTER_REASON
    experts, excluded_experts, expert_widths = _plan_experts(skeleton, layout, moe, config)
    report.unused_excludes = [
        pattern
        for pattern in report.unused_excludes
        if not any(matches(name, pattern) for name in _all_expert_names(layout, moe))
    ]
    if report.unused_excludes:
        raise UsageError(
            f"--exclude {report.unused_excludes[0]!r} matches no linear layer of "
            f"{source.model_id}: check the pattern against `quantcli inspect` (a glob on full "
            "module names such as 'model.layers.*.mlp.down_proj', or re:REGEX)."
        )
    widths = {
        name: quantized_weight(skeleton.get_submodule(name)).shape[1]
        for name in [*report.replaced, *report.group_misfits]
    } | expert_widths
    misfits = [name for name, width in widths.items() if splits_into_partial_groups(width, config)]
    if misfits:
        raise UsageError(_group_misfit_message(widths, misfits, config))
    if not report.replaced and not experts and not report.embeddings:
        raise UsageError(
            f"{source.model_id} has no linear layer to quantize with these settings "
            f"({len(report.skipped)} kept in float)."
        )
    untie = heads_to_untie(skeleton, report.replaced, hf_config, trust_remote_code)
    quantized = [*report.replaced, *([report.embeddings] if report.embeddings else [])]
    runner = None
    if gptq is not None:  # --method gptq: block layers come from the block-by-block walk
        runner = _gptq_runner(
            skeleton,
            hf_config,
            layout,
            tensors,
            report.replaced,
            experts,
            config,
            gptq,
            trust_remote_code,
        )
        runner.on_block = on_block
    quantizer = runner.quantizer(_quantizer) if runner else _quantizer
    plan = _plan(skeleton, layout, tensors, quantized, experts, config, untie, quantizer)
    conv1d = any(isinstance(skeleton.get_submodule(name), Conv1D) for name in report.replaced)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    output_bytes = sum(spec.nbytes for item in plan.items for spec in item.specs)
    _check_free_space(out.parent, output_bytes)
    staging = Path(
        tempfile.mkdtemp(prefix=f"{_temporary_prefixes(out)[0]}{os.getpid()}-", dir=out.parent)
    )
    staging.chmod(umask_mode())  # mkdtemp's 0700 would outlive the rename
    shards = plan.shards(max_shard_size)
    try:
        metadata = header_metadata(config, source.public_name, source.revision)
        if source.local_folder is not None:
            metadata["source_sha256"] = _weights_sha256(files)
            write_local_source(staging, source.local_folder)
        metadata["source_bytes"] = str(sum(info.nbytes for info in tensors.values()))
        metadata["source_license"] = card_license(source.folder) or ""
        metadata["quantcli_command"] = command or ""
        metadata["quantized_conv1d"] = "true" if conv1d else "false"
        metadata["quantized_experts"] = "true" if experts else "false"
        metadata["quantization_method"] = "gptq" if gptq else "rtn"
        if runner:
            metadata["gptq"] = json.dumps({**gptq.describe(), "rtn_layers": runner.rtn_layers})
        if on_start:
            on_start(len({item.module for item in plan.items}))
        _write_shards(staging, shards, metadata, on_tensor)
        ignore = {layout.saved_module(name) for name in report.skipped} | set(excluded_experts)
        heads = {layout.saved_module(name) for name in report.replaced if name in report.heads}
        hf_config.quantization_config = quantization_config(config, sorted(ignore), sorted(heads))
        if untie:
            untie_word_embeddings(hf_config)
        if config.dtype is not None:
            hf_config.dtype = config.dtype
        hf_config.save_pretrained(staging)
        if runner:  # what the header could not know when it was written
            record = {**gptq.describe(), "rtn_layers": runner.rtn_layers}
            record["seconds"] = round(runner.seconds, 3)
            (staging / GPTQ_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        for path in side_files(source.folder):  # contents as regular files, never links
            if path.name != "config.json":
                shutil.copyfile(path, staging / path.name)
        _move_into_place(staging, out, overwrite)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(out) from None
        raise

    quantized_items = [item for item in plan.items if item.quantized_params]
    return QuantizeSummary(
        warnings=_warnings(config, conv1d) + _side_file_warnings(source.folder),
        output=out,
        quantized=[layout.saved_module(name) for name in quantized]
        + [name for names in experts.values() for name in names],
        skipped={layout.saved_module(name): why for name, why in report.skipped.items()}
        | dict.fromkeys(excluded_experts, "excluded expert"),
        source_bytes=int(metadata["source_bytes"]),
        output_bytes=output_bytes,
        quantized_params=sum(item.quantized_params for item in quantized_items),
        quantized_bytes=sum(s.nbytes for item in quantized_items for s in item.specs),
        shards=len(shards),
        seconds=time.perf_counter() - started,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )


def _gptq_runner(
    skeleton, hf_config, layout, tensors, replaced, experts, config, gptq, trust_remote_code
):
    """The GPTQ walk over a float32 skeleton of the model, its tensors by the model's keys.

    Refuses what the walk does not cover yet: experts (it calibrates linear layers) and
    layers saved under other names than the model's (the writer asks for saved names)."""
    from quantcli.models.gptq import GPTQRunner

    if experts:
        raise UsageError(
            "--method gptq does not quantize mixture-of-experts layers yet: use --method rtn."
        )
    renamed = [name for name in replaced if layout.saved_module(name) != name]
    if renamed:
        raise UsageError(
            f"--method gptq: transformers saves {renamed[0]} under another name "
            f"({layout.saved_module(renamed[0])}), which the GPTQ walk does not map yet: "
            "use --method rtn."
        )
    float_skeleton = build_skeleton(
        hf_config, torch.float32, trust_remote_code
    ).eval()  # no dropout
    by_key = {layout.slot(key).key: info for key, info in tensors.items()}
    return GPTQRunner(float_skeleton, by_key, replaced, config, gptq)


def _weights_sha256(files: list[Path]) -> str:
    """One sha256 over the weight files' bytes, in order: names a local source exactly
    without saying where it lies."""
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def _expert_names(layout: KeyLayout, experts: str) -> list[str]:
    """The saved module names of an experts module's matrices (``...experts.3.w1``)."""
    names = []
    for key in layout.stacked.get(experts, []):
        if not key.endswith(".weight"):
            raise UnknownLayoutError(
                f"transformers saves the experts of {experts} as '{key}', not as a "
                "module's weight: quantcli does not know this expert layout."
            )
        names.append(key.removesuffix(".weight"))
    return names


def _all_expert_names(layout: KeyLayout, moe) -> list[str]:
    """Every experts module's name and its matrices' saved names (what --exclude may name)."""
    return [name for experts in moe.experts for name in [experts, *_expert_names(layout, experts)]]


def _plan_experts(skeleton, layout, moe, config: QuantConfig):
    """The experts modules to quantize, with their saved matrices' names; the saved names
    of those kept in float by --exclude; and the input width of each quantized fused
    parameter (``...experts.gate_up_proj``), which the group size must divide."""
    quantized: dict[str, list[str]] = {}
    excluded: list[str] = []
    widths: dict[str, int] = {}
    for experts in moe.experts:
        names = _expert_names(layout, experts)
        module = skeleton.get_submodule(experts)
        stacked = {layout.saved_slots[f"{n}.weight"].key for n in names}
        if not names or stacked != {
            f"{experts}.{attr}" for attr, _ in module.named_parameters(recurse=False)
        }:
            raise UnknownLayoutError(
                f"transformers does not save the experts of {experts} one matrix per expert: "
                "quantcli does not know this expert layout."
            )
        verdict = experts_excluded(names, config, experts)
        if verdict is None:
            raise UsageError(
                f"--exclude keeps some experts of {experts} in float but not all: quantcli "
                "quantizes an experts module whole; exclude all of its experts or none."
            )
        if verdict:
            excluded.extend(names)
            continue
        quantized[experts] = names
        for attr, param in module.named_parameters(recurse=False):
            widths[f"{experts}.{attr}"] = param.shape[2]
    return quantized, excluded, widths


def _plan(
    skeleton: torch.nn.Module,
    layout: KeyLayout,
    tensors: dict[str, TensorInfo],
    replaced: list[str],
    experts: dict[str, list[str]],
    config: QuantConfig,
    untie: dict[str, str],
    quantizer: Callable | None = None,
) -> _Plan:
    """Map every source tensor to the output tensors it becomes, under the names
    ``save_pretrained`` gives them (`KeyLayout.saved`). `untie` maps tied keys (target:
    source) that the output stores apart: the head quantized, the rest copied."""
    slots = {key: layout.slot(key) for key in tensors}
    tensors = _check_tensor_names(skeleton, tensors, slots, layout)
    sources = _sources(tensors, slots, layout)  # saved key -> the tensor (or piece) holding it
    plan = _Plan()
    scale_dtypes: dict[str, torch.dtype] = {}  # saved module name -> its scales' dtype
    layers = []  # (saved module, (out, in), source tensor, stored transposed, quantizer)
    for name in replaced:
        saved = layout.saved_name(Slot(f"{name}.weight"))
        info = sources.get(saved)
        if info is None and f"{name}.weight" in untie:  # a tied head: quantized from its table
            info = sources.get(layout.saved_name(Slot(untie[f"{name}.weight"])))
        if info is None:
            raise CheckpointError(f"the checkpoint has no tensor {name}.weight for layer {name}.")
        module = skeleton.get_submodule(name)
        shape = quantized_weight(module).shape
        layers.append((saved.removesuffix(".weight"), shape, info, isinstance(module, Conv1D)))
    for names in experts.values():  # rounded to nearest: the GPTQ walk refuses experts
        layers += [(n, sources[f"{n}.weight"].shape, sources[f"{n}.weight"], False) for n in names]
    for saved_module, (out_features, in_features), info, transposed in layers:
        scale_dtypes[saved_module] = config.dtype or _stored_float(info.dtype)
        plan.add(
            _quantized_item(
                saved_module,
                out_features,
                in_features,
                info,
                config,
                scale_dtypes[saved_module],
                transposed,
                quantizer,
            )
        )
    copies = {
        layout.saved_name(Slot(target)): sources.get(layout.saved_name(Slot(origin)))
        for target, origin in untie.items()
    }
    copies = {saved: info for saved, info in copies.items() if saved not in sources and info}
    in_order = sorted(sources.items(), key=lambda kv: (str(kv[1].file), kv[1].offset))
    for saved, info in [*in_order, *copies.items()]:
        module, _, leaf = saved.rpartition(".")
        if module in scale_dtypes and leaf == "weight":
            continue
        dtype = scale_dtypes.get(module) if module in scale_dtypes else config.dtype
        if dtype is None or not info.dtype.is_floating_point:
            dtype = _stored_float(info.dtype)
        plan.add(
            _Item(
                module=module,
                specs=[TensorSpec(saved, dtype, info.shape)],
                produce=_copier(saved, info, dtype),
            )
        )
    return plan


def heads_to_untie(skeleton, replaced, hf_config, trust_remote_code) -> dict[str, str]:
    """The tied keys (target: source) to store apart because a quantized head is tied to
    the float embeddings (`--quantize-head` on SmolLM2, Llama 3.2, Qwen2.5...): the output
    config unties them (``tie_word_embeddings: false``), so every loader builds a head of
    its own, which the checkpoint holds quantized. Empty when no quantized head is tied."""
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    if not any(f"{name}.weight" in tied for name in replaced):
        return {}
    untied_config = copy.deepcopy(hf_config)
    untie_word_embeddings(untied_config)
    # as loaders will read it: some configs override the field (T5 always ties)
    reread = type(untied_config).from_dict(untied_config.to_dict())
    still_tied = build_skeleton(reread, trust_remote_code=trust_remote_code)
    still_tied = getattr(still_tied, "all_tied_weights_keys", None) or {}
    heads = [f"{name}.weight" for name in replaced if f"{name}.weight" in still_tied]
    if heads:
        raise UsageError(
            f"cannot quantize the head of this {type(skeleton).__name__}: its config ties "
            f"{heads[0]} to the embeddings whatever tie_word_embeddings says; leave out "
            "--quantize-head."
        )
    return {target: source for target, source in tied.items() if target not in still_tied}


def untie_word_embeddings(hf_config) -> None:
    """Turn off head/embedding tying in a config and in its text config (composite models
    keep it there)."""
    for config in {id(c): c for c in (hf_config, hf_config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _quantized_item(
    name, out_features, in_features, info, config, scale_dtype, transposed, quantizer=None
):
    layout = QuantLinear(in_features, out_features, False, config, scale_dtype, "meta")
    return _Item(
        module=name,
        specs=[
            TensorSpec(f"{name}.{key}", t.dtype, tuple(t.shape))
            for key, t in layout.state_dict().items()
        ],
        produce=(quantizer or _quantizer)(name, info, config, scale_dtype, transposed),
        quantized_params=out_features * in_features,
    )


def _sources(tensors, slots, layout: KeyLayout) -> dict[str, TensorInfo]:
    """Each saved key's source: the checkpoint tensor of the same slot, or the block of a
    fused ``(experts, rows, cols)`` tensor that holds it (read alone: rows are contiguous)."""
    by_slot = {slots[key]: info for key, info in tensors.items()}
    sources = {}
    for saved, slot in layout.saved_slots.items():
        info = by_slot.get(slot)
        if info is None and slot.stacked and Slot(slot.key) in by_slot:
            info = _expert_block(by_slot[Slot(slot.key)], slot)
        if info is not None:
            sources[saved] = info
    return sources


def _expert_block(fused: TensorInfo, slot: Slot) -> TensorInfo:
    experts, rows, cols = fused.shape
    block = rows // slot.parts
    itemsize = fused.nbytes // max(1, fused.numel)
    start = (slot.expert * rows + slot.part * block) * cols * itemsize
    return TensorInfo(
        f"{fused.name}[{slot.expert}, {slot.part * block}:{(slot.part + 1) * block}]",
        fused.dtype,
        (block, cols),
        fused.file,
        fused.offset + start,
        block * cols * itemsize,
    )


def _check_tensor_names(skeleton, tensors, slots, layout: KeyLayout) -> dict[str, TensorInfo]:
    """`tensors` less those transformers drops on load (legacy buffers such as GPT-2's
    ``attn.bias``); refuses a tensor the config does not describe, which would be copied
    into a checkpoint no loader accepts, one of the wrong shape, and a missing one the
    model needs (a norm weight: the model would run with garbage), except a tied head,
    which is the embeddings."""
    expected = layout.expected
    saved_slots = set(layout.saved_slots.values())
    ignored = _ignore_patterns(skeleton, "_keys_to_ignore_on_load_unexpected")
    if any(name.endswith("rotary_emb.inv_freq") for name, _ in skeleton.named_buffers()):
        ignored.append(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name, _ in skeleton.named_buffers()):
        ignored.append(r"(^|\.)position_ids$")

    def described(key: str) -> bool:
        slot = slots[key]
        return slot in saved_slots if slot.stacked else slot.key in expected

    unexpected = sorted(key for key in tensors if not described(key))
    dropped = {key for key in unexpected if any(re.search(p, key) for p in ignored)}
    unexpected = [key for key in unexpected if key not in dropped]
    if unexpected:
        raise CheckpointError(
            f"the checkpoint holds tensor '{unexpected[0]}'{_more(unexpected)}, which "
            "config.json does not describe: the weights and the config disagree."
        )
    tensors = {key: info for key, info in tensors.items() if key not in dropped}
    for key, info in tensors.items():
        slot = slots[key]
        want = (
            layout.saved[layout.saved_name(slot)]
            if slot.stacked
            else tuple(expected[slot.key].shape)
        )
        if tuple(info.shape) != want:
            raise CheckpointError(
                f"tensor '{info.name}' has shape {list(info.shape)} but config.json implies "
                f"{list(want)}: the weights and the config disagree."
            )
    optional = _ignore_patterns(skeleton, "_keys_to_ignore_on_load_missing")
    present = set(slots[key] for key in tensors)
    tied = tied_keys(skeleton, expected)
    missing = sorted(
        layout.saved_name(slot)
        for slot in saved_slots
        if slot not in present
        and not (slot.stacked and Slot(slot.key) in present)
        and slot.key not in tied
        and not any(re.search(p, slot.key) for p in optional)
    )
    if missing:
        raise CheckpointError(
            f"the checkpoint lacks tensor '{missing[0]}'{_more(missing)}, which the model "
            "needs: the files are incomplete or do not match config.json."
        )
    return tensors


def _ignore_patterns(skeleton, attribute: str) -> list[str]:
    return list(getattr(skeleton, attribute, None) or [])


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _stored_float(dtype: torch.dtype) -> torch.dtype:
    """The dtype a source tensor is written in by default: its own, except 8-bit floats
    (FP8 sources), widened to bf16, which every reader and kernel takes."""
    return torch.bfloat16 if dtype.is_floating_point and dtype.itemsize == 1 else dtype


def _warnings(config: QuantConfig, conv1d: bool) -> list[str]:
    """What the user should know about the checkpoint just written."""
    warnings = []
    if conv1d:
        warnings.append(
            "this model's Conv1D layers (GPT-2 style) are quantized: quantcli loads the "
            "checkpoint, but transformers and vLLM quantize nn.Linear only and cannot."
        )
    elif (warning := vllm_warning(config)) is not None:
        warnings.append(warning)
    return warnings


def _side_file_warnings(folder: Path) -> list[str]:
    """Side files are copied as they are, broken or not: quantize is about the weights, a
    tokenizer this `tokenizers` cannot parse may suit a newer one (or vLLM), and the
    quantized weights stay usable with a tokenizer put back later. But the user hears now
    rather than at the first `generate`."""
    try:
        check_tokenizer_file(folder)
    except CheckpointError as error:
        return [f"{error} quantize copied it as it is: generate and eval refuse it until then."]
    return []


def _group_misfit_message(widths: dict[str, int], misfits: list[str], config) -> str:
    """Why a group size cannot be used, and the group sizes that fit every layer to be
    quantized, experts included (the divisors of the widths' greatest common divisor, from 8
    up): no layer is left in float silently because its width does not split into whole
    groups."""
    common = math.gcd(*widths.values())
    fitting = [size for size in range(8, common + 1) if common % size == 0]
    first = misfits[0]
    return (
        f"--group-size {config.group_size} does not divide the input width of "
        f"{len(misfits)} layer(s) ({first}: {widths[first]}); "
        + (
            f"group sizes that fit every layer: {', '.join(map(str, fitting))}."
            if fitting
            else "no group size from 8 up fits every layer: use --granularity channel."
        )
    )


def _quantizer(name, info, config, scale_dtype, transposed):
    def produce() -> dict[str, torch.Tensor]:
        weight = read_tensor(info)
        if weight.is_floating_point() and weight.dtype.itemsize == 1:  # FP8: widen first
            weight = weight.to(scale_dtype)
        if transposed:  # GPT-2's Conv1D stores (in, out)
            weight = weight.t()
        try:
            qweight = quantize_weight(weight, config, scale_dtype)
        except InvalidTensorError as error:
            raise InvalidTensorError(f"{name}.weight: {error}") from None
        state = compressed_state(qweight.qdata, qweight.scale, qweight.zero_point, config)
        return {f"{name}.{key}": t for key, t in state.items()}

    return produce


def _copier(name, info, dtype):
    def produce() -> dict[str, torch.Tensor]:
        return {name: read_tensor(info).to(dtype)}

    return produce


def _write_shards(staging, shards, metadata, on_tensor) -> None:
    weight_map: dict[str, str] = {}
    for index, items in enumerate(shards):
        name = shard_name(index, len(shards))
        specs = [spec for item in items for spec in item.specs]
        with ShardWriter(staging / name, specs, metadata) as writer:
            for item in items:
                produced = item.produce()
                for spec in item.specs:
                    writer.write(spec.name, produced[spec.name])
                    weight_map[spec.name] = name
                if on_tensor:
                    on_tensor(item.module)
    if len(shards) > 1:
        total = sum(s.nbytes for items in shards for item in items for s in item.specs)
        write_index(staging, weight_map, total)


#: Room kept free beyond the output's size (config, tokenizer, headers, the filesystem's own).
SPACE_MARGIN = 64 << 20


def _check_free_space(folder: Path, needed: int) -> None:
    """Refuse up front when the output cannot fit, rather than fail half-way."""
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise ResourceError(
            f"the output needs about {format_bytes(needed)} but {folder} has "
            f"{format_bytes(free)} free: free some space or choose another --out."
        )


def _disk_full(out: Path) -> ResourceError:
    return ResourceError(
        f"the disk under {out.parent} filled up while writing; nothing was kept. "
        "Free some space or choose another --out."
    )


def _temporary_prefixes(out: Path) -> tuple[str, str]:
    """Names of the temporary folders beside `out`: the partial output, the safetensors
    copy of a pickle source. Both are followed by the writing process's id."""
    return f".{out.name}.partial-", f".{out.name}.unpickled-"


def _remove_stale_partials(out: Path) -> None:
    """Delete temporary folders left by runs that were killed (SIGKILL, power loss).

    Their names carry the process id; a folder whose process is gone is garbage, one whose
    process still runs belongs to a concurrent run and is left alone.
    """
    for prefix in _temporary_prefixes(out):
        for path in out.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name.removeprefix(prefix).split("-", 1)[0]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_output_target(source: ModelSource, out: Path, overwrite: bool) -> None:
    """Refuse an `out` whose replacement would lose data: the source itself, a folder inside
    it or holding it (compared after resolving links), or with `overwrite` a folder that is
    neither empty nor written by quantcli."""
    root = model_root(source.folder)
    if out == root or out.is_relative_to(root) or root.is_relative_to(out):
        raise UsageError(
            f"--out {out} is the source model's folder, inside it or around it: writing "
            "there would destroy the source; choose a folder apart from it."
        )
    if not out.exists() and not out.is_symlink():
        return
    if not overwrite:
        raise UsageError(f"{out} already exists: pass --overwrite to replace it.")
    if not _replaceable(out):
        raise UsageError(
            f"{out} is not a quantcli output: --overwrite replaces only an empty folder or "
            "one quantcli wrote; move it away or choose another --out."
        )


def _replaceable(out: Path) -> bool:
    """An empty folder, or one whose weights carry quantcli's metadata."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        _, metadata = read_all_headers(weight_files(out))
    except (QuantcliError, OSError):
        return False
    return "quantcli_version" in metadata


def _move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished folder onto `out`; an old `out` is removed only afterwards.

    Without `overwrite`, an `out` that appeared meanwhile (a concurrent run) is kept; with
    it, only a folder `_replaceable` allows is replaced.
    """
    if out.exists() and not overwrite:
        raise _appeared_meanwhile(out)
    if out.exists() and not _replaceable(out):
        raise UsageError(f"{out} appeared while quantizing and is not a quantcli output: kept it.")
    if out.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        retired.rmdir()
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        try:
            staging.rename(out)
        except OSError:  # created by a concurrent run between the check and the rename
            raise _appeared_meanwhile(out) from None


def _appeared_meanwhile(out: Path) -> UsageError:
    return UsageError(
        f"{out} appeared while quantizing (another run?): kept it; pass --overwrite to replace it."
    )
