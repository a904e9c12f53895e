"""The one object that says how a model is quantized.

Everything (the math, the layers, the model walker, later the checkpoint writer) takes a
`QuantConfig`, in the spirit of torchao's `quantize_(model, config)`: one place decides the
defaults and rejects settings that cannot work, so no caller repeats those rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from quantcli.errors import UsageError

#: Bit widths with a storage layout (int8, or packed into int32 words).
SUPPORTED_BITS = (8, 4, 2)
DEFAULT_GROUP_SIZE = 32


class Scheme(str, Enum):
    """Symmetric (zero point 0, absmax) or asymmetric (affine, with a zero point)."""

    SYM = "sym"
    ASYM = "asym"


class Granularity(str, Enum):
    """Which weights share one scale: the whole tensor, one output row, or a group."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the weights of linear layers.

    Defaults follow the usual practice: 8-bit is symmetric per channel, 4- and 2-bit are
    asymmetric per group of 32 inputs. `dtype` is the dtype of scales (None: the weight's
    own dtype). `exclude` holds glob patterns on module names kept in float (or regexes
    after ``re:``, compressed-tensors' convention); the output head is kept too unless
    `quantize_head` is set. `quantize_embeddings` quantizes the input embedding table too
    (and a head tied to it computes from that quantized table). `optimize` searches each
    group's clipping range for the least reconstruction error instead of rounding its full
    range.
    """

    bits: int = 8
    scheme: Scheme | None = None
    granularity: Granularity | None = None
    group_size: int | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)
    quantize_head: bool = False
    quantize_embeddings: bool = False
    dtype: torch.dtype | None = None
    optimize: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UsageError(
                f"bits={self.bits} is not supported: choose one of "
                f"{', '.join(map(str, SUPPORTED_BITS))}."
            )
        low_bit = self.bits < 8
        scheme = Scheme(self.scheme) if self.scheme else (Scheme.ASYM if low_bit else Scheme.SYM)
        if self.granularity:
            granularity = Granularity(self.granularity)
        elif self.group_size is not None or low_bit:
            granularity = Granularity.GROUP
        else:
            granularity = Granularity.CHANNEL
        group_size = self.group_size
        if granularity is Granularity.GROUP:
            group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
            if group_size < 1:
                raise UsageError(f"group_size={group_size} must be a positive integer.")
        elif group_size is not None:
            raise UsageError(
                f"group_size={group_size} only applies to granularity 'group', "
                f"not '{granularity.value}'."
            )
        if self.optimize and granularity is Granularity.TENSOR:
            raise UsageError(
                "optimize (the clipping search) works per channel or per group, not per tensor."
            )
        if self.dtype is not None and not self.dtype.is_floating_point:
            raise UsageError(f"dtype={self.dtype} must be a floating-point dtype for scales.")
        object.__setattr__(self, "scheme", scheme)
        object.__setattr__(self, "granularity", granularity)
        object.__setattr__(self, "group_size", group_size)
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def symmetric(self) -> bool:
        return self.scheme is Scheme.SYM

    @property
    def label(self) -> str:
        """Short name for people: 'int8 sym channel', 'int4 asym g32'."""
        if self.granularity is Granularity.GROUP:
            label = f"int{self.bits} {self.scheme.value} g{self.group_size}"
        else:
            label = f"int{self.bits} {self.scheme.value} {self.granularity.value}"
        return f"{label} +clip" if self.optimize else label

    @property
    def fields(self) -> str:
        """'bits=4, scheme=asym, granularity=group, group_size=32': the weights' format as
        the quantized modules' reprs print it."""
        group = f", group_size={self.group_size}" if self.granularity is Granularity.GROUP else ""
        return (
            f"bits={self.bits}, scheme={self.scheme.value}, "
            f"granularity={self.granularity.value}{group}"
        )

    @property
    def packed(self) -> bool:
        """Below 8 bits, values are packed several to an int32 word."""
        return self.bits < 8
