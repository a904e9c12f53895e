"""GPTQ against round-to-nearest on the real SmolLM2-135M-Instruct (prints a table).

Each scheme is quantized both ways with `quantcli quantize` in a fresh process (its --json
gives the time and the process's peak memory, ru_maxrss), then scored in float32 against
the original model run in float32, on a text that is neither GPTQ's calibration text
(quantcli/data/kjv_genesis.txt) nor eval's default (tiny Shakespeare): the Gospel of Luke,
chapters 1-9, from the same public-domain King James Version (scripts/data/kjv_luke.txt).
Nothing here was tuned on that text: GPTQ runs with its defaults but --samples, with and
without --act-order.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
from report import write_markdown
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantcli
from quantcli.models.calibration import DEFAULT_SAMPLES
from quantcli.models.evaluation import evaluate

TEXT = Path(__file__).parent / "data" / "kjv_luke.txt"
SCHEMES = {
    "int8 sym channel": ["--bits", "8"],
    "int4 asym g32": ["--bits", "4", "--scheme", "asym", "--group-size", "32"],
    "int4 sym g64": ["--bits", "4", "--scheme", "sym", "--group-size", "64"],
    "int2 asym g16": ["--bits", "2", "--scheme", "asym", "--group-size", "16"],
}
#: Methods and their extra `quantcli quantize` options.
METHODS = {"rtn": [], "gptq": [], "gptq act-order": ["--act-order"]}
TARGETS = {
    "int8 sym channel": "≤ +0.15%",
    "int4 asym g32": "≤ +10%",
    "int4 sym g64": "≤ half of RTN's loss",
    "int2 asym g16": "≤ 3× the original's perplexity",
}


def quantize(folder: Path, out: Path, options: list[str], method: str, samples: int) -> dict:
    """Run `quantcli quantize --json`, under /usr/bin/time: Linux carries a process's peak
    RSS over fork and exec, so quantcli started from this (large) process would report
    ours; started by `time`, it reports its own."""
    command = ["/usr/bin/time", "-f", "maxrss_kb=%M", sys.executable, "-m", "quantcli"]
    command += ["quantize", str(folder), "--out", str(out)]
    command += [*options, "--method", method.split()[0], *METHODS[method]]
    command += ["--overwrite", "--json"]
    if method != "rtn":
        command += ["--samples", str(samples)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    report = json.loads(done.stdout)
    measured = [line for line in done.stderr.splitlines() if line.startswith("maxrss_kb=")]
    report["peak_rss_bytes"] = int(measured[-1].split("=")[1]) * 1024
    return report


def _key(name: str, method: str, samples: int) -> str:
    """Results' key: GPTQ rows by their sample count."""
    return f"{name} {method}" if method == "rtn" else f"{name} {method} s{samples}"


def perplexity(model, tokenizer, text: str, args) -> float:
    result = evaluate(
        model,
        tokenizer,
        text,
        text_name=TEXT.name,
        model_name="",
        window=args.window,
        max_tokens=args.max_tokens,
    )
    return result.perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument(
        "--samples", type=int, default=DEFAULT_SAMPLES, help="GPTQ calibration samples"
    )
    parser.add_argument("--only", nargs="+", help="schemes to run (default: all)")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="methods to run (default: all)"
    )
    parser.add_argument("--results", type=Path, help="keep results here (JSON), resume from it")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/gptq.md")
    args = parser.parse_args()
    console = Console(width=160)
    folder = smollm2_folder(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = TEXT.read_text(encoding="utf-8")
    results = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}

    def save() -> None:
        if args.results:
            args.results.write_text(json.dumps(results, indent=2))

    if "original" not in results:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        results["original"] = {"perplexity": perplexity(model, tokenizer, text, args)}
        save()
        del model
    base = results["original"]["perplexity"]
    console.print(f"original fp32: ppl {base:.4f}")
    for name, options in SCHEMES.items():
        if args.only and name not in args.only:
            continue
        for method in args.methods or METHODS:
            key = _key(name, method, args.samples)
            label = f"{name}-{method}".replace(" ", "-")
            out = args.cache / "bench" / f"{folder.name}-{label}"
            if key in results and "peak_rss_measured" not in results[key]:  # older script
                report = quantize(folder, out, options, method, args.samples)
                results[key]["peak_rss_bytes"] = report["peak_rss_bytes"]
                results[key]["peak_rss_measured"] = "time"
                save()
            if key in results:
                continue
            report = quantize(folder, out, options, method, args.samples)
            model = quantcli.load(str(out), dtype=torch.float32)
            results[key] = {
                "perplexity": perplexity(model, tokenizer, text, args),
                "seconds": report["seconds"],
                "peak_rss_bytes": report["peak_rss_bytes"],
                "peak_rss_measured": "time",
                "samples": args.samples if method != "rtn" else None,
            }
            save()
            console.print(f"{key}: {results[key]}")
            del model
            gc.collect()

    table = Table(
        "scheme",
        "method",
        "perplexity",
        "Δ PPL %",
        "quantize s",
        "peak memory",
        "target",
        title=f"SmolLM2-135M-Instruct on {TEXT.name} ({args.window}-token windows, "
        f"first {args.max_tokens} tokens); original fp32 perplexity {base:.4f}",
    )
    for name in SCHEMES:
        keys = [key for key in results if key.startswith(f"{name} ")]
        for key in keys:
            row = results[key]
            method = key.removeprefix(f"{name} ").rsplit(" s", 1)[0]
            delta = 100 * (row["perplexity"] / base - 1)
            table.add_row(
                name,
                method if method == "rtn" else f"{method} ({row['samples']}×512)",
                f"{row['perplexity']:.4f}",
                f"{delta:+.2f}",
                f"{row['seconds']:.0f}",
                f"{row['peak_rss_bytes'] / 2**20:.0f} MiB",
                TARGETS[name] if method != "rtn" else "",
            )
    note = (
        "Perplexity in float32 against the original in float32. Calibration: "
        "kjv_genesis.txt (shipped), samples × 512 tokens as shown (default: "
        f"{DEFAULT_SAMPLES}); time and peak memory (ru_maxrss of the quantize process) "
        "include loading torch and transformers."
    )
    console.print(table, note)
    if args.docs:
        write_markdown(table, "gptq", note)


if __name__ == "__main__":
    main()
