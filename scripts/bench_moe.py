"""Mixture-of-experts figures: a ~1B random Mixtral, quantized by quantcli (prints a table).

The model: a seeded random-weight Mixtral of realistic shape (8 experts, top-2, hidden
1024, intermediate 2816, 13 layers, vocabulary 32000: 1.0B parameters), saved once in bf16
under ``CACHE/bench``. For each scheme (int8 channel, int4 sym g64, int4 asym g32):

- quantize: `quantize_checkpoint` in a child process of its own, so that its peak RSS
  (``ru_maxrss``) is that run's alone; the child times the call itself (imports excluded)
  and also reports its peak after the imports;
- size on disk of the safetensors files, float source against quantized output;
- logits error against the float model, both in float32 (quantcli's loaded with
  ``dtype=torch.float32``), on fixed random token ids: max abs error over max abs float
  logit, mean KL(float || quantized) per token, top-1 agreement;
- decode: eager greedy tokens/s after a 16-token prompt (prefill excluded, as
  bench_generate measures it), quantcli loaded with its defaults (`quantcli.load(path)`
  picks the dtype), against the faster of the bf16 and fp32 float models. The float
  baseline and the quantized model are timed in alternation, best of a few runs each, so
  that the shared machine's noise falls on both alike.

At most one float and one quantized model are in memory at a time.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_generate import timed_generate
from bench_memory import folder_bytes
from report import write_markdown
from rich.console import Console
from rich.table import Table

SCHEMES = {
    "int8 sym channel": {"bits": 8},
    "int4 sym g64": {"bits": 4, "scheme": "sym", "group_size": 64},
    "int4 asym g32": {"bits": 4},
}


def random_mixtral(folder: Path, layers: int) -> Path:
    """A seeded random Mixtral (8 experts, top-2) saved in bf16; reused when present."""
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    staging = folder.with_name(folder.name + ".partial")
    model.save_pretrained(staging)
    staging.rename(folder)
    return folder


def quantize_child(source: str, out: str, options: str) -> None:
    """Run in a child process: quantize, print seconds and peak RSS (after imports, after)."""
    from quantcli.config import QuantConfig
    from quantcli.models.source import resolve_model
    from quantcli.models.streaming import quantize_checkpoint

    imports_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    config = QuantConfig(**json.loads(options))
    quantize_checkpoint(resolve_model(source), Path(out), config, overwrite=True)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak": peak, "imports_peak": imports_peak}))


#: Linux keeps ``ru_maxrss`` across exec, so a child forked from this (large) process would
#: report our peak: the quantize child is started from a small intermediate process instead.
SPAWN = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"


def quantize(source: Path, out: Path, options: dict) -> dict:
    command = [sys.executable, __file__, "--quantize-child", str(source), str(out)]
    result = subprocess.run(
        [sys.executable, "-c", SPAWN, *command, json.dumps(options)],
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise SystemExit(f"quantize {options} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def float_model(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits[0].float()


def logits_error(reference: torch.Tensor, ours: torch.Tensor) -> dict:
    log_p = torch.log_softmax(reference, dim=-1)
    log_q = torch.log_softmax(ours, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    return {
        "relative": float((ours - reference).abs().max() / reference.abs().max()),
        "kl": float(kl.mean()),
        "top1": float((ours.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def decode_rates(models: list, new_tokens: int, runs: int) -> list[float]:
    """Greedy decode tokens/s of each model (16-token prompt, prefill excluded), the models
    timed in alternation, best of `runs` each."""
    vocab = models[0].config.vocab_size
    prompt = torch.randint(100, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    for model in models:
        timed_generate(model, prompt, 4, {})  # warm-up
    first = [float("inf")] * len(models)
    full = [float("inf")] * len(models)
    for _ in range(runs):
        for index, model in enumerate(models):
            first[index] = min(first[index], timed_generate(model, prompt, 1, {}))
            full[index] = min(full[index], timed_generate(model, prompt, new_tokens, {}))
    return [(new_tokens - 1) / max(f - s, 1e-9) for f, s in zip(full, first, strict=True)]


def free() -> None:
    gc.collect()


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--quantize-child":
        quantize_child(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--tokens", type=int, default=128, help="token ids for the logits")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=1, help="decode runs (best of)")
    parser.add_argument("--only", nargs="+", choices=list(SCHEMES), help="schemes to run")
    parser.add_argument("--keep", action="store_true", help="keep the quantized checkpoints")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/moe.md")
    args = parser.parse_args()
    import quantcli

    console = Console(width=200)
    started = time.perf_counter()
    folder = random_mixtral(args.cache / "bench" / f"mixtral-1024x{args.layers}", args.layers)
    source_bytes = folder_bytes(folder)
    console.print(
        f"{folder.name}: {source_bytes / 1e9:.2f} GB bf16 ({time.perf_counter() - started:.0f} s)"
        f", {torch.get_num_threads()} threads"
    )

    # the float reference (fp32 logits) and the faster float dtype for decode
    ids = torch.randint(100, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    model = float_model(folder, torch.float32)
    parameters = sum(p.numel() for p in model.parameters())
    reference = logits(model, ids)
    float_rates = {"fp32": decode_rates([model], args.new_tokens, args.runs)[0]}
    del model
    free()
    model = float_model(folder, torch.bfloat16)
    float_rates["bf16"] = decode_rates([model], args.new_tokens, args.runs)[0]
    base = max(float_rates, key=float_rates.get)
    console.print(
        f"{parameters / 1e9:.2f}B parameters; float decode: "
        + ", ".join(f"{k} {v:.2f} tok/s" for k, v in float_rates.items())
        + f"; baseline {base}"
    )
    if base != "bf16":
        del model
        free()
        model = float_model(folder, torch.float32)
    baseline = model

    table = Table(
        "variant",
        "size on disk",
        "× smaller",
        "quantize s",
        "quantize peak RSS",
        "max abs Δlogit / max abs logit",
        "mean KL / token",
        "top-1 agree",
        "decode tok/s",
        f"float {base} tok/s (same run)",
        "× float",
        title=f"Random Mixtral, {parameters / 1e9:.2f}B parameters "
        f"(8 experts, top-2, hidden 1024, {args.layers} layers)",
    )
    table.add_row(
        "float bf16 (source)",
        f"{source_bytes / 1e9:.2f} GB",
        "1.00",
        "",
        "",
        "",
        "",
        "",
        "",
        ", ".join(f"{k} {v:.2f}" for k, v in float_rates.items()),
        "",
    )
    for label, options in SCHEMES.items():
        if args.only and label not in args.only:
            continue
        out = args.cache / "bench" / f"{folder.name}-{label.replace(' ', '-')}"
        run = quantize(folder, out, options)
        size = folder_bytes(out)
        console.print(
            f"{label}: quantized in {run['seconds']:.0f} s, peak {run['peak'] / 1e9:.2f} GB "
            f"(imports {run['imports_peak'] / 1e9:.2f} GB), {size / 1e9:.2f} GB"
        )
        quantized = quantcli.load(str(out), dtype=torch.float32)
        error = logits_error(reference, logits(quantized, ids))
        del quantized
        free()
        quantized = quantcli.load(str(out))
        dtype = str(next(quantized.model.norm.parameters()).dtype).removeprefix("torch.")
        ours, theirs = decode_rates([quantized, baseline], args.new_tokens, args.runs)
        del quantized
        free()
        console.print(
            f"{label}: max err {error['relative']:.4f} of max logit, KL {error['kl']:.2e}, "
            f"top-1 {error['top1']:.3f}; decode {ours:.2f} tok/s ({dtype}) vs {base} "
            f"{theirs:.2f}"
        )
        table.add_row(
            f"quantcli {label} ({dtype})",
            f"{size / 1e9:.2f} GB",
            f"{source_bytes / size:.2f}",
            f"{run['seconds']:.0f}",
            f"{run['peak'] / 1e9:.2f} GB",
            f"{error['relative']:.4f}",
            f"{error['kl']:.2e}",
            f"{error['top1']:.3f}",
            f"{ours:.2f}",
            f"{theirs:.2f}",
            f"{ours / theirs:.2f}",
        )
        if not args.keep:
            import shutil

            shutil.rmtree(out)
    console.print(table)
    console.print(f"total {time.perf_counter() - started:.0f} s")
    if args.docs:
        write_markdown(
            table,
            "moe",
            f"Random weights (seeded): the logit columns check the arithmetic of quantized "
            f"experts, not the quality of a real model. Logits: {args.tokens} random token ids"
            f", both sides in float32. Decode: greedy, eager, {args.new_tokens} new tokens "
            "after a 16-token prompt, prefill excluded; quantcli loaded with its default "
            f"dtype (in brackets), timed in alternation with the float {base} model (the "
            "faster float dtype here), best of "
            f"{args.runs} run(s). Quantize: `quantize_checkpoint` alone in a child process "
            "(peak RSS of that process, imports included). "
            f"`python scripts/bench_moe.py --docs` (`make bench`).",
        )


if __name__ == "__main__":
    main()
