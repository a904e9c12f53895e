"""GPTQ over a checkpoint on disk, one decoder block at a time.

The float model is never built whole: the skeleton (on ``meta``) gets real weights for the
modules before the blocks (embeddings...), the calibration samples run up to the first
block, where a hook records what the model passes it (hidden states, attention mask,
rotary position embeddings...) and stops the forward. Then, block after block: its weights
are read from the safetensors files and its linears are quantized stage by stage ("true
sequential", as the reference code, AutoGPTQ and llm-compressor do): the linears that read
one input (q/k/v; then o_proj; then gate/up; then down_proj, found by watching one forward)
get their Hessians from the recorded inputs run through the block with the stages before
them already quantized, and are GPTQ-quantized; finally the inputs run through the whole
quantized block to give the next block's inputs, and its weights are freed.

The blocks are found from the structure (the largest ``nn.ModuleList`` of identical
modules: Llama's ``model.layers``, GPT-2's ``transformer.h``, OPT's
``model.decoder.layers``), not from a list of families. The checkpoint writer asks for
each layer's tensors in model order (`GPTQRunner.quantizer`), which advances the walk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantcli.checkpoint import TensorInfo, read_tensor
from quantcli.config import QuantConfig
from quantcli.errors import CheckpointError, InvalidTensorError
from quantcli.models.calibration import CalibrationSet
from quantcli.models.replace import linear_weight
from quantcli.nn.qlinear import compressed_state
from quantcli.tensor.gptq import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DAMP,
    Hessian,
    gptq_quantize,
    prepare_hessian,
)

#: Written beside a GPTQ checkpoint: the method's settings and the time it took.
GPTQ_RECORD = "quantcli_gptq.json"
#: Calibration samples run through a block at once (activations: batch × seq_len × hidden):
#: 4, because a forward's intermediate activations are GPTQ's memory peak (a 2048-wide Llama
#: at 512 tokens: 46 MB per sample in its MLP alone) and 8 put it above the float model's size.
BATCH = 4


@dataclass(frozen=True)
class GPTQSettings:
    calibration: CalibrationSet
    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK_SIZE
    act_order: bool = False

    def describe(self) -> dict:
        return {
            "method": "gptq",
            "calibration": self.calibration.describe(),
            "damp": self.damp,
            "block_size": self.block_size,
            "act_order": self.act_order,
            "true_sequential": True,
        }


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of blocks: its largest ``nn.ModuleList`` (by parameters) whose
    members are all of one class. Refuses encoder-decoders (two stacks) and models with none."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise CheckpointError(
            f"GPTQ walks decoder-only models; {type(model).__name__} is an encoder-decoder: "
            "use --method rtn."
        )
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise CheckpointError(
            f"GPTQ cannot walk {type(model).__name__}: it has no list of identical blocks "
            "(nn.ModuleList) to run one at a time; use --method rtn."
        )
    return best


class _Stop(Exception):
    """Raised by a hook (on the first block; on a stage's last linear): the model ran as
    far as it needs to."""


@dataclass
class GPTQRunner:
    """Walks the blocks on demand and hands out each quantized layer's tensors."""

    skeleton: nn.Module
    tensors: dict[str, TensorInfo]  # by the model's key
    replaced: list[str]
    config: QuantConfig
    settings: GPTQSettings
    on_block: Callable[[int, int], None] | None = None
    blocks_name: str = ""
    rtn_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    _next: int = 0
    _ready: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _inputs: list = field(default_factory=list)
    _stage_cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.blocks_name, self.blocks = find_blocks(self.skeleton)
        prefix = f"{self.blocks_name}."
        self._block_of = {}
        for name in self.replaced:
            if name.startswith(prefix):
                self._block_of[name] = int(name[len(prefix) :].split(".", 1)[0])
            elif isinstance(self.skeleton.get_submodule(name), nn.Embedding) or name in _heads(
                self.skeleton
            ):
                self.rtn_layers.append(name)  # no activations to calibrate on: RTN
            else:
                raise CheckpointError(
                    f"GPTQ cannot reach {name}: it lies outside {self.blocks_name}, the "
                    "blocks it runs one at a time; --exclude it or use --method rtn."
                )

    def quantizer(self, rtn: Callable) -> Callable:
        """A drop-in for the writer's per-layer quantizer: GPTQ for block layers, `rtn`
        (round to nearest) for the head and the embeddings."""

        def make(name, info, config, scale_dtype, transposed):
            if name not in self._block_of:
                return rtn(name, info, config, scale_dtype, transposed)
            self._scale_dtypes[name] = scale_dtype
            return lambda: self._take(name)

        self._scale_dtypes: dict[str, torch.dtype] = {}
        return make

    # the walk

    def _take(self, name: str) -> dict[str, torch.Tensor]:
        if name in self._done:
            raise RuntimeError(f"{name} was asked for twice")  # a writer bug, not the user's
        while name not in self._ready:
            self._run_block()
        self._done.add(name)
        return self._ready.pop(name)

    def _run_block(self) -> None:
        started = time.perf_counter()
        if not self._inputs:
            self._capture_inputs()
        index = self._next
        if index >= len(self.blocks):
            raise RuntimeError("ran past the last block")  # a writer bug
        block = self.blocks[index]
        prefix = f"{self.blocks_name}.{index}"
        _load(self.skeleton, prefix, self.tensors)
        layers = {
            name: self.skeleton.get_submodule(name)
            for name, i in self._block_of.items()
            if i == index
        }
        stages, once = self._stages_of(block, prefix, layers)
        for group in stages:
            self._quantize_stage(block, {name: layers[name] for name in group}, stop=once)
        self._forward(block, keep=True)  # the next block's inputs, through quantized weights
        _unload(block)
        self._next += 1
        self.seconds += time.perf_counter() - started
        if self.on_block:
            self.on_block(self._next, len(self.blocks))

    def _stages_of(self, block, prefix: str, layers: dict[str, nn.Module]) -> tuple:
        """`_stages`, watched once per kind of block: blocks of one class with the same
        linears call them in the same order (a forward of the first batch saved per block)."""
        relative = tuple(name.removeprefix(f"{prefix}.") for name in layers)
        key = (type(block), relative)
        if key not in self._stage_cache:
            stages, once = self._stages(block, layers)
            named = [[name.removeprefix(f"{prefix}.") for name in group] for group in stages]
            self._stage_cache[key] = named, once
        named, once = self._stage_cache[key]
        return [[f"{prefix}.{name}" for name in group] for group in named], once

    def _stages(self, block, layers: dict[str, nn.Module]) -> tuple[list[list[str]], bool]:
        """The block's linears in the order its forward calls them, grouped by the input
        they read (q/k/v one stage, then o_proj, then gate/up, then down_proj): one batch
        is run through the float block to see it, so no list per family is needed. Also
        whether each linear runs once per forward (then a stage's forward may stop as
        soon as its linears have read their inputs)."""
        seen: list[tuple[torch.Tensor, list[str]]] = []

        def record(name, x):
            if seen and seen[-1][0] is x:
                seen[-1][1].append(name)
            else:
                seen.append((x, [name]))

        hooks = [
            module.register_forward_pre_hook(lambda _m, args, name=name: record(name, args[0]))
            for name, module in layers.items()
        ]
        try:
            self._forward(block, inputs=self._inputs[:1])
        finally:
            for hook in hooks:
                hook.remove()
        stages, placed = [], set()
        for _, names in seen:
            names = [name for name in names if name not in placed]  # a layer run twice: once
            placed.update(names)
            if names:
                stages.append(names)
        missing = [name for name in layers if name not in placed]
        if missing:
            raise CheckpointError(
                f"GPTQ cannot walk {type(self.skeleton).__name__}: the forward of "
                f"{self.blocks_name} never ran {missing[0]}; use --method rtn."
            )
        return stages, sum(len(names) for _, names in seen) == len(layers)

    def _quantize_stage(self, block: nn.Module, layers: dict[str, nn.Module], stop: bool):
        """Accumulate the Hessians of one stage's layers on the block's inputs, through the
        stages before it already quantized ("true sequential"), then GPTQ them. Layers that
        read the same tensor (q/k/v, gate/up) share one Hessian and one Cholesky. With
        `stop` (each linear runs once per forward), a sample's forward ends once every
        layer of the stage has read its input: the rest of the block computes nothing
        this stage needs."""
        hessians: dict[str, Hessian] = {}  # by the first layer to read each input
        last: list = [None, None]  # the tensor read last, and its first reader
        sources: dict[str, set[str]] = {name: set() for name in layers}
        read: set[str] = set()  # the stage's layers that have read this sample's input

        def accumulate(name, x):
            if last[0] is not x or not stop:  # a linear run twice a forward: its own sum
                last[:] = [x, name]
                if name not in hessians:
                    hessians[name] = Hessian(x.shape[-1])
                hessians[name].add(x)
            sources[name].add(last[1])
            read.add(name)
            if stop and len(read) == len(layers):
                read.clear()
                raise _Stop

        hooks = [
            module.register_forward_pre_hook(
                lambda _module, args, name=name: accumulate(name, args[0])
            )
            for name, module in layers.items()
        ]
        try:
            self._forward(block)
        finally:
            for hook in hooks:
                hook.remove()
        last.clear()
        shared = [names for names in sources.values() if len(names) != 1]
        if shared:  # a layer read inputs first read by different layers: no one Hessian
            raise CheckpointError(
                f"GPTQ cannot walk {type(self.skeleton).__name__}: a linear of "
                f"{self.blocks_name} reads inputs it shares with different layers in turn; "
                "use --method rtn."
            )
        prepared = {}  # one Cholesky per distinct input
        for name, module in layers.items():
            (source,) = sources[name]
            if source not in prepared:  # H is spent making its factor (memory: one copy)
                settings = self.settings
                prepared[source] = prepare_hessian(
                    hessians.pop(source), settings.damp, settings.act_order
                )
            self._ready[name] = self._quantize(name, module, prepared[source])

    def _quantize(self, name: str, module: nn.Module, ready: tuple) -> dict:
        weight = linear_weight(module).detach()
        dtype = self._scale_dtypes[name]
        try:
            qweight = gptq_quantize(
                weight,
                None,
                self.config.bits,
                self.config.scheme,
                self.config.granularity,
                self.config.group_size,
                dtype,
                damp=self.settings.damp,
                block_size=self.settings.block_size,
                optimize=self.config.optimize,
                act_order=self.settings.act_order,
                prepared=ready,
            )
        except InvalidTensorError as error:
            raise InvalidTensorError(f"{name}.weight: {error}") from None
        # the next block sees this layer as the checkpoint will hold it
        restored = qweight.dequantize(dtype).float()
        module.weight.data = restored.t().contiguous() if isinstance(module, Conv1D) else restored
        state = compressed_state(qweight.qdata, qweight.scale, qweight.zero_point, self.config)
        return {f"{name}.{key}": t for key, t in state.items()}

    def _forward(self, block: nn.Module, keep: bool = False, inputs=None) -> None:
        outputs = []
        with torch.no_grad():
            for hidden, args, kwargs in self._inputs if inputs is None else inputs:
                try:
                    output = block(hidden, *args, **kwargs)
                except _Stop:  # a stage's hook has what it needs (never with keep)
                    continue
                if keep:
                    output = output[0] if isinstance(output, tuple) else output
                    outputs.append((output, args, kwargs))
        if keep:
            self._inputs = outputs

    def _capture_inputs(self) -> None:
        """Run the calibration samples up to the first block, recording its inputs."""
        outside = [
            name
            for name, _ in self.skeleton.named_parameters()
            if not name.startswith(f"{self.blocks_name}.")
            and name not in _head_weights(self.skeleton)
        ]
        for name in outside:
            if name in self.tensors:
                _set_parameter(self.skeleton, name, read_tensor(self.tensors[name]).float())
        recorded = []

        def record(_module, args, kwargs):
            if "hidden_states" in kwargs:
                args = (kwargs.pop("hidden_states"), *args)
            recorded.append((args[0], args[1:], kwargs))
            raise _Stop

        hook = self.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        ids = self.settings.calibration.input_ids
        try:
            with torch.no_grad():
                for start in range(0, len(ids), BATCH):
                    try:
                        self.skeleton(input_ids=ids[start : start + BATCH], use_cache=False)
                    except _Stop:
                        continue
                    raise CheckpointError(
                        f"GPTQ cannot walk {type(self.skeleton).__name__}: its forward never "
                        f"reached {self.blocks_name}.0; use --method rtn."
                    )
        finally:
            hook.remove()
        for name in outside:  # the embeddings are done with: back to meta
            _set_parameter(self.skeleton, name, None)
        self._inputs = recorded


def _heads(model: nn.Module) -> set[str]:
    from quantcli.models.replace import output_head_names

    return output_head_names(model)


def _head_weights(model: nn.Module) -> set[str]:
    return {f"{name}.weight" for name in _heads(model)}


def _set_parameter(model: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters[leaf]
    value = old.to("meta") if tensor is None else tensor
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _load(model: nn.Module, prefix: str, tensors: dict[str, TensorInfo]) -> None:
    """Give the block at `prefix` its float32 weights from the checkpoint."""
    for name, _ in model.get_submodule(prefix).named_parameters():
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise CheckpointError(f"the checkpoint has no tensor {key}, which GPTQ runs.")
        _set_parameter(model, key, read_tensor(tensors[key]).float())


def _unload(block: nn.Module) -> None:
    for name, _ in list(block.named_parameters()):
        _set_parameter(block, name, None)
