"""Pictures for `inspect --against --plot` and `eval --plot` (matplotlib, an optional extra).

Figures are drawn off-screen (the Agg backend: no display needed) and written atomically,
so an interrupted run never leaves half a PNG behind.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from quantcli.errors import UsageError
from quantcli.files import atomic_path
from quantcli.units import format_bytes

FORMATS = (".png", ".svg", ".pdf")


def check_plot_path(path: Path) -> Path:
    """Refuse a path that cannot be written, or a missing matplotlib, before any work."""
    if path.expanduser().is_dir():
        raise UsageError(f"--plot {path} is a folder: name a file inside it, e.g. {path}/plot.png.")
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--plot {path}: name a {', '.join(FORMATS)} file, e.g. errors.png.")
    if not path.parent.expanduser().is_dir():
        raise UsageError(f"--plot {path}: the folder {path.parent} does not exist.")
    _pyplot()
    return path.expanduser()


def plot_layer_errors(errors: Sequence, path: Path, title: str) -> Path:
    """Each quantized layer's relative error in model order, one colour per layer type."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    ordered = sorted(errors, key=lambda error: _natural(error.name))
    kinds = list(dict.fromkeys(error.kind for error in ordered))
    colours = {kind: plt.get_cmap("tab10")(index % 10) for index, kind in enumerate(kinds)}
    figure, axes = plt.subplots(figsize=(max(8.0, min(24.0, 0.06 * len(ordered) + 4)), 4.5))
    axes.bar(
        range(len(ordered)),
        [error.relative_error for error in ordered],
        width=1.0,
        color=[colours[error.kind] for error in ordered],
    )
    blocks = _block_ticks([error.name for error in ordered])
    if blocks:
        axes.set_xticks([position for position, _ in blocks], [label for _, label in blocks])
        axes.set_xlabel("block (layers in model order)")
    else:
        axes.set_xticks([])
        axes.set_xlabel("layers in model order")
    axes.set_xlim(-0.5, len(ordered) - 0.5)
    axes.set_ylabel("relative error ‖W_q − W‖ / ‖W‖")
    axes.set_title(title)
    handles = [Patch(color=colours[kind], label=kind) for kind in kinds]
    axes.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_evaluations(results: Sequence[dict], path: Path) -> Path:
    """Perplexity (against the baseline's) and size on disk of each evaluated model, one
    row per model; a log scale when the perplexities span more than 10x."""
    plt = _pyplot()
    labels = _labels(results)
    metric = "perplexity" if "perplexity" in results[0] else "cosine_similarity"
    values = [result.get(metric, float("nan")) for result in results]
    sized = all(result.get("size_bytes") for result in results)
    height = 1.2 + 0.45 * len(results)
    figure, panels = plt.subplots(
        1, 2 if sized else 1, figsize=(11 if sized else 7, height), sharey=True, squeeze=False
    )
    rows = range(len(results))[::-1]  # the first model on top
    quality = panels[0][0]
    bars = quality.barh(rows, values, color="tab:blue")
    quality.bar_label(bars, fmt=" %.4g", fontsize="small")
    quality.set_yticks(list(rows), labels)
    if metric == "perplexity" and max(values) > 10 * min(values):
        quality.set_xscale("log")
    baselines = {
        r["baseline"]: r["baseline_perplexity"] for r in results if "baseline_perplexity" in r
    }
    notes = []
    for index, (name, value) in enumerate(baselines.items()):
        style = ("--", ":", "-.")[index % 3]
        quality.axvline(value, color="black", linestyle=style)
        notes.append(f"{style} baseline {_short(name)}: {value:.4g}")
    better = "lower" if metric == "perplexity" else "higher"
    quality.set_xlabel("\n".join([f"{metric.replace('_', ' ')} ({better} is better)", *notes]))
    quality.set_title(f"{metric.replace('_', ' ')} on {results[0]['text'].split(' ')[0]}")
    quality.margins(x=0.15)
    if sized:
        sizes = panels[0][1]
        bars = sizes.barh(
            rows, [result["size_bytes"] / 1e6 for result in results], color="tab:gray"
        )
        sizes.bar_label(
            bars, labels=[f" {format_bytes(result['size_bytes'])}" for result in results]
        )
        sizes.set_xlabel("size on disk (MB)")
        sizes.set_title("size")
        sizes.margins(x=0.2)
    for axes in figure.axes:
        axes.grid(axis="x", alpha=0.3)
    return _save(figure, path)


def _labels(results: Sequence[dict]) -> list[str]:
    """The scheme of each model when that tells them apart, else their folder names."""
    schemes = [result.get("scheme") for result in results]
    if all(schemes) and len(set(schemes)) == len(schemes):
        return schemes
    return [_short(result["model"]) for result in results]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "--plot needs matplotlib: pip install 'quantcli[plot]' (or drop --plot)."
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    """Render into a temporary file beside `path`, then rename it into place."""
    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=120)
    finally:
        _pyplot().close(figure)
    return path


def _natural(name: str) -> list:
    """Sort key that puts layers.10 after layers.9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _block_ticks(names: list[str]) -> list[tuple[int, str]]:
    """An x tick at the first layer of every few numbered blocks (at most ~12 labels)."""
    starts: dict[str, int] = {}
    for position, name in enumerate(names):
        found = re.search(r"\.(\d+)\.", name)
        if found:
            starts.setdefault(found.group(1), position)
    step = max(1, len(starts) // 12)
    return [(position, block) for block, position in list(starts.items())[::step]]


def _short(name: str) -> str:
    """The last part of a folder path or Hub id: the bars' labels stay readable."""
    return Path(name.rstrip("/")).name or name
