"""Printing shared by the commands: the two consoles, progress bars, tables used twice."""

from __future__ import annotations

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from quantcli.nn.kernels import kernel_plan

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


def print_wide(table: Table, width: int = 160) -> None:
    """Print a table whole when stdout is a file or a pipe, where rich would otherwise wrap
    it at 80 columns; a terminal keeps its own width."""
    (stdout if stdout.is_terminal else Console(highlight=False, width=width)).print(table)


def progress_bar(disable: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description:<40.40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=stderr,
        disable=disable,
        transient=True,
    )


def kernel_summary(model, device: str, dtype: torch.dtype | None, prompt_tokens: int = 64) -> dict:
    """Which matmul kernel serves how many quantized layers, at decode and at prefill."""
    dtype = dtype or next(iter(model.buffers())).dtype
    device_type = torch.device(device).type
    return {
        "decode (1 token)": dict(kernel_plan(model, device_type, dtype, 1)),
        f"prefill ({prompt_tokens} tokens)": dict(
            kernel_plan(model, device_type, dtype, prompt_tokens)
        ),
    }


def add_kernel_rows(table: Table, result: dict) -> None:
    table.add_row("activations", result["dtype"])
    if "threads" in result:
        table.add_row("threads", str(result["threads"]))
    for phase, counts in result["kernels"].items():
        plan = ", ".join(f"{name} x{count}" for name, count in counts.items())
        table.add_row(phase, plan or "no quantized layers")


def print_eval(result: dict) -> None:
    table = Table(show_header=False, box=None, title="evaluation")
    table.add_row(
        "model",
        f"{result['model']} ({result['scheme']})" if "scheme" in result else result["model"],
    )
    table.add_row("text", f"{result['text']}: {result['tokens']} tokens scored")
    table.add_row("windows", f"{result['window']} tokens, stride {result['stride']}")
    table.add_row("activations", result["dtype"])
    if "threads" in result:
        table.add_row("threads", str(result["threads"]))
    if "perplexity" in result:
        table.add_row("perplexity", f"{result['perplexity']:.4f}")
    if "baseline" in result:
        table.add_row("baseline", result["baseline"])
    if "baseline_perplexity" in result:
        table.add_row("baseline perplexity", f"{result['baseline_perplexity']:.4f}")
        table.add_row(
            "Δ perplexity",
            f"{result['delta_perplexity']:+.4f} ({result['delta_perplexity_percent']:+.2f}%)",
        )
        table.add_row("KL divergence", f"{result['kl_divergence']:.5f} nats/token")
        table.add_row("top-1 agreement", f"{100 * result['top1_agreement']:.2f}%")
    if "cosine_similarity" in result:
        table.add_row("cosine similarity", f"{result['cosine_similarity']:.5f}")
    stdout.print(table)
