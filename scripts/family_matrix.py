"""The family matrix as a table: docs/generated/families.md.

For every family transformers ships for causal LM, seq2seq, masked LM, image and audio
classification (tests/families.py builds the tiny models), and each scheme: does quantcli
quantize and load it back with the dense model's logits (the assertion of
tests/test_families.py); does transformers' own ``from_pretrained`` (compressed-tensors)
load quantcli's checkpoint, and with which logits; and what ``generate`` does (text models:
the same tokens as transformers' ``generate`` on the same loaded model; others: the one-line
refusal). Everything measured here, offline, on CPU.

    python scripts/family_matrix.py            # prints the table
    python scripts/family_matrix.py --docs     # also writes docs/generated/families.md
    python scripts/family_matrix.py llama t5   # only these families
"""

from __future__ import annotations

import argparse
import collections
import datetime
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import families as F  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

DOCS = ROOT / "docs" / "generated" / "families.md"


def transformers_load(family, outcome, out: Path) -> str:
    """transformers' from_pretrained of quantcli's checkpoint, compared with quantcli."""
    loaded = outcome.detail.get("loaded")
    try:
        with F.quiet():
            model = getattr(transformers, family.model_class).from_pretrained(out).eval()
            theirs = F.logits(model, F.sample_inputs(model))
    except Exception as error:  # noqa: BLE001 - measured, not judged
        return f"no: {type(error).__name__}: {F.one_line(error)[:120]}"
    ours = F.logits(loaded, F.sample_inputs(loaded))
    if theirs.shape != ours.shape:
        return f"loads, other output shape {tuple(theirs.shape)}"
    difference = float((theirs.float() - ours.float()).abs().max())
    scale = float(ours.abs().max()) or 1.0
    if not torch.isfinite(theirs).all():
        return "loads, non-finite logits"
    return (
        "yes, same logits"
        if difference <= 1e-5 * scale
        else f"loads, logits differ by {difference:.2g}"
    )


def generate_check(family, outcome, folder: Path) -> str:
    """quantcli's generate against transformers' generate on the same loaded model."""
    from quantcli.errors import QuantcliError
    from quantcli.models.generation import check_generates_text, generate_text, load_tokenizer

    model = outcome.detail.get("loaded")
    try:
        check_generates_text(model)
    except QuantcliError as error:
        return f"refused (exit {error.exit_code}): {F.one_line(error)}"
    tokenizer = load_tokenizer(folder)
    prompt = "The quick brown fox"
    try:
        with F.quiet():
            result = generate_text(model, tokenizer, prompt, max_new_tokens=5, chat=False)
            inputs = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                theirs = model.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=1)[0]
    except Exception as error:  # noqa: BLE001
        return f"fails: {type(error).__name__}: {F.one_line(error)[:120]}"
    kept = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
    same = result.text == tokenizer.decode(theirs[kept:], skip_special_tokens=True)
    return ("same tokens" if same else "other tokens") + f" ({result.new_tokens} new)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*")
    parser.add_argument("--docs", action="store_true", help=f"write {DOCS.relative_to(ROOT)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in F.families():
            if args.families and family.model_type not in args.families:
                continue
            with F.quiet():
                model, folder = F.prepare(family, Path(tmp))
            if model is None:
                rows.append((family, None, folder, "", ""))
                print(f"{family.model_type}: {folder}", flush=True)
                continue
            for scheme in F.SCHEMES:
                with F.quiet():
                    outcome = F.run(family, model, folder, scheme)
                hf = generated = ""
                if outcome.quantcli == "pass":
                    hf = transformers_load(family, outcome, folder.parent / scheme)
                    generated = generate_check(family, outcome, folder)
                outcome.detail.pop("loaded", None)
                rows.append((family, scheme, outcome, hf, generated))
                print(f"{family.model_type} {scheme}: {outcome.quantcli} | {hf} | {generated}")
    seconds = time.perf_counter() - started
    table = render(rows, seconds)
    if args.docs:
        DOCS.write_text(table)
        print(f"wrote {DOCS.relative_to(ROOT)}")
    else:
        print(table)


def status(outcome) -> str:
    text = outcome.quantcli
    if text == "pass":
        size = outcome.detail.get("group_size")
        return "pass" + (f" ({size})" if size == "channel" else f" (g{size})" if size else "")
    return text


def hf_failures(rows) -> collections.Counter:
    """transformers' loading failures and differences by kind, counted once per family."""
    kinds: dict[str, str] = {}
    for family, _, _, hf, _ in rows:
        if hf.startswith(("no", "loads")):
            kinds.setdefault(family.model_type, re.sub(r" by [\d.e-]+$", "", hf))
    return collections.Counter(kinds.values())


def render(rows, seconds: float) -> str:
    families = collections.OrderedDict()
    for family, scheme, outcome, hf, generated in rows:
        families.setdefault(family.model_type, []).append((family, scheme, outcome, hf, generated))
    counts = collections.Counter({"failing": 0})
    for entries in families.values():
        family, scheme, outcome, *_ = entries[0]
        if scheme is None:
            counts[
                "skipped: MoE (other branch)" if "MoE" in outcome else "skipped: tiny config"
            ] += 1
        elif all(e[2].quantcli == "pass" for e in entries):
            counts["pass (both schemes)"] += 1
        elif all(e[2].quantcli.startswith("refused") for e in entries):
            counts["refused up front (exit 4)"] += 1
        else:
            counts["failing"] += 1
    scheme_counts = collections.Counter()
    for _, scheme, outcome, hf, generated in rows:
        if scheme is None:
            continue
        scheme_counts[(scheme, "quantcli load: pass")] += outcome.quantcli == "pass"
        scheme_counts[(scheme, "transformers load: same logits")] += hf.startswith("yes")
        scheme_counts[(scheme, "transformers load: loads, logits differ")] += hf.startswith("loads")
        scheme_counts[(scheme, "transformers load: fails")] += hf.startswith("no")
        scheme_counts[(scheme, "generate: same tokens as transformers")] += generated.startswith(
            "same"
        )
        scheme_counts[(scheme, "generate: other tokens or fails")] += generated.startswith(
            ("other", "fails")
        )
        scheme_counts[(scheme, "generate: refused, takes no text (exit 2)")] += (
            generated.startswith("refused")
        )
    lines = [
        f"Generated by `scripts/family_matrix.py` on {datetime.date.today()} "
        f"(transformers {transformers.__version__}, torch {torch.__version__}, CPU, "
        f"{seconds:.0f} s). Each family is a tiny random model built from its config class "
        "(`tests/families.py`: hidden size 64, 2 layers, vocabulary of 128), saved, quantized "
        "by quantcli and loaded back; *quantcli load* passes when the loaded model's logits "
        "equal those of the float model with the quantized layers' dequantized weights "
        "(`tests/test_families.py` asserts it). *transformers load* is transformers' own "
        "`from_pretrained` of quantcli's checkpoint (compressed-tensors "
        "installed), compared with quantcli's logits. *generate*: quantcli's tokens against "
        "transformers' `generate` on the same loaded model, or the refusal for a model that "
        "takes no text.",
        "",
        "| families | count |",
        "|---|---|",
        *[f"| {name} | {count} |" for name, count in sorted(counts.items())],
        f"| total | {len(families)} |",
        "",
        "| scheme | outcome | count |",
        "|---|---|---|",
        *[f"| {scheme} | {what} | {n} |" for (scheme, what), n in sorted(scheme_counts.items())],
        "",
        "transformers' own loader, where it fails (families, both schemes alike):",
        "",
        "| reason | families |",
        "|---|---|",
        *[f"| {reason} | {n} |" for reason, n in hf_failures(rows).most_common()],
        "",
        "| family | task | scheme | quantcli load | transformers load | generate |",
        "|---|---|---|---|---|---|",
    ]
    for entries in families.values():
        for family, scheme, outcome, hf, generated in entries:
            if scheme is None:
                cells = [family.model_type, family.task, "", outcome, "", ""]
            else:
                cells = [family.model_type, family.task, scheme, status(outcome), hf, generated]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
