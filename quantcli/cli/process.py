"""What a command does to its own process: the command line it records, how it frees memory."""

import ctypes
import os
import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """This run's command line for the record (model cards publish it): any --token value
    masked, local paths cut to their last name."""
    args = sys.argv[1:]
    masked = []
    for i, arg in enumerate(args):
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if i and args[i - 1] == "--token":
            masked.append("***")
        elif option == "--token" and equals:
            masked.append("--token=***")
        else:
            masked.append(f"{option}{equals}{_path_name(value)}")
    return shlex.join(["quantcli", *masked])


def _path_name(arg: str) -> str:
    """A local path's last name (``/home/me/models/llama`` -> ``llama``); anything else,
    Hub ids included, as it is."""
    path = Path(arg).expanduser()
    if arg.startswith(("/", "~", "./", "../")) or (os.sep in arg and path.exists()):
        return path.resolve().name or arg
    return arg


def return_big_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB for this process.

    By default glibc raises the threshold to the largest block freed so far (an embedding
    matrix, say), after which every smaller tensor comes from a heap that only grows:
    quantizing a 1 GB model then peaked 250 MB higher. Set only by quantize and load,
    which pass through many large one-off tensors; a no-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


def physical_cores(sysfs: Path = Path("/sys")) -> int:
    """The physical cores this process may run on: the CPUs of its affinity mask, counted
    once per core (hyperthread siblings share one), then capped by a cgroup CPU quota.

    Core ids come from /sys (``topology/core_id`` within ``physical_package_id``, as lscpu
    counts them); without /sys (not Linux, or hidden) every allowed CPU counts as a core.
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"devices/system/cpu/cpu{cpu}/topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", cpu))  # no topology for it: count it as its own core
            continue
        cores.add((package, core))
    count = max(1, len(cores))
    quota = _cgroup_cpu_quota(sysfs / "fs/cgroup")
    return max(1, min(count, quota)) if quota else count


def _cgroup_cpu_quota(cgroup: Path) -> int | None:
    """The CPUs a cgroup v2 (``cpu.max``) or v1 (``cfs_quota_us``) quota allows, rounded
    up; None without a quota."""
    for quota_file, period_file in (
        (cgroup / "cpu.max", None),
        (cgroup / "cpu/cpu.cfs_quota_us", cgroup / "cpu/cpu.cfs_period_us"),
    ):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return max(1, -(-int(quota) // int(period)))
        except (OSError, ValueError, IndexError):
            continue
    return None


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: the physical cores) before a command computes;
    returns the number set."""
    import torch

    count = threads or physical_cores()
    torch.set_num_threads(count)
    return count
