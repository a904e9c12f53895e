"""Per-layer speed of every matmul path of `QuantLinear` (prints a table).

For each weight shape (SmolLM2-135M's, and Llama-7B-sized 4096x4096 and 4096x11008) and
each number of activation rows M (1 = decode, 128 and 512 = prefill): a plain fp32 and
bf16 `F.linear`, then every kernel that accepts the layer, for int8 (sym channel) and
int4 (asym g32, g64). "GB/s" is weight bytes read per second (the figure that bounds
decode), compared with the measured copy bandwidth of the device (bytes read + written).
"→" marks the kernel `select_kernel` picks for that call.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F
from report import write_markdown
from rich.console import Console
from rich.table import Table

from quantcli import QuantConfig, QuantLinear
from quantcli.nn.kernels import KERNELS, select_kernel

SHAPES = {  # name: (out_features, in_features)
    "SmolLM2 q/o 576x576": (576, 576),
    "SmolLM2 up 1536x576": (1536, 576),
    "SmolLM2 down 576x1536": (576, 1536),
    "Llama 4096x4096": (4096, 4096),
    "Llama up 11008x4096": (11008, 4096),
    "Llama down 4096x11008": (4096, 11008),
}
CONFIGS = {
    "int8": QuantConfig(bits=8, dtype=torch.bfloat16),
    "int4 g32": QuantConfig(bits=4, group_size=32, dtype=torch.bfloat16),
    "int4 g64": QuantConfig(bits=4, group_size=64, dtype=torch.bfloat16),
}
#: Kernels that only make sense for some layers (the rest raise or crash on others).
ONLY_FOR = {"int8pack": "int8", "int4pack": "int4"}


def timed(fn, device: str, budget: float) -> float:
    """Median seconds per call, repeating for about `budget` seconds after a warm-up."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 200):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 256 MB tensor copy."""
    source = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * source.numel() / timed(lambda: target.copy_(source), device, 1.0)


def layer_bytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 128, 512])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--budget", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    device = args.device
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    console = Console(width=160)
    console.print(
        f"device {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    table = Table("layer", "M", "path", "ms", "weight GB/s", "% of copy", "× bf16")
    for shape_name in args.shapes:
        out_features, in_features = SHAPES[shape_name]
        weight = torch.randn(out_features, in_features, device=device) * 0.02
        layers = {name: QuantLinear.from_weight(weight, None, c) for name, c in CONFIGS.items()}
        floats = {"fp32": weight, "bf16": weight.bfloat16()}
        for rows in args.rows:
            x = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            results = []
            for name, w in floats.items():
                xs = x.to(w.dtype)
                seconds = timed(lambda w=w, xs=xs: F.linear(xs, w), device, args.budget)
                results.append((name, seconds, w.numel() * w.element_size()))
            for name, layer in layers.items():
                chosen = select_kernel(layer, x)
                for kernel, fn in KERNELS.items():
                    if kernel in ONLY_FOR and not name.startswith(ONLY_FOR[kernel]):
                        continue
                    if kernel != chosen and kernel in ONLY_FOR and not _accepts(layer, kernel):
                        continue
                    call = partial(fn, layer, x)
                    seconds = timed(call, device, args.budget)
                    mark = "→ " if kernel == chosen else "  "
                    results.append((f"{mark}{name} {kernel}", seconds, layer_bytes(layer)))
            bf16_seconds = results[1][1]
            for path, seconds, nbytes in results:
                rate = nbytes / seconds
                table.add_row(
                    shape_name,
                    str(rows),
                    path,
                    f"{seconds * 1e3:.3f}",
                    f"{rate / 1e9:.1f}",
                    f"{100 * rate / bandwidth:.0f}%",
                    f"{bf16_seconds / seconds:.2f}",
                )
            table.add_section()
    console.print(table)
    if args.docs:
        write_markdown(
            table,
            f"kernels-{device}",
            f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s; {torch.get_num_threads()} threads.",
        )


def _accepts(layer: QuantLinear, kernel: str) -> bool:
    """Whether `kernel` runs on this layer at decode size (the dispatch's own test)."""
    device = layer.weight_scale.device
    probe = torch.zeros(1, layer.in_features, dtype=torch.bfloat16, device=device)
    return select_kernel(layer, probe) == kernel


if __name__ == "__main__":
    main()
