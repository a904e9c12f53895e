"""quantcli: quantize Hugging Face checkpoints, publish them to the Hub and run them.

The library entry point mirrors torchao's ``quantize_(model, config)``::

    from quantcli import QuantConfig, replace_linear_layers
    report = replace_linear_layers(model, QuantConfig(bits=4, group_size=64))
"""

from quantcli.config import Granularity, QuantConfig, Scheme
from quantcli.models import ReplacementReport, replace_linear_layers
from quantcli.nn import QuantLinear

__version__ = "0.1.0"

__all__ = [
    "Granularity",
    "QuantConfig",
    "QuantLinear",
    "ReplacementReport",
    "Scheme",
    "__version__",
    "replace_linear_layers",
]
