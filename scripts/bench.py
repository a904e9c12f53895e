"""Benchmarks that print tables (never run by the tests).

Round-trip error of every quantization scheme, on Gaussian weights and on the real
weights of SmolLM2-135M's linear layers: the relative error ||W_q - W|| / ||W||, the
largest error in units of the scale step (must stay <= 0.5), and the bits per weight
each scheme stores.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from report import write_markdown
from rich.console import Console
from rich.table import Table
from safetensors import safe_open
from smollm2 import smollm2_folder

from quantcli.tensor import quantize

SCHEMES = [  # (label, bits, scheme, granularity, group size)
    ("int8 sym channel", 8, "sym", "channel", None),
    ("int8 sym tensor", 8, "sym", "tensor", None),
    ("int8 asym channel", 8, "asym", "channel", None),
    ("int4 sym g32", 4, "sym", "group", 32),
    ("int4 asym g32", 4, "asym", "group", 32),
    ("int4 asym g64", 4, "asym", "group", 64),
    ("int4 asym channel", 4, "asym", "channel", None),
    ("int2 asym g16", 2, "asym", "group", 16),
    ("int2 asym g32", 2, "asym", "group", 32),
]


def smollm2_linear_weights(cache: Path) -> list[torch.Tensor]:
    folder = smollm2_folder(cache)
    with safe_open(folder / "model.safetensors", "pt") as f:
        return [f.get_tensor(k) for k in f.keys() if k.endswith("proj.weight")]  # noqa: SIM118


def round_trip_row(label, weights, bits, scheme, granularity, group_size):
    squared_error = squared_norm = 0.0
    worst_in_steps = 0.0
    started = time.perf_counter()
    for weight in weights:
        qt = quantize(weight, bits, scheme, granularity, group_size)
        error = (qt.dequantize(torch.float32) - weight.float()).abs()
        scale = qt.scale.float()
        if scale.ndim == 2:
            scale = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
        worst_in_steps = max(worst_in_steps, float((error / scale.expand_as(error)).max()))
        squared_error += float(error.pow(2).sum())
        squared_norm += float(weight.float().pow(2).sum())
    elapsed = time.perf_counter() - started
    rows, cols = weights[0].shape
    scale_bits = (
        16
        * (
            1
            if granularity == "tensor"
            else rows
            if granularity == "channel"
            else rows * cols // group_size
        )
        / (rows * cols)
    )
    zero_bits = 0 if scheme == "sym" else scale_bits * bits / 16
    return [
        label,
        f"{(squared_error / squared_norm) ** 0.5:.5f}",
        f"{worst_in_steps:.4f}",
        f"{bits + scale_bits + zero_bits:.3f}",
        f"{elapsed:.2f} s",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    console = Console(width=200)
    torch.manual_seed(0)
    sources = {  # docs name: (title, weights)
        "round-trip-gaussian": ("Gaussian 4096x4096 (bf16)", [torch.randn(4096, 4096).bfloat16()]),
        "round-trip-smollm2": (
            "SmolLM2-135M linear layers (bf16)",
            smollm2_linear_weights(args.cache),
        ),
    }
    for name, (source, weights) in sources.items():
        table = Table(title=f"Round trip: {source}, {len(weights)} tensors")
        for column in ("scheme", "rel. error", "max error / step", "bits/weight", "time"):
            table.add_column(column)
        for label, *spec in SCHEMES:
            table.add_row(*round_trip_row(label, weights, *spec))
        console.print(table)
        if args.docs:
            write_markdown(table, name)


if __name__ == "__main__":
    main()
