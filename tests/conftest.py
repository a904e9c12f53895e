import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# As the quantcli entry point does (quantcli/cli/__init__.py), before torch starts OpenMP:
# threads that spin while waiting slow everything else sharing the cores, here the other
# pytest workers (`make test` runs one a core).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# tests import their helpers (tiny_models) as plain modules
sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build, char_tokenizer  # noqa: E402

from quantcli.nn import kernels  # noqa: E402

# In CI the property tests draw the same examples every run, so a red build points at the
# change, not at a new random draw; elsewhere each run draws afresh and may find new bugs.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    """Tiny random models saved as Hub-style folders, built once per session."""
    root = tmp_path_factory.mktemp("models")
    folders = {}

    def folder(arch: str, **save_kwargs) -> Path:
        key = (arch, tuple(sorted(save_kwargs.items())))
        if key not in folders:
            path = root / f"{arch}-{len(folders)}"
            build(arch).save_pretrained(path, **save_kwargs)
            char_tokenizer().save_pretrained(path)
            folders[key] = path
        return folders[key]

    return folder


def pytest_collection_modifyitems(items):
    """The family matrix is the longest test file: collected first, so that `make test`'s
    workers (one file at a time each) run the other files beside it, not after it."""
    items.sort(key=lambda item: item.path.name != "test_families.py")


#: What this CPU answers (before `fixed_cpu_kind` pins it): CLI runs in a subprocess see it.
BF16_MATMUL_HARDWARE = kernels.bf16_matmul_hardware()
#: Whether quantcli's int8 kernel runs here (built now, once per machine, if it can be).
NATIVE_INT8 = kernels.native_int8()
#: The mark of tests of quantcli's int8 kernel, which needs a C++ compiler and AVX2.
needs_native_int8 = pytest.mark.skipif(
    not NATIVE_INT8, reason="quantcli's int8 kernel could not be built or run here"
)


def kernel_names() -> list:
    """Every kernel's name as a test parameter, quantcli's own marked `needs_native_int8`."""
    return [
        pytest.param(name, marks=needs_native_int8) if name == "int8-native" else name
        for name in kernels.KERNELS
    ]


@pytest.fixture(autouse=True)
def fixed_cpu_kind(monkeypatch):
    """Dispatch depends on whether the CPU has bf16 matmul hardware, and CI's CPU changes
    between runs (an AVX2 EPYC, an AMX Xeon): in-process tests see a CPU without it unless
    they ask for `bf16_hardware`, so each expectation is checked on every machine. Likewise
    quantcli's int8 kernel is off unless a test asks for `native_int8` (it may not build)."""
    monkeypatch.setattr(kernels, "bf16_matmul_hardware", lambda: False)
    monkeypatch.setattr(kernels, "native_int8", lambda: False)


@pytest.fixture
def native_int8(monkeypatch):
    """quantcli's int8 kernel on, as where it builds (skipped where it does not)."""
    if not NATIVE_INT8:
        pytest.skip("quantcli's int8 kernel could not be built or run here")
    monkeypatch.setattr(kernels, "native_int8", lambda: True)


@pytest.fixture
def bf16_hardware(monkeypatch):
    """A CPU with bf16 matmul hardware (AMX, AVX512-BF16), as far as dispatch can tell."""
    monkeypatch.setattr(kernels, "bf16_matmul_hardware", lambda: True)
