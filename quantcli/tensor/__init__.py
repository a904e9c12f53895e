"""Tensor math: quantize, dequantize, pack. Knows nothing of modules or files."""

from quantcli.tensor.packing import pack, pack_int32, unpack, unpack_int32
from quantcli.tensor.quantize import QuantizedTensor, dequantize, int_range, quantize

__all__ = [
    "QuantizedTensor",
    "dequantize",
    "int_range",
    "pack",
    "pack_int32",
    "quantize",
    "unpack",
    "unpack_int32",
]
