"""quantcli: quantize Hugging Face checkpoints, publish them to the Hub and run them.

The library entry point mirrors torchao's ``quantize_(model, config)``::

    from quantcli import QuantConfig, replace_linear_layers
    report = replace_linear_layers(model, QuantConfig(bits=4, group_size=64))

and a checkpoint written by ``quantcli quantize`` loads with ``quantcli.load(path_or_repo)``.

The names below are imported on first use: importing ``quantcli`` alone does not import
torch, so the console entry point (``quantcli.cli.main``) can set OpenMP's environment
before torch starts its OpenMP runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Granularity": "quantcli.config",
    "QuantConfig": "quantcli.config",
    "Scheme": "quantcli.config",
    "ReplacementReport": "quantcli.models",
    "replace_linear_layers": "quantcli.models",
    "load": "quantcli.models.loading",
    "QuantLinear": "quantcli.nn",
}

__all__ = [
    "Granularity",
    "QuantConfig",
    "QuantLinear",
    "ReplacementReport",
    "Scheme",
    "__version__",
    "load",
    "replace_linear_layers",
]

if TYPE_CHECKING:
    from quantcli.config import Granularity, QuantConfig, Scheme
    from quantcli.models import ReplacementReport, replace_linear_layers
    from quantcli.models.loading import load
    from quantcli.nn import QuantLinear


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantcli' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
