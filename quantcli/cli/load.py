"""`quantcli load`: load a quantized checkpoint and run one forward pass."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.table import Table

from quantcli.cli.options import (
    DtypeChoice,
    JsonOption,
    RevisionOption,
    RunDtypeOption,
    ThreadsOption,
    TokenOption,
    TrustRemoteCodeOption,
    VerboseOption,
    check_device,
    check_range,
    dtype_name,
    run_dtype,
)
from quantcli.cli.output import (
    add_kernel_rows,
    kernel_summary,
    stdout,
)
from quantcli.cli.process import return_big_frees_to_the_os, use_threads
from quantcli.models.loading import load_quantized, sanity_forward
from quantcli.models.source import resolve_model
from quantcli.units import format_bytes

# Shown under --help.
EXAMPLES = [
    "quantcli load ./opt-125m-int8",
    "quantcli load me/opt-125m-int8 --dtype bf16 --json",
]


def load(
    model: Annotated[str, typer.Argument(help="Quantized checkpoint: local folder or Hub id.")],
    device: Annotated[
        str, typer.Option(help="Device to load onto: cpu, cuda, cuda:1...", metavar="DEVICE")
    ] = "cpu",
    dtype: RunDtypeOption = DtypeChoice.auto,
    revision: RevisionOption = None,
    token: TokenOption = None,
    trust_remote_code: TrustRemoteCodeOption = False,
    threads: ThreadsOption = None,
    json_output: JsonOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Load a quantized checkpoint without a float copy and run one forward pass."""
    check_range("--threads", threads, 1)
    check_device(device)
    return_big_frees_to_the_os()
    threads = use_threads(threads)
    source = resolve_model(model, revision, token)
    loaded, report = load_quantized(source, device, run_dtype(dtype), trust_remote_code)
    check = sanity_forward(loaded)
    result = {
        "model": model,
        "model_class": report.model_class,
        "bits": report.config.bits,
        "layers_quantized": report.quantized,
        "layers_float": report.kept_float,
        "bytes_in_memory": report.tensor_bytes,
        "load_seconds": round(report.seconds, 3),
        "peak_rss_bytes": report.peak_rss_bytes,
        "forward_ok": check,
        "dtype": dtype_name(report.dtype),
        "kernels": kernel_summary(loaded, device, report.dtype),
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }
    if json_output:
        print(json.dumps(result))
        return
    table = Table(show_header=False, box=None)
    table.add_row("model", f"{report.model_class} from {model}")
    table.add_row(
        "layers",
        f"{report.quantized} quantized (int{report.config.bits}), "
        f"{report.kept_float} kept in float",
    )
    table.add_row("in memory", format_bytes(report.tensor_bytes))
    table.add_row("load time", f"{report.seconds:.2f} s")
    table.add_row("peak memory", f"{format_bytes(report.peak_rss_bytes)} (whole process)")
    table.add_row("forward pass", check)
    if verbose:
        add_kernel_rows(table, result)
    stdout.print(table)
