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
