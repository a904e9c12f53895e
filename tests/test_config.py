import pytest
import torch

from quantcli import Granularity, QuantConfig, Scheme
from quantcli.errors import UsageError


def test_defaults_follow_the_bit_width():
    eight = QuantConfig()
    assert (eight.scheme, eight.granularity, eight.group_size) == (
        Scheme.SYM,
        Granularity.CHANNEL,
        None,
    )
    four = QuantConfig(bits=4)
    assert (four.scheme, four.granularity, four.group_size) == (Scheme.ASYM, Granularity.GROUP, 32)
    assert QuantConfig(bits=8, group_size=64).granularity is Granularity.GROUP
    assert QuantConfig(bits=2, scheme="sym", granularity="channel").group_size is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, "bits=3 is not supported"),
        ({"bits": 16}, "bits=16 is not supported"),
        ({"granularity": "channel", "group_size": 32}, "only applies to granularity 'group'"),
        ({"group_size": 0}, "must be a positive integer"),
        ({"dtype": torch.int8}, "floating-point"),
        ({"granularity": "tensor", "optimize": True}, "per channel or per group"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(UsageError, match=message):
        QuantConfig(**kwargs)


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError):
        QuantConfig(scheme="weird")


def test_label_names_bits_scheme_and_granularity():
    assert QuantConfig().label == "int8 sym channel"
    assert QuantConfig(bits=4).label == "int4 asym g32"
    assert QuantConfig(bits=2, scheme="sym", granularity="tensor").label == "int2 sym tensor"
    assert QuantConfig(bits=4, optimize=True).label == "int4 asym g32 +clip"


def test_messages_in_full_and_group_size_one_accepted():
    with pytest.raises(UsageError) as error:
        QuantConfig(bits=3)
    assert str(error.value) == "bits=3 is not supported: choose one of 8, 4, 2."
    with pytest.raises(UsageError) as error:
        QuantConfig(granularity="tensor", optimize=True)
    assert str(error.value) == (
        "optimize (the clipping search) works per channel or per group, not per tensor."
    )
    assert QuantConfig(bits=4, group_size=1).group_size == 1


def test_exclude_is_stored_as_a_tuple():
    """A frozen config must be hashable and immutable, whatever sequence it was given."""
    config = QuantConfig(exclude=["*.mlp.*", "lm_head"])
    assert config.exclude == ("*.mlp.*", "lm_head")
    hash(config.exclude)
