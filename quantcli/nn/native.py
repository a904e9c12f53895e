"""quantcli's own CPU kernels (csrc/), compiled for this machine on first use and cached.

PyTorch's fused int8 kernel reads the weight at about 60% of the rate a bf16 matmul reads
its own, which caps int8 decode near 1.4x bf16 on a 1B model where half the bytes promise
2x (csrc/int8_gemv.cpp says how ours does better). A C++ source compiled here, rather than
a wheel per platform, keeps quantcli a pure Python package: the build needs a C++ compiler
(g++ or $CXX) and PyTorch's headers, takes about 15 s once per machine and PyTorch version,
and is kept under ``$XDG_CACHE_HOME/quantcli/kernels``. Without a compiler, or on a CPU
without AVX2, decode runs PyTorch's kernel and quantcli says so once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "int8_gemv.cpp"
#: The most activation rows (tokens) the int8 kernel takes in one call.
INT8_GEMV_MAX_ROWS = 64

_lock = threading.Lock()


@cache
def int8_gemv_isa() -> str:
    """``"avx512"`` or ``"avx2"`` when the int8 kernel is built and runs on this CPU, else
    ``""`` (after saying once on stderr why not)."""
    with _lock:
        try:
            torch.ops.load_library(str(_built_library()))
        except KernelUnavailable as error:
            print(f"quantcli: {error}; decode uses PyTorch's int8 kernel.", file=sys.stderr)
            return ""
        torch.library.register_fake("quantcli::int8_gemv")(_int8_gemv_shape)
    isa = torch.ops.quantcli.int8_gemv_isa()
    if not isa:
        print("quantcli: this CPU lacks AVX2; decode uses PyTorch's int8 kernel.", file=sys.stderr)
    return isa


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(x @ q.T) * scale`` in `x`'s dtype: x float32 or bf16 ``(M <= 64, K)``, q int8
    ``(N, K)``, scale float32 ``(N,)``, summed in float32 and rounded once."""
    return torch.ops.quantcli.int8_gemv(x, q, scale)


def _int8_gemv_shape(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What `torch.compile` traces the kernel as."""
    return x.new_empty(x.shape[0], q.shape[0])


class KernelUnavailable(Exception):
    """The kernel could not be built here (no compiler, a failed build)."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantcli" / "kernels"


def _built_library() -> Path:
    """The compiled library for this source, PyTorch and Python, built now if missing."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        source + f"{torch.__version__}|{sys.version}|{sysconfig.get_platform()}".encode()
    ).hexdigest()[:16]
    library = cache_dir() / key / "int8_gemv.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler (g++, or $CXX) to build the int8 CPU kernel")
    print("quantcli: building the int8 CPU kernel for this machine (once, ~15 s)...", file=sys.stderr)
    library.parent.mkdir(parents=True, exist_ok=True)
    # built beside its final place and renamed into it: a concurrent build (another process)
    # or an interrupted one never leaves a half-written library where it would be loaded
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        built = Path(scratch) / library.name
        try:
            result = subprocess.run(
                _compile_command(compiler, built), capture_output=True, text=True, check=False
            )
        except OSError as error:
            raise KernelUnavailable(f"cannot run the C++ compiler {compiler} ({error})") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise KernelUnavailable(f"building the int8 CPU kernel failed ({last})")
        os.replace(built, library)
    return library


def _compile_command(compiler: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension  # imports setuptools: only when building

    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = [f"-L{path}" for path in cpp_extension.library_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler, str(SOURCE), "-o", str(output),
        "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",  # -fopenmp: at::parallel_for
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, *libraries,
        "-lc10", "-ltorch_cpu", "-ltorch",
        *(f"-Wl,-rpath,{path}" for path in cpp_extension.library_paths()),
    ]  # fmt: skip
