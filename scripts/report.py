"""Benchmark tables for people (the terminal) and for the docs (Markdown, dated).

`make bench` passes `--docs`: each script then also writes its table to
docs/generated/NAME.md, with the machine and the date, and the docs pages include those
files, so the published figures are always the ones the scripts last printed.
"""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

import torch
import transformers
from rich.table import Table

GENERATED = Path(__file__).resolve().parent.parent / "docs" / "generated"


def machine() -> str:
    """One line: date, CPU (or GPU), cores, memory, and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if "model name" in line)
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM"
    if torch.cuda.is_available():
        device += f", {torch.cuda.get_device_name()}"
    return (
        f"Measured on {datetime.date.today().isoformat()}: {device}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}."
    )


def write_markdown(table: Table, name: str, note: str = "") -> Path:
    """Write a rich table as docs/generated/NAME.md (sections and styles dropped)."""
    headers = [str(column.header) for column in table.columns]
    cells = [[_markdown_cell(str(cell)) for cell in column._cells] for column in table.columns]
    lines = [f"*{machine()}*", ""]
    if table.title:
        lines += [f"**{table.title}**", ""]
    lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in zip(*cells, strict=True)]
    if note:
        lines += ["", note]
    GENERATED.mkdir(exist_ok=True)
    path = GENERATED / f"{name}.md"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    print(f"Wrote {path}")
    return path


def _markdown_cell(cell: str) -> str:
    """A cell the terminal marks as chosen ("→ int8 int8pack") becomes bold in Markdown."""
    cell = cell.replace("|", "\\|")
    return f"**{cell[2:]}** (chosen)" if cell.startswith("→ ") else cell.strip()
