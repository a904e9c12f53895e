"""End-to-end generation speed: quantcli against bf16, fp32 and the peers (prints a table).

For each variant of one model, in the same process and on the same prompts:
- decode: greedy tokens/s over 64 new tokens after a 16-token prompt, prefill excluded
  (time of 64 new tokens minus time of 1);
- prefill: time to the first token of a 512-token prompt;
- decode after it: tokens/s of the 64 new tokens that follow that prompt (attention then
  reads 512+ cached positions a token).
Variants: fp32 and bf16 (transformers), quantcli int8 and int4 g32 (and g128 where every
layer's width allows it; quantized with quantcli, loaded with `quantcli.load` at bf16), on a
CPU where quantcli's own int8 kernel runs also "quantcli int8 (int8pack)" (the same model
decoding with PyTorch's int8 kernel instead), and, when installed (`make bench` puts them in `.cache/peers`), optimum-quanto qint8/qint4
(`quantize` + `freeze`, bf16) and torchao `Int8WeightOnlyConfig`. Every quantized variant
keeps the output head in float. "+ compile": the same model with a static KV cache and a
compiled decode step (`quantcli generate --compile`), measured after compilation.
"via quantcli generate": the int8 model just measured, decoded by `generate_text` (what
`quantcli generate` runs: its streamer, first-token clock and reported decode speed) in
turns with transformers' `generate` on the same model; "× generate" is the median ratio.

"× float": decode against the faster of fp32 and bf16 here ("× float time": prefill time
against the faster one's). "weight MB/token": bytes of
the weights every decode step reads (linear layers and the output head; an embedding
lookup reads one row); "% of copy": that times tok/s over the measured copy bandwidth
(bytes read + written per second), the share of the memory bandwidth decoding reaches.
`--model llama-22` is a random Llama shaped like TinyLlama-1.1B (hidden 2048, 22 layers),
where the weights dominate.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import os
import statistics
import time
from pathlib import Path
from unittest.mock import patch

import torch
from bench_kernels import copy_bandwidth
from bench_memory import synthetic_llama
from report import write_markdown
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

import quantcli
from quantcli.config import QuantConfig
from quantcli.models.generation import compile_options, generate_text
from quantcli.models.source import resolve_model
from quantcli.models.streaming import quantize_checkpoint
from quantcli.nn import kernels

QUANTCLI = {"quantcli int8": QuantConfig(bits=8), "quantcli int4 g32": QuantConfig(bits=4)}
#: Variants for models whose every linear layer is a multiple of 128 wide.
WIDE = {"quantcli int4 g128": QuantConfig(bits=4, group_size=128)}


def float_model(folder: Path, dtype: torch.dtype, device: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def checkpoint_path(folder: Path, config: QuantConfig, cache: Path) -> Path:
    """Where the benchmarks keep `folder` quantized with `config`."""
    return cache / "bench" / f"{folder.name}-{config.label.replace(' ', '-')}"


def quantcli_model(folder: Path, config: QuantConfig, cache: Path, device: str):
    out = checkpoint_path(folder, config, cache)
    if not (out / "config.json").exists():
        quantize_checkpoint(resolve_model(str(folder)), out, config, overwrite=True)
    return quantcli.load(str(out), device=device, dtype=torch.bfloat16)


def pytorch_int8_model(folder: Path, cache: Path, device: str):
    """quantcli int8 decoding with PyTorch's int8pack, as where quantcli's own kernel cannot
    be built: that kernel's gain, measured in the same run (kernels are chosen at load)."""
    with patch.object(kernels, "native_int8", lambda: False):
        return quantcli_model(folder, QUANTCLI["quantcli int8"], cache, device)


def quanto_model(folder: Path, bits: int, device: str, dtype: torch.dtype = torch.bfloat16):
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = float_model(folder, dtype, device)
    quantize(model, weights=qint8 if bits == 8 else qint4, exclude=["lm_head"])
    freeze(model)
    return model


def torchao_model(folder: Path, device: str):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = float_model(folder, torch.bfloat16, device)
    head = model.get_output_embeddings()

    def body_linear(module, _name):
        return isinstance(module, torch.nn.Linear) and module is not head

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=body_linear)
    return model


def variants(folder: Path, cache: Path, device: str) -> dict:
    """Builders of every variant available here, by name."""
    found = {
        "fp32": lambda: float_model(folder, torch.float32, device),
        "bf16": lambda: float_model(folder, torch.bfloat16, device),
    }
    config = AutoConfig.from_pretrained(folder)
    wide = config.hidden_size % 128 == 0 and config.intermediate_size % 128 == 0
    for name, config in (QUANTCLI | WIDE if wide else QUANTCLI).items():
        found[name] = lambda config=config: quantcli_model(folder, config, cache, device)
    if device == "cpu" and kernels.native_int8():
        found["quantcli int8 (int8pack)"] = lambda: pytorch_int8_model(folder, cache, device)
    for name in ("bf16", *QUANTCLI):
        found[f"{name} + compile"] = found[name]
    if installed("optimum.quanto"):
        found["quanto qint8"] = lambda: quanto_model(folder, 8, device)
        found["quanto qint4"] = lambda: quanto_model(folder, 4, device)
    if installed("torchao"):
        found["torchao int8 wo"] = lambda: torchao_model(folder, device)
    return found


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def timed_generate(model, ids: torch.Tensor, new_tokens: int, options: dict) -> float:
    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            **options,
        )
    sync()
    return time.perf_counter() - start


def measure(model, device: str, new_tokens: int, prompt_tokens: int, compiled: bool):
    """(decode tokens/s after a 16-token prompt, prefill seconds of the long prompt, decode
    tokens/s after it) of one model, best of a few runs.

    Compiled variants are warmed up with the measured lengths, so compilation is left out.
    """
    options = compile_options(device) if compiled else {}
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    short = torch.randint(100, vocab, (1, 16), generator=generator).to(device)
    long = torch.randint(100, vocab, (1, prompt_tokens), generator=generator).to(device)
    timed_generate(model, short, new_tokens if compiled else 4, options)  # warm-up
    first = min(timed_generate(model, short, 1, options) for _ in range(3))
    full = min(timed_generate(model, short, new_tokens, options) for _ in range(2))
    prefill = min(timed_generate(model, long, 1, options) for _ in range(2))
    long_full = min(timed_generate(model, long, new_tokens, options) for _ in range(2))
    decode = (new_tokens - 1) / max(full - first, 1e-9)
    return decode, prefill, (new_tokens - 1) / max(long_full - prefill, 1e-9)


def weight_bytes_per_token(model) -> int:
    """Bytes of the weights a decode step reads: every layer's but the input embeddings'
    (a lookup reads one row), a tied table counted once, as the head."""
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    seen, total = set(), 0
    for module in model.modules():
        if module is embeddings and module is not getattr(head, "table", head):
            continue
        for tensor in module.buffers(recurse=False):
            if id(tensor) not in seen and tensor.dim() >= 1 and tensor.numel() > 1:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
        for name, tensor in module.named_parameters(recurse=False):
            if id(tensor) not in seen and name == "weight" and tensor.dim() == 2:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


def generate_text_against_generate(model, tokenizer, new_tokens: int, rounds: int = 3) -> tuple:
    """(decode tok/s that `generate_text` reports, its ratio to transformers' `generate` on
    the same model), medians of `rounds` runs in turns; no end-of-text stop on either."""
    model.generation_config.eos_token_id = None
    prompt = "The history of the city of Paris begins"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    ours, ratios = [], []
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        for _ in range(rounds):
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
            result = generate_text(
                model, tokenizer, prompt, max_new_tokens=new_tokens, chat=False, streamer=streamer
            )
            first = timed_generate(model, ids, 1, {})
            full = timed_generate(model, ids, new_tokens, {})
            ours.append(result.decode_tokens_per_second)
            ratios.append(ours[-1] * (full - first) / (new_tokens - 1))
    return statistics.median(ours), statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model", default="smollm2", help="smollm2, or llama-LAYERS (random 2048-wide Llama)"
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--only", nargs="+", help="variant names to run (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model == "smollm2":
        folder = smollm2_folder(args.cache)
    else:
        layers = int(args.model.removeprefix("llama-"))
        folder = synthetic_llama(args.cache / "bench" / f"llama-2048x{layers}", layers)
    console = Console(width=160)
    console.print(
        f"{folder.name} on {args.device}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}: decode {args.new_tokens} tokens, prefill {args.prompt_tokens}"
    )
    bandwidth = copy_bandwidth(args.device)
    tokenizer = (
        AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").exists() else None
    )
    results, weights, loads, through_cli = {}, {}, {}, None
    for name, build in variants(folder, args.cache, args.device).items():
        if args.only and name not in args.only:
            continue
        model = build()
        compiled = name.endswith(" + compile")
        results[name] = measure(model, args.device, args.new_tokens, args.prompt_tokens, compiled)
        weights[name], loads[name] = weight_bytes_per_token(model), os.getloadavg()[0]
        decode, prefill, long_decode = results[name]
        console.print(
            f"{name}: {decode:.2f} tok/s, prefill {prefill:.2f} s, then {long_decode:.2f} tok/s"
        )
        if name == "quantcli int8" and tokenizer is not None:
            through_cli = generate_text_against_generate(model, tokenizer, args.new_tokens)
            console.print(f"{name} via quantcli generate: {through_cli[1]:.2f}x generate")
        del model
        gc.collect()
    table = Table(
        "variant",
        "decode tok/s",
        "× bf16",
        "× float",
        "weight MB/token",
        "% of copy",
        f"decode tok/s after {args.prompt_tokens}",
        "× float",
        "prefill s",
        "× float time",
        "load avg",
    )
    nan = float("nan")
    base_decode = results.get("bf16", (nan,))[0]
    floats = [results[name] for name in ("fp32", "bf16") if name in results] or [(nan,) * 3]
    float_decode = max(result[0] for result in floats)
    float_prefill = min(result[1] for result in floats)
    float_long = max(result[2] for result in floats)
    for name, (decode, prefill, long_decode) in results.items():
        table.add_row(
            name,
            f"{decode:.2f}",
            f"{decode / base_decode:.2f}",
            f"{decode / float_decode:.2f}",
            f"{weights[name] / 1e6:.0f}",
            f"{100 * weights[name] * decode / bandwidth:.0f}%",
            f"{long_decode:.2f}",
            f"{long_decode / float_long:.2f}",
            f"{prefill:.2f}",
            f"{prefill / float_prefill:.2f}",
            f"{loads[name]:.1f}",
        )
        if name == "quantcli int8" and through_cli is not None:
            ours, ratio = through_cli
            table.add_row(
                f"{name} via quantcli generate ({ratio:.2f}× generate)",
                f"{ours:.2f}",
                f"{ours / base_decode:.2f}",
                f"{ours / float_decode:.2f}",
            )
    console.print(table)
    if args.docs:
        write_markdown(
            table,
            f"generate-{args.model}-{args.device}",
            f"{args.new_tokens} new tokens (decode) after a 16-token prompt and after a "
            f"{args.prompt_tokens}-token one (prefill); {torch.get_num_threads()} threads; copy "
            f"bandwidth {bandwidth / 1e9:.1f} GB/s.",
        )


if __name__ == "__main__":
    main()
