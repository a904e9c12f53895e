"""What to do with SmolLM2's tied head and embedding table (a fifth of its weights).

For int8 and int4 sym g64, three checkpoints of SmolLM2-135M-Instruct: the table kept in
float (the default), `--quantize-head` (the head untied and quantized, the lookup table
float beside it) and `--quantize-embeddings` (one quantized table for the lookup and the
head). For each: size on disk, perplexity against the float32 original on the text shipped
with quantcli (the same windows for all, activations in float32 as `quantcli eval`), and
eager decode speed with quantcli's load defaults against the bf16 original timed just
before it (16-token prompt, best of runs). `--docs` writes docs/generated/tied-head.md.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from bench_accuracy import Remembered
from bench_generate import measure
from report import write_markdown
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantcli
from quantcli.config import QuantConfig
from quantcli.models.evaluation import default_text, evaluate
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint
from quantcli.units import format_bytes

SCHEMES = {
    "int8": QuantConfig(bits=8),
    "int4 sym g64": QuantConfig(bits=4, scheme="sym", group_size=64),
}
TABLES = {
    "float table": {},
    "--quantize-head (untied)": {"quantize_head": True},
    "--quantize-embeddings (shared)": {"quantize_embeddings": True},
}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    console = Console(width=160)
    folder = smollm2_folder(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text_name, text = default_text()
    reference = Remembered(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    source_bytes = folder_bytes(folder)

    table = Table(
        "scheme",
        "head and embeddings",
        "size",
        "x smaller",
        "perplexity",
        "Δ PPL %",
        "decode tok/s",
        "bf16 tok/s",
        "x bf16",
        title=f"SmolLM2-135M-Instruct: the tied table ({text_name}, {args.window}-token windows)",
    )
    for scheme, base in SCHEMES.items():
        for label, options in TABLES.items():
            config = QuantConfig(**{**base.__dict__, **options})
            out = args.cache / "bench" / f"tied-{scheme}-{label.split()[0]}".replace(" ", "-")
            quantize_checkpoint(resolve_model(str(folder)), out, config, overwrite=True)
            model = quantcli.load(str(out), dtype=torch.float32)
            result = evaluate(
                model,
                tokenizer,
                text,
                text_name=text_name,
                model_name=label,
                baseline=reference,
                baseline_name="fp32",
                window=args.window,
                max_tokens=args.max_tokens,
            )
            del model
            model = quantcli.load(str(out))  # its fastest dtype, as `quantcli generate`
            # back to back with the bf16 original: the machine is shared, its load drifts
            bf16_speed = measure(bf16, "cpu", args.new_tokens, 16, compiled=False)[0]
            speed = measure(model, "cpu", args.new_tokens, 16, compiled=False)[0]
            size = folder_bytes(out)
            table.add_row(
                scheme,
                label,
                format_bytes(size),
                f"{source_bytes / size:.2f}",
                f"{result.perplexity:.4f}",
                f"{result.delta_perplexity_percent:+.2f}",
                f"{speed:.1f}",
                f"{bf16_speed:.1f}",
                f"{speed / bf16_speed:.2f}",
            )
            console.print(f"{scheme}, {label}: ppl {result.perplexity:.4f}, {speed:.1f} tok/s")
            del model
            gc.collect()
    note = (
        f"Source: {format_bytes(source_bytes)} (bf16). Reference perplexity (fp32): "
        f"{result.baseline_perplexity:.4f} over {result.tokens} tokens. Decode: eager, "
        f"{args.new_tokens} new tokens after a 16-token prompt, each variant timed right after "
        "the bf16 original."
    )
    console.print(table, note)
    if args.docs:
        write_markdown(table, "tied-head", note)


if __name__ == "__main__":
    main()
