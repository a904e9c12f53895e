"""What a command does to its own process: the command line it records, how it frees memory."""

import ctypes
import shlex
import sys


def command_line() -> str:
    """This run's command line for the record, with any --token value masked."""
    args = sys.argv[1:]
    masked = []
    for i, arg in enumerate(args):
        if i and args[i - 1] == "--token":
            masked.append("***")
        else:
            masked.append("--token=***" if arg.startswith("--token=") else arg)
    return shlex.join(["quantcli", *masked])


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
