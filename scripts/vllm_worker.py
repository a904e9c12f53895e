"""What vLLM (for CPU) makes of one checkpoint folder; run by vllm_check.py in vLLM's own venv.

vLLM pins its own torch and transformers, so it lives apart from quantcli's venv
(`make test-vllm` installs it in .cache/vllm-venv) and this script talks JSON instead of
importing quantcli. Usage:

    .cache/vllm-venv/bin/python scripts/vllm_worker.py FOLDER REQUEST.json

REQUEST.json: {"prompts": [[token ids], ...], "max_new_tokens": 32, "dtype": "bfloat16"}.
Prints one JSON object on the last line of stdout:
- "parser": vLLM's compressed-tensors config parser alone, no kernel and no weights
  (`CompressedTensorsConfig.from_config`, then `get_scheme` per layer type), and the CPU
  kernel `choose_mp_linear_kernel` would pick for it. This says whether vLLM accepts the
  format even where this machine has no kernel for it (8-bit weight-only on CPU).
- "engine": `vllm.LLM` on the folder: startup time, the scheme and kernel of each layer
  type as loaded, and the greedy tokens with the top-2 log-probabilities of every step
  (their difference is the logit margin of the greedy choice).
Prompts are token ids, so tokenization and chat templates cannot differ from quantcli's.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

# before vllm is imported: a bounded KV cache, and the engine in this process so that its
# exceptions (not "engine core initialization failed") reach us and apply_model needs no
# pickling of the model function.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# vLLM for CPU quantizes the activations of 4-bit layers to int8 (W4A8) on AMX CPUs in
# bf16 by default; a W4A16 checkpoint should be run as W4A16 for a token comparison.
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")


def error_line(error: BaseException) -> str:
    """The exception as one line, with where it was raised (assertions have no message)."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    message = " ".join(str(error).split())
    if "Failed to find a kernel" in message:  # one reason per kernel tried: keep them short
        reasons = str(error).split("Reasons:")[-1].strip().splitlines()
        message = "no kernel: " + "; ".join(
            re.sub(r",\s*supported .*", "", r.strip()) for r in reasons
        )
    if not message and frame is not None:
        message = frame.line or ""
    return f"{type(error).__name__}{where}: {message}"[:1000]


def quantized_layer_types(folder: Path) -> dict[str, tuple[str, int, int]]:
    """One quantized module (it has a `weight_scale`) per layer type (e.g. `self_attn.q_proj`):
    its full name and (in, out) features."""
    from safetensors import safe_open

    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            names = set(tensors.keys())
            for name in sorted(names):
                module, _, tensor = name.rpartition(".")
                kind = re.sub(r"^.*\.layers\.\d+\.", "", module)
                if tensor != "weight_scale" or kind in found:
                    continue
                if f"{module}.weight_shape" in names:  # pack-quantized
                    out, in_ = tensors.get_tensor(f"{module}.weight_shape").tolist()
                else:
                    out, in_ = tensors.get_slice(f"{module}.weight").get_shape()
                found[kind] = (module, in_, out)
    return found


def parser_check(folder: Path, dtype) -> dict:
    """vLLM's config parser and kernel choice per layer type, without building the model."""
    import torch
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    raw = json.loads((folder / "config.json").read_text())["quantization_config"]
    try:
        config = CompressedTensorsConfig.from_config(raw)
    except Exception as error:  # what vLLM would stop on, whatever it is
        return {"ok": False, "error": error_line(error), "layers": {}}
    layers = {}
    for kind, (module, in_, out) in quantized_layer_types(folder).items():
        entry = {"scheme": None, "kernel": None, "error": None}
        try:
            scheme = config.get_scheme(torch.nn.Linear(1, 1, device="meta"), module)
        except Exception as error:
            entry["error"] = error_line(error)
            layers[kind] = entry
            continue
        if scheme is None:
            entry["scheme"] = "unquantized"
        else:
            entry["scheme"] = type(scheme).__name__
            if hasattr(scheme, "quant_type"):  # mixed-precision (WNA16) schemes
                kernel_config = MPLinearLayerConfig(
                    full_weight_shape=(in_, out),
                    partition_weight_shape=(in_, out),
                    weight_type=scheme.quant_type,
                    act_type=dtype,
                    group_size=scheme.group_size,
                    zero_points=not scheme.symmetric,
                )
                try:
                    entry["kernel"] = choose_mp_linear_kernel(kernel_config).__name__
                except Exception as error:
                    entry["error"] = error_line(error)
        layers[kind] = entry
    return {"ok": True, "error": None, "layers": layers}


def loaded_schemes(model) -> dict[str, str]:
    """The scheme (and kernel) vLLM put on each layer type of the loaded model."""
    found = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "scheme", None)
        kind = re.sub(r"^.*\.layers\.\d+\.", "", name)
        if kind in found:
            continue
        if scheme is not None:
            kernel = getattr(scheme, "kernel", None)
            found[kind] = type(scheme).__name__ + (f"/{type(kernel).__name__}" if kernel else "")
            if getattr(module, "use_w4a8", False):  # CPU int4: activations quantized to int8
                found[kind] += " (W4A8)"
        elif type(module).__name__.endswith("Linear") or type(module).__name__ == "ParallelLMHead":
            found[kind] = f"unquantized ({type(module.quant_method).__name__})"
    return found


def engine_run(folder: Path, request: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    try:
        llm = LLM(
            model=str(folder),
            dtype=request["dtype"],
            max_model_len=512,
            enforce_eager=True,
            seed=0,
        )
    except Exception as error:
        return {"ok": False, "error": error_line(error), "startup_s": None}
    startup = time.perf_counter() - started
    schemes = llm.apply_model(loaded_schemes)[0]
    params = SamplingParams(temperature=0.0, max_tokens=request["max_new_tokens"], logprobs=2)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except Exception as error:  # e.g. a kernel without this dtype
        return {"ok": False, "error": error_line(error), "startup_s": startup, "schemes": schemes}
    results = []
    for output in outputs:
        completion = output.outputs[0]
        top2 = [
            sorted(((token, entry.logprob) for token, entry in step.items()), key=lambda t: -t[1])[
                :2
            ]
            for step in completion.logprobs
        ]
        results.append({"tokens": list(completion.token_ids), "top2": top2})
    return {
        "ok": True,
        "error": None,
        "startup_s": startup,
        "schemes": schemes,
        "outputs": results,
    }


def main() -> None:
    import torch
    import vllm

    folder, request = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    dtype = getattr(torch, request["dtype"])
    result = {"vllm": vllm.__version__, "torch": torch.__version__}
    result["parser"] = parser_check(folder, dtype)
    result["engine"] = engine_run(folder, request)
    print(json.dumps(result))


if __name__ == "__main__":  # vLLM may spawn processes that re-import this file
    main()
