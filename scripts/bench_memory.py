"""Memory and time of `quantcli quantize` and `quantcli load` (prints a table).

Each command runs in its own process; its peak RSS (whole process, as the kernel counts
it) is compared with the peak of a process that only imports quantcli, torch and
transformers. Models: the real SmolLM2-135M, and synthetic Llamas with random bf16 weights
of two sizes, to show that quantize memory does not grow with the model. GPTQ
(`--method gptq`, int4 g32) runs on the smaller Llama only (--gptq-layers): it holds a
block's float32 weights, the calibration samples' activations and the Hessians of its
largest layer, and must stay below the float checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import write_markdown
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from smollm2 import smollm2_folder
from transformers import LlamaConfig

from quantcli.models.calibration import DEFAULT_SAMPLES, default_calibration
from quantcli.models.skeleton import build_skeleton

MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); "
    "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(r.returncode, time.perf_counter() - t, "
    "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
    "sys.stderr.write(r.stderr if r.returncode else '')"
)


def measure(*command: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one command run in a fresh child process."""
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, check=True
    )
    code, seconds, peak = result.stdout.split()
    if code != "0":
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return float(seconds), int(peak)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def synthetic_llama(folder: Path, layers: int) -> Path:
    """A Llama with random bf16 weights, one shard per decoder layer, written layer by layer."""
    if (folder / "config.json").exists():
        return folder
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shapes = {k: t.shape for k, t in build_skeleton(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for key in shapes:
        group = ".".join(key.split(".")[:3]) if key.startswith("model.layers.") else "other"
        groups.setdefault(group, []).append(key)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for index, keys in enumerate(groups.values()):
        name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=generator) * 0.02).bfloat16() for k in keys}
        save_file(tensors, staging / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        total += sum(t.numel() * 2 for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (staging / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(staging)
    staging.rename(folder)
    return folder


def add_tokenizer(folder: Path, vocab_size: int) -> None:
    """Give a synthetic Llama a tokenizer, which GPTQ needs to cut its calibration text:
    a byte-level BPE learnt from that text (quantcli's shipped default), its ids below the
    model's vocabulary size. The weights are random, so what the tokens mean is immaterial;
    only their number counts (samples × seq_len)."""
    if (folder / "tokenizer.json").exists():
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 8000),
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([default_calibration().text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 24])
    parser.add_argument(
        "--gptq-layers", type=int, nargs="*", default=[8], help="Llamas that also get GPTQ"
    )
    parser.add_argument(
        "--gptq-samples", type=int, default=DEFAULT_SAMPLES, help="GPTQ calibration samples"
    )
    parser.add_argument("--threads", type=int, help="quantcli's --threads (default: its own)")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    console = Console(width=200)
    models = {"SmolLM2-135M (bf16)": smollm2_folder(args.cache)}
    gptq_models = set()
    for layers in args.layers:
        started = time.perf_counter()
        folder = synthetic_llama(args.cache / "bench" / f"llama-2048x{layers}", layers)
        console.print(
            f"synthetic Llama {layers} layers ready ({time.perf_counter() - started:.0f} s)"
        )
        models[f"Llama 2048 x {layers} layers (bf16)"] = folder
        if layers in args.gptq_layers:
            add_tokenizer(folder, LlamaConfig.from_pretrained(folder).vocab_size)
            gptq_models.add(folder)
    threads = ["--threads", str(args.threads)] if args.threads else []

    # the imports every run pays: quantcli, torch, transformers and the model's own module
    _, baseline = measure(
        sys.executable,
        "-c",
        "import quantcli.cli.quantcli; from transformers import LlamaForCausalLM",
    )
    table = Table(title=f"Peak RSS over the bare imports ({baseline / 1e6:.0f} MB)")
    for column in (
        "model",
        "scheme",
        "float size",
        "quantized size",
        "quantize time",
        "quantize peak - imports",
        "x float size",
        "load time",
        "load peak - imports",
        "x quantized size",
    ):
        table.add_column(column)
    for label, folder in models.items():
        schemes = {"int8": ["--bits", "8"], "int4 g32": ["--bits", "4"]}
        if folder in gptq_models:
            gptq = ["--method", "gptq", "--samples", str(args.gptq_samples)]
            schemes[f"int4 g32 gptq ({args.gptq_samples}×512)"] = ["--bits", "4", *gptq]
        for scheme, options in schemes.items():
            out = args.cache / "bench" / "out"
            q_time, q_peak = measure(
                sys.executable,
                "-m",
                "quantcli",
                "quantize",
                str(folder),
                "--out",
                str(out),
                *options,
                *threads,
                "--overwrite",
                "--json",
            )
            l_time, l_peak = measure(
                sys.executable, "-m", "quantcli", "load", str(out), *threads, "--json"
            )
            source, quantized = folder_bytes(folder), folder_bytes(out)
            table.add_row(
                label,
                scheme,
                f"{source / 1e9:.2f} GB",
                f"{quantized / 1e9:.2f} GB",
                f"{q_time:.1f} s",
                f"{(q_peak - baseline) / 1e6:.0f} MB",
                f"{(q_peak - baseline) / source:.2f}",
                f"{l_time:.1f} s",
                f"{(l_peak - baseline) / 1e6:.0f} MB",
                f"{(l_peak - baseline) / quantized:.2f}",
            )
            shutil.rmtree(out)
    note = f"quantize and load with `--threads {args.threads}`." if args.threads else ""
    console.print(table, note)
    if args.docs:
        write_markdown(table, "memory", note)


if __name__ == "__main__":
    main()
