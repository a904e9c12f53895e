"""Option types and choices shared by several commands (one definition, one help text)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import torch
import typer

from quantcli.errors import UsageError

RevisionOption = Annotated[
    str | None,
    typer.Option(
        "--revision", help="Hub branch, tag or commit (Hub ids only).", metavar="REVISION"
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`).",
        metavar="TOKEN",
        show_default=False,
    ),
]
TrustRemoteCodeOption = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code", help="Allow running the model's own Python code from its repo."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON summary, nothing else.")]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Say which dtype and matmul kernels run.")
]
ThreadsOption = Annotated[
    int | None,
    typer.Option(
        "--threads",
        metavar="N",
        help="CPU threads to compute with (default: the physical cores this process may use). "
        "quantcli also sets OMP_WAIT_POLICY=PASSIVE unless you set it: idle OpenMP threads "
        "then sleep instead of spinning, which keeps decoding fast when another process "
        "shares the cores.",
        show_default=False,
    ),
]
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Bits(str, Enum):
    eight = "8"
    four = "4"
    two = "2"


class DtypeChoice(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


RunDtypeOption = Annotated[
    DtypeChoice,
    typer.Option(
        "--dtype",
        help="dtype of activations and float tensors (auto: the fastest for the device and "
        "the layers' kernels, e.g. bf16 for int8/int4 on CPU, fp32 for 2-bit).",
    ),
]


def run_dtype(choice: DtypeChoice) -> torch.dtype | str:
    return "auto" if choice is DtypeChoice.auto else DTYPES[choice.value]


def dtype_name(dtype: torch.dtype | None) -> str:
    return "as stored" if dtype is None else str(dtype).removeprefix("torch.")


def check_range(option: str, value: float | None, low: float, high: float | None = None) -> None:
    """Refuse a number out of range in one line naming the option, the value and the range."""
    if value is None or (value >= low and (high is None or value <= high)):
        return
    accepted = f"{low} or more" if high is None else f"{low} to {high}"
    raise UsageError(f"{option} {value}: it takes {accepted}.")


def available_devices() -> list[str]:
    """The devices this torch can run on here: cpu, each visible GPU, Apple's mps."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += ["cuda", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def check_device(device: str) -> None:
    """Refuse, before any loading, a --device this machine cannot run on: a misspelt name,
    a GPU on a CPU-only torch or one that is not there (torch itself would fail late, with
    an AssertionError or a list of every device type it knows)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    available = available_devices()
    if parsed is not None and (parsed.type == "cpu" or str(parsed) in available):
        return
    problem = "is not a device name" if parsed is None else "is not available here"
    if parsed is not None and parsed.type == "cuda" and "cuda" not in available:
        problem = "needs a GPU, but this torch has no CUDA or sees no GPU"
    raise UsageError(f"--device {device} {problem}: use one of {', '.join(available)}.")
