"""GPTQ against round-to-nearest on the real SmolLM2-135M-Instruct (prints a table).

Each scheme is quantized both ways with `quantcli quantize` in a fresh process (its --json
gives the time and the process's peak memory, ru_maxrss), then scored in float32 against
the original model run in float32, on a text that is neither GPTQ's calibration text
(quantcli/data/kjv_genesis.txt) nor eval's default (tiny Shakespeare): the Gospel of Luke,
chapters 1-9, from the same public-domain King James Version (scripts/data/kjv_luke.txt).
Nothing here was tuned on that text: GPTQ runs with its defaults but --samples, with and
without --act-order.

The anchor: llm-compressor's GPTQModifier on the same model, the same token samples (made
by quantcli's sampler) and the same settings (scripts/llmc_worker.py, in llm-compressor's
own venv, CACHE/llmc-venv or --llmc-python; its rows are skipped when that venv is absent).
Its checkpoint is scored like quantcli's, loaded with `quantcli.load`.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from report import write_markdown
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file
from smollm2 import smollm2_folder
from transformers import AutoModelForCausalLM, AutoTokenizer

import quantcli
from quantcli.models.calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    calibration_set,
    default_calibration,
)
from quantcli.models.evaluation import evaluate

TEXT = Path(__file__).parent / "data" / "kjv_luke.txt"
SCHEMES = {
    "int8 sym channel": ["--bits", "8"],
    "int4 asym g32": ["--bits", "4", "--scheme", "asym", "--group-size", "32"],
    "int4 sym g64": ["--bits", "4", "--scheme", "sym", "--group-size", "64"],
    "int2 asym g16": ["--bits", "2", "--scheme", "asym", "--group-size", "16"],
}
#: Methods and their extra `quantcli quantize` options (llm-compressor: llmc_worker.py's).
#: "gptq (default)": `--method gptq` as it comes, act-order and the clipping search below 8
#: bits; the other two pin both, to compare with llm-compressor's minmax scales.
METHODS = {
    "rtn": [],
    "gptq": ["--no-act-order", "--no-optimize"],
    "gptq act-order": ["--act-order", "--no-optimize"],
    "gptq (default)": [],
    "llm-compressor": [],
    "llm-compressor act-order": ["--act-order"],
}
#: The anchor each quantcli GPTQ method is compared with.
ANCHORS = {"gptq": "llm-compressor", "gptq act-order": "llm-compressor act-order"}
WORKER = Path(__file__).parent / "llmc_worker.py"
TARGETS = {
    "int8 sym channel": "≤ +0.15%",
    "int4 asym g32": "≤ +10%",
    "int4 sym g64": "≤ half of RTN's loss",
    "int2 asym g16": "≤ 3× the original's perplexity",
}


def timed(command: list[str]) -> tuple[str, dict]:
    """Run `command` under /usr/bin/time (its stderr, progress included, passed through):
    its stdout, and its peak RSS in bytes and CPU seconds (user + system, imports included:
    steadier than the wall time on shared cores). Linux carries a process's peak RSS over
    fork and exec, so a process started from this (large) one would report ours; started
    by `time`, it reports its own."""
    with tempfile.NamedTemporaryFile("r") as measured:
        timed_command = ["/usr/bin/time", "-o", measured.name, "-f", "%M %U %S", *command]
        done = subprocess.run(timed_command, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}, see above)")
        maxrss_kb, user, system = measured.read().splitlines()[-1].split()
    usage = {"peak_rss_bytes": int(maxrss_kb) * 1024, "cpu_seconds": float(user) + float(system)}
    return done.stdout, usage


def quantize(
    folder: Path, out: Path, options: list[str], method: str, samples: int, threads: int | None
) -> dict:
    """Run `quantcli quantize --json`: its report, with the process's peak RSS and CPU time."""
    command = [sys.executable, "-m", "quantcli", "quantize", str(folder), "--out", str(out)]
    command += [*options, "--method", method.split()[0], *METHODS[method]]
    command += ["--overwrite", "--json"]
    if method != "rtn":
        command += ["--samples", str(samples)]
    if threads:
        command += ["--threads", str(threads)]
    stdout, usage = timed(command)
    return json.loads(stdout) | usage


def quantize_llmc(
    python: Path,
    folder: Path,
    tokenizer,
    out: Path,
    options: list[str],
    method: str,
    samples: int,
    threads: int | None,
) -> dict:
    """llm-compressor's GPTQ (llmc_worker.py in its venv) on the token samples quantcli's
    GPTQ calibrates on: its report ("seconds", "versions"), with the process's peak RSS and
    CPU time."""
    flags = dict(zip(options[::2], options[1::2], strict=True))
    ids = calibration_set(default_calibration(), tokenizer, samples, DEFAULT_SEQ_LEN).input_ids
    with tempfile.TemporaryDirectory() as scratch:
        tokens = Path(scratch) / "calibration.safetensors"
        save_file({"input_ids": ids.contiguous()}, str(tokens))
        command = [str(python), str(WORKER), str(folder), str(tokens), str(out)]
        command += ["--bits", flags["--bits"], "--scheme", flags.get("--scheme", "sym")]
        if "--group-size" in flags:
            command += ["--group-size", flags["--group-size"]]
        command += METHODS[method]
        if threads:
            command += ["--threads", str(threads)]
        stdout, usage = timed(command)
    return json.loads(stdout.strip().splitlines()[-1]) | usage


def load_quantized(out: Path, method: str):
    """The checkpoint in float32, read by quantcli; an llm-compressor checkpoint that
    quantcli refuses is read by transformers (with compressed-tensors), the refusal kept."""
    try:
        return quantcli.load(str(out), dtype=torch.float32), None
    except Exception as error:  # noqa: BLE001 -- for llm-compressor's output, a finding
        if not method.startswith("llm-compressor"):
            raise
        refusal = f"{type(error).__name__}: {error}"
        print(f"quantcli cannot load {out}: {refusal}; scoring with transformers instead")
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        return model, refusal


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
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for quantizing (both tools) and scoring (default: quantcli's and "
        "torch's, the physical cores)",
    )
    parser.add_argument(
        "--llmc-python", type=Path, help="llm-compressor's venv python (CACHE/llmc-venv)"
    )
    args = parser.parse_args()
    args.llmc_python = args.llmc_python or args.cache / "llmc-venv" / "bin" / "python"
    if args.threads:
        torch.set_num_threads(args.threads)
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
    methods = args.methods or list(METHODS)
    if not args.llmc_python.exists() and any(m.startswith("llm-compressor") for m in methods):
        console.print(
            f"llm-compressor rows skipped: no {args.llmc_python} (llm-compressor's own venv; "
            "`make llmc` installs it)"
        )
        methods = [m for m in methods if not m.startswith("llm-compressor")]
    for name, options in SCHEMES.items():
        if args.only and name not in args.only:
            continue
        for method in methods:
            key = _key(name, method, args.samples)
            label = f"{name}-{method}".replace(" ", "-")
            out = args.cache / "bench" / f"{folder.name}-{label}"
            if key in results and "peak_rss_measured" not in results[key]:  # older script
                report = quantize(folder, out, options, method, args.samples, args.threads)
                results[key]["peak_rss_bytes"] = report["peak_rss_bytes"]
                results[key]["peak_rss_measured"] = "time"
                save()
            if key in results:
                continue
            if method.startswith("llm-compressor"):
                report = quantize_llmc(
                    args.llmc_python,
                    folder,
                    tokenizer,
                    out,
                    options,
                    method,
                    args.samples,
                    args.threads,
                )
            else:
                report = quantize(folder, out, options, method, args.samples, args.threads)
            model, refusal = load_quantized(out, method)
            results[key] = {
                "perplexity": perplexity(model, tokenizer, text, args),
                "seconds": report["seconds"],
                "cpu_seconds": report["cpu_seconds"],
                "peak_rss_bytes": report["peak_rss_bytes"],
                "peak_rss_measured": "time",
                "samples": args.samples if method != "rtn" else None,
                "threads": args.threads,
            }
            if "versions" in report:
                results[key]["versions"] = report["versions"]
            if refusal:
                results[key]["quantcli_load_error"] = refusal
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
        "CPU s",
        "peak memory",
        "÷ llm-compressor",
        "target",
        title=f"SmolLM2-135M-Instruct on {TEXT.name} ({args.window}-token windows, "
        f"first {args.max_tokens} tokens); original fp32 perplexity {base:.4f}",
    )
    for name in SCHEMES:
        rows = {
            key: key.removeprefix(f"{name} ").rsplit(" s", 1)[0]
            for key in results
            if key.startswith(f"{name} ")
        }
        for key, method in sorted(rows.items(), key=lambda item: list(METHODS).index(item[1])):
            row = results[key]
            delta = 100 * (row["perplexity"] / base - 1)
            anchor = results.get(_key(name, ANCHORS.get(method, ""), row["samples"]))
            ratio = f"{row['perplexity'] / anchor['perplexity']:.4f}" if anchor else ""
            table.add_row(
                name,
                method if method == "rtn" else f"{method} ({row['samples']}×512)",
                f"{row['perplexity']:.4f}",
                f"{delta:+.2f}",
                f"{row['seconds']:.0f}",
                f"{row['cpu_seconds']:.0f}" if "cpu_seconds" in row else "",
                f"{row['peak_rss_bytes'] / 2**20:.0f} MiB",
                ratio,
                TARGETS[name] if method != "rtn" else "",
            )
    note = (
        "Perplexity in float32 against the original in float32. Calibration: "
        "kjv_genesis.txt (shipped), samples × 512 tokens as shown (default: "
        f"{DEFAULT_SAMPLES}), the same token samples for llm-compressor "
        "(scripts/llmc_worker.py). quantize s: the tool's own time (read, calibrate, "
        "quantize, write; imports excluded); CPU s (user + system) and peak memory "
        "(ru_maxrss) of the whole quantize process, loading torch and transformers "
        "included. ÷ llm-compressor: quantcli's perplexity over llm-compressor's with the "
        "same settings."
    )
    if args.threads:
        note += f" Quantized and scored with {args.threads} thread(s) (`--threads`)."
    console.print(table, note)
    if args.docs:
        write_markdown(table, "gptq", note)


if __name__ == "__main__":
    main()
