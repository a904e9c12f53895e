"""The demo: quantize a real model (SmolLM2-135M-Instruct) offline and show what changes.

Loads the bf16 model, quantizes its linear layers in memory to int8 and int4, and prints
sizes, how far the logits move, and the greedy answer to one prompt before and after.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantcli import QuantConfig, replace_linear_layers

PROMPT = "What is the capital of France? Answer in one sentence."
CONFIGS = {
    "int8 sym channel": QuantConfig(bits=8),
    "int4 asym g32": QuantConfig(bits=4, group_size=32),
}


def model_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    console = Console()
    folder = smollm2_folder(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )

    def run(model):
        with torch.no_grad():
            logits = model(**chat).logits.float()
            output = model.generate(**chat, max_new_tokens=24, do_sample=False)
        answer = tokenizer.decode(output[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
        return logits, answer.strip()

    def load():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()

    baseline = load()
    reference, answer = run(baseline)
    table = Table(title=f"SmolLM2-135M-Instruct, quantized in memory ({folder})")
    for column in ("scheme", "layers quantized", "model size", "logits rel. error", "time"):
        table.add_column(column)
    table.add_row("bf16 (original)", "-", f"{model_bytes(baseline) / 1e6:.1f} MB", "-", "-")
    answers = {"bf16 (original)": answer}
    for name, config in CONFIGS.items():
        model = load()
        started = time.perf_counter()
        report = replace_linear_layers(model, config)
        elapsed = time.perf_counter() - started
        logits, answers[name] = run(model)
        error = float((logits - reference).norm() / reference.norm())
        table.add_row(
            name,
            f"{len(report.replaced)} (kept: {', '.join(report.skipped) or 'none'})",
            f"{model_bytes(model) / 1e6:.1f} MB",
            f"{error:.4f}",
            f"{elapsed:.1f} s",
        )
    console.print(table)
    console.print(f"[bold]Prompt:[/] {PROMPT}")
    for name, text in answers.items():
        console.print(f"[bold]{name}:[/] {text}")


if __name__ == "__main__":
    main()
