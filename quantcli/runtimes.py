"""Where a checkpoint runs: quantcli, transformers and vLLM, per scheme.

Users find out where a checkpoint runs before they try: `quantize` warns when no vLLM
kernel serves the scheme, and `inspect` and the model card print these verdicts. Each one
says where it comes from: a test in this repository, `make test-vllm` (vLLM for CPU, run
on SmolLM2), or vLLM's own kernel-selection source where no GPU was at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

from quantcli.config import Granularity, QuantConfig

# vLLM 0.32, model_executor/layers/quantization/utils/marlin_utils.py (besides per channel)
MARLIN_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Verdict:
    runtime: str
    runs: bool
    why: str

    def __str__(self) -> str:
        return f"{'yes' if self.runs else 'no'}: {self.why}"


def where_it_runs(
    config: QuantConfig, conv1d: bool = False, experts: bool = False
) -> list[Verdict]:
    """Whether quantcli, transformers, vLLM on GPUs and vLLM on CPUs run `config`'s output.

    `conv1d`: the model's quantized layers include GPT-2-style Conv1D, which only quantcli
    can quantize. `experts`: it holds quantized mixture-of-experts matrices.
    """
    cpu = _vllm(config, conv1d, gpu=False)
    if experts and cpu.runs:
        cpu = _vllm_experts(config)
    return [
        Verdict("quantcli", True, "CPU and CUDA, every scheme (tested)"),
        _transformers(config, conv1d),
        _vllm(config, conv1d, gpu=True),
        cpu,
    ]


def _vllm_experts(config: QuantConfig) -> Verdict:
    """vLLM 0.32 for CPU runs quantized experts with one kernel (CPUExpertsInt4, AMX CPUs):
    symmetric int4 in groups other than 32 (make test-vllm, tiny Mixtral)."""
    name = "vLLM (CPU)"
    if config.symmetric and config.bits == 4 and config.group_size not in (None, 32):
        return Verdict(name, True, "experts on its AMX MoE kernel, same tokens (make test-vllm)")
    return Verdict(
        name,
        False,
        "its CPU MoE kernel takes symmetric int4 in groups other than 32 only (make test-vllm)",
    )


def _transformers(config: QuantConfig, conv1d: bool) -> Verdict:
    name = "transformers"
    if conv1d:
        return Verdict(name, False, "compressed-tensors quantizes nn.Linear only, not Conv1D")
    if config.quantize_embeddings:
        return Verdict(
            name,
            False,
            "its loader reads embed_tokens.weight, which a quantized table lacks (tested)",
        )
    if not config.symmetric:
        return Verdict(
            name,
            False,
            "compressed-tensors 0.20 cannot load asymmetric packed zero points "
            "(llm-compressor#1618; tested)",
        )
    return Verdict(name, True, "with compressed-tensors, same logits as quantcli (tested)")


def _vllm(config: QuantConfig, conv1d: bool, gpu: bool) -> Verdict:
    name = "vLLM (GPU)" if gpu else "vLLM (CPU)"
    if conv1d:
        return Verdict(name, False, "quantizes nn.Linear only, not Conv1D")
    if config.quantize_embeddings:
        return Verdict(
            name,
            False,
            "a head tied to a quantized table is refused ('VocabParallelEmbedding' object has "
            "no attribute 'weight': make test-vllm, in model code GPUs share); an untied "
            "quantized table was not measured",
        )
    if config.granularity is Granularity.TENSOR:
        return Verdict(name, False, "its WNA16 scheme needs channel or group scales")
    if config.bits == 2:
        return Verdict(name, False, "no 2-bit kernel")
    if gpu:
        if config.granularity is Granularity.GROUP and config.group_size not in MARLIN_GROUP_SIZES:
            sizes = ", ".join(map(str, MARLIN_GROUP_SIZES))
            return Verdict(name, False, f"its Marlin kernel takes groups of {sizes} only")
        if config.bits == 8 and not config.symmetric:
            return Verdict(name, False, "Marlin serves 8-bit symmetric only")
        return Verdict(name, True, "Marlin WNA16 kernel (from vLLM 0.32's source; no GPU run)")
    if config.bits == 8:
        return Verdict(name, False, "its WNA16 kernel serves 4-bit only (make test-vllm)")
    if config.granularity is Granularity.GROUP and config.group_size % 2:
        return Verdict(name, False, "its WNA16 kernel takes even group sizes only")
    return Verdict(name, True, "same greedy tokens as quantcli (make test-vllm)")


def checkpoint_runtimes(config: QuantConfig, metadata: dict[str, str]) -> list[Verdict]:
    """`where_it_runs` for a written checkpoint (quantcli records whether it quantized
    Conv1D layers; other writers never do)."""
    return where_it_runs(
        config,
        metadata.get("quantized_conv1d") == "true",
        metadata.get("quantized_experts") == "true",
    )


def vllm_warning(config: QuantConfig, conv1d: bool = False) -> str | None:
    """The warning `quantize` prints when neither vLLM on GPUs nor on CPUs serves `config`."""
    gpu, cpu = _vllm(config, conv1d, gpu=True), _vllm(config, conv1d, gpu=False)
    if gpu.runs or cpu.runs:
        return None
    return f"vLLM cannot serve this checkpoint ({gpu.why}); it runs in quantcli" + (
        " and transformers." if _transformers(config, conv1d).runs else "."
    )
