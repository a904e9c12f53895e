"""What each scheme costs in quality on the real SmolLM2-135M (prints a table).

Every variant reads the same 512-token windows of the text shipped with quantcli (16k
tokens scored) and is compared with the original model run in float32: perplexity,
ΔPPL %, mean KL(original || variant) per token, top-1 agreement, and the size of the
quantized layers. Quantized variants also run in float32 (`quantcli eval`'s default), so
the figures are what the weights lost; "bf16 activations" shows what bf16 alone costs.
When installed (`make bench` puts them in `.cache/peers`), optimum-quanto int8/int4 join.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from bench_generate import checkpoint_path, installed, quanto_model
from report import write_markdown
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantcli
from quantcli.config import QuantConfig
from quantcli.models.evaluation import default_text, evaluate
from quantcli.models.loading import summarize_folder
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint

SCHEMES = {
    "int8 sym channel": QuantConfig(bits=8),
    "int4 g32": QuantConfig(bits=4, group_size=32),
    "int4 g32 +clip": QuantConfig(bits=4, group_size=32, optimize=True),
    "int4 g64": QuantConfig(bits=4, group_size=64),
    "int4 g64 +clip": QuantConfig(bits=4, group_size=64, optimize=True),
    "int2 g16": QuantConfig(bits=2, group_size=16),
    "int2 g16 +clip": QuantConfig(bits=2, group_size=16, optimize=True),
    "int2 g32": QuantConfig(bits=2, group_size=32),
    "int2 g32 +clip": QuantConfig(bits=2, group_size=32, optimize=True),
}


class Remembered(torch.nn.Module):
    """The reference model's logits, computed once per window and replayed for every variant."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.logits: dict[bytes, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor):
        key = input_ids.numpy().tobytes()
        if key not in self.logits:
            self.logits[key] = self.model(input_ids=input_ids).logits
        return type("Output", (), {"logits": self.logits[key]})


def quantized(folder: Path, config: QuantConfig, cache: Path) -> tuple[Path, float]:
    """A fresh checkpoint of `config`, and the seconds quantizing took."""
    out = checkpoint_path(folder, config, cache)
    started = time.perf_counter()
    quantize_checkpoint(resolve_model(str(folder)), out, config, overwrite=True)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    console = Console(width=160)
    folder = smollm2_folder(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text_name, text = default_text()
    reference = Remembered(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())

    variants = {
        "bf16 activations": lambda: (
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval(),
            None,
        )
    }
    for name, config in SCHEMES.items():
        variants[f"quantcli {name}"] = lambda config=config: quantcli_variant(
            folder, config, args.cache
        )
    if installed("optimum.quanto"):
        variants["quanto int8"] = lambda: (quanto_model(folder, 8, "cpu", torch.float32), None)
        variants["quanto int4"] = lambda: (quanto_model(folder, 4, "cpu", torch.float32), None)

    table = Table(
        "variant",
        "perplexity",
        "Δ PPL %",
        "KL (nats/token)",
        "top-1 agree",
        "bits/weight",
        "quantized layers",
        "quantize s",
        title=f"SmolLM2-135M-Instruct on {text_name}: {args.window}-token windows",
    )
    baseline_row = None
    for name, build in variants.items():
        if args.only and name not in args.only:
            continue
        model, info = build()
        result = evaluate(
            model,
            tokenizer,
            text,
            text_name=text_name,
            model_name=name,
            baseline=reference,
            baseline_name="fp32",
            window=args.window,
            max_tokens=args.max_tokens,
        )
        if baseline_row is None:
            baseline_row = (result.baseline_perplexity, result.tokens)
            table.add_row(
                "original, fp32 (reference)",
                f"{result.baseline_perplexity:.4f}",
                "0",
                "0",
                "100%",
                "16",
                "-",
                "-",
            )
        bits, layers, seconds = info or ("-", "-", None)
        table.add_row(
            name,
            f"{result.perplexity:.4f}",
            f"{result.delta_perplexity_percent:+.2f}",
            f"{result.kl_divergence:.5f}",
            f"{100 * result.top1_agreement:.2f}%",
            bits,
            layers,
            "-" if seconds is None else f"{seconds:.1f}",
        )
        console.print(f"{name}: ppl {result.perplexity:.4f} ({result.seconds:.0f} s)")
        del model
        gc.collect()
    note = f"{baseline_row[1]} tokens scored per variant." if baseline_row else ""
    console.print(table, note)
    if args.docs:
        write_markdown(table, "accuracy", note)


def quantcli_variant(folder: Path, config: QuantConfig, cache: Path):
    out, seconds = quantized(folder, config, cache)
    summary = summarize_folder(out)
    info = (f"{summary.bits_per_weight:.3f}", str(len(summary.quantized)), seconds)
    return quantcli.load(str(out), dtype=torch.float32), info


if __name__ == "__main__":
    main()
