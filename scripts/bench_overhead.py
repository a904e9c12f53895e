"""Per-call overhead of `QuantLinear` at decode size, against `nn.Linear` (prints a table).

For SmolLM2-135M's layer shapes and one token (M = 1): µs per module call of `nn.Linear`
in fp32 and bf16 and of `QuantLinear` int8 and int4 with bf16 activations, beside the µs of
the bare matmul it ends in (`F.linear`, or the fused kernel on the layer's prepared
operands). "overhead" is the difference: what the module adds around its matmul (Python,
views, bias). "× float" compares the module call with the faster float `nn.Linear` here.

Timing: the best of many blocks of calls (the machine is shared; a block disturbed by other
jobs only ever runs slower), with the load average printed beside the table.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from bench_kernels import CONFIGS
from bench_kernels import SHAPES as KERNEL_SHAPES
from report import write_markdown
from rich.console import Console
from rich.table import Table

from quantcli import QuantLinear
from quantcli.nn.kernels import plan

SHAPES = {name: shape for name, shape in KERNEL_SHAPES.items() if name.startswith("SmolLM2")}


def per_call(fns: list, calls: int, blocks: int) -> list[float]:
    """Seconds per call of each function: the fastest of `blocks` blocks of `calls` calls,
    the functions taking turns block by block (so all see the same load), after a warm-up.
    Blocks are short (well under a scheduler time slice) so that some run undisturbed."""
    best = [float("inf")] * len(fns)
    for fn in fns:
        for _ in range(calls):
            fn()
    for _ in range(blocks):
        for index, fn in enumerate(fns):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            best[index] = min(best[index], (time.perf_counter() - start) / calls)
    return best


def bare_kernel(layer: QuantLinear, x: torch.Tensor):
    """The torch op the layer's decode call ends in, on the operands it prepared."""
    _, (run, operands), _ = plan(layer, x.device, x.dtype)
    rows = x.reshape(-1, layer.in_features)
    if run.__name__ == "_int8pack":
        weight, scales, _ = operands
        return lambda: torch._weight_int8pack_mm(rows, weight, scales)
    if run.__name__ == "_int4pack":
        matmul, packed, group_size, scales_and_zeros, _ = operands
        return lambda: matmul(rows, packed, group_size, scales_and_zeros)
    return lambda: run(layer, x, *operands)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed block")
    parser.add_argument("--blocks", type=int, default=300, help="timed blocks (best kept)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/*.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console(width=160)
    load_before = os.getloadavg()
    table = Table("layer", "module", "µs/call", "bare matmul µs", "overhead µs", "× float")

    def time_it(*fns) -> list[float]:
        return [seconds * 1e6 for seconds in per_call(list(fns), args.calls, args.blocks)]

    with torch.no_grad():
        for shape_name, (out_features, in_features) in SHAPES.items():
            weight = torch.randn(out_features, in_features) * 0.02
            x = torch.randn(1, 1, in_features, dtype=torch.bfloat16)
            rows = []
            for dtype in (torch.float32, torch.bfloat16):
                linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=dtype)
                linear.weight.copy_(weight)
                xs = x.to(dtype)
                name = f"nn.Linear {str(dtype).removeprefix('torch.')}"
                module, bare = time_it(
                    lambda linear=linear, xs=xs: linear(xs),
                    lambda linear=linear, xs=xs: F.linear(xs, linear.weight),
                )
                rows.append((name, module, bare))
            fastest = min(module for _, module, _ in rows)
            for name, config in CONFIGS.items():
                layer = QuantLinear.from_weight(weight, None, config)
                module, bare = time_it(lambda layer=layer, x=x: layer(x), bare_kernel(layer, x))
                rows.append((f"QuantLinear {name}", module, bare))
            for name, module, bare in rows:
                table.add_row(
                    shape_name,
                    name,
                    f"{module:.1f}",
                    f"{bare:.1f}",
                    f"{module - bare:.1f}",
                    f"{fastest / module:.2f}",
                )
            table.add_section()
    load = f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    console.print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; {load}")
    console.print(table)
    if args.docs:
        write_markdown(
            table,
            "overhead-cpu",
            f"One token (M = 1), bf16 activations for QuantLinear; best of {args.blocks} "
            f"blocks of {args.calls} calls; {torch.get_num_threads()} threads; {load}.",
        )


if __name__ == "__main__":
    main()
