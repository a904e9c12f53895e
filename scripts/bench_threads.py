"""Decode speed of `quantcli generate` with and without a competing CPU-bound process, under
OpenMP's two wait policies (prints a table; `--docs` writes docs/generated/threads.md).

SmolLM2-135M-Instruct is quantized to int8 into a temporary folder, then `quantcli
generate` runs in a fresh process for every cell, greedy, with `OMP_WAIT_POLICY` set to
ACTIVE (OpenMP's threads spin while they wait for work: libgomp's default) or PASSIVE (they
sleep: quantcli's default when the variable is unset). "busy" adds one busy-looping Python
process per CPU this process may use, each pinned to its CPU, started before `generate`
and stopped after it. The cells are run in turn, `--repeats` times; the table gives the
median decode tokens/s (`decode_tokens_per_second` of `generate --json`, prefill excluded)
and the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_markdown
from rich.console import Console
from rich.table import Table
from smollm2 import smollm2_folder

PROMPT = "The history of the city of Paris begins"
CELLS = [
    ("none", "ACTIVE"),
    ("none", "PASSIVE"),
    ("busy", "ACTIVE"),
    ("busy", "PASSIVE"),
]
BUSY_LOOP = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def quantcli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "quantcli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if result.returncode != 0:
        raise SystemExit(f"quantcli {' '.join(args)} failed:\n{result.stderr}")
    return result


def start_busy_loops() -> list[subprocess.Popen]:
    """One busy-looping process per CPU of this process's affinity, pinned to it."""
    return [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cpu)])
        for cpu in sorted(os.sched_getaffinity(0))
    ]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        process.kill()
    for process in processes:
        process.wait()


def decode_speed(folder: Path, policy: str, load: str, new_tokens: int, threads: int | None):
    env = dict(os.environ, OMP_WAIT_POLICY=policy)
    busy = start_busy_loops() if load == "busy" else []
    try:
        time.sleep(0.5 if busy else 0)  # let them reach their loop
        args = [str(folder), PROMPT, "--max-new-tokens", str(new_tokens), "--no-chat", "--json"]
        if threads:
            args += ["--threads", str(threads)]
        result = json.loads(quantcli("generate", *args, env=env).stdout)
    finally:
        stop(busy)
    return result["decode_tokens_per_second"], result["new_tokens"], result.get("threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="generate --threads (default: its own)")
    parser.add_argument("--docs", action="store_true", help="also write docs/generated/threads.md")
    args = parser.parse_args()
    console = Console(width=160)
    source = smollm2_folder(args.cache)
    speeds: dict[tuple[str, str], list[float]] = {cell: [] for cell in CELLS}
    threads = None
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as scratch:
        folder = Path(scratch) / "smollm2-int8"
        quantcli("quantize", str(source), "--out", str(folder), "--json")
        for repeat in range(args.repeats):
            for load, policy in CELLS:
                speed, tokens, threads = decode_speed(
                    folder, policy, load, args.new_tokens, args.threads
                )
                speeds[(load, policy)].append(speed)
                console.print(
                    f"run {repeat + 1}: competing load {load}, OMP_WAIT_POLICY={policy}: "
                    f"{speed:.2f} tok/s ({tokens} tokens, {threads} threads)"
                )
    table = Table(
        "competing process",
        "OMP_WAIT_POLICY",
        "decode tok/s (median)",
        "min-max",
        "× none, PASSIVE",
    )
    reference = statistics.median(speeds[("none", "PASSIVE")])
    cpus = len(os.sched_getaffinity(0))
    for (load, policy), runs in speeds.items():
        median = statistics.median(runs)
        table.add_row(
            "none" if load == "none" else f"{cpus} busy loops, one per CPU",
            policy,
            f"{median:.2f}",
            f"{min(runs):.2f}-{max(runs):.2f}",
            f"{median / reference:.2f}",
        )
    console.print(table)
    if args.docs:
        write_markdown(
            table,
            "threads",
            f"`quantcli generate` of SmolLM2-135M-Instruct int8, greedy, {args.new_tokens} new "
            f"tokens, {threads} threads (`--threads` default: the physical cores), "
            f'{args.repeats} runs per cell, each a fresh process. "none": no busy loop '
            f"started; other processes may share the host (1-minute load average "
            f"{load_before:.1f} before the runs).",
        )


if __name__ == "__main__":
    main()
