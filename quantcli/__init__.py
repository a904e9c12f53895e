"""quantcli: quantize Hugging Face checkpoints, publish them to the Hub and run them.

The library entry point mirrors torchao's ``quantize_(model, config)``::

    from quantcli import QuantConfig, replace_linear_layers
    report = replace_linear_layers(model, QuantConfig(bits=4, group_size=64))

and a checkpoint written by ``quantcli quantize`` loads with ``quantcli.load(path_or_repo)``.
"""

from quantcli.config import Granularity, QuantConfig, Scheme
from quantcli.models import ReplacementReport, replace_linear_layers
from quantcli.models.loading import load
from quantcli.nn import QuantLinear

__version__ = "0.1.0"

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
