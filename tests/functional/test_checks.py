"""The one argument-check module and the one seed derivation."""
import doctest
import math

import pytest
import torch

from lightning_hyper.functional import checks, seeding
from lightning_hyper.functional.checks import check_choice, check_fraction, check_number
from lightning_hyper.functional.seeding import derive_seed, seeded_generator


@pytest.mark.parametrize("module", [checks, seeding])
def test_doctests(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


@pytest.mark.parametrize("value, kw, ok", [
    (0.5, {"low": 0}, True), (0, {"low": 0}, False), (0, {"low": 0, "low_inclusive": True}, True),
    (True, {}, False), (math.nan, {}, False), (math.inf, {}, False), ("1", {}, False),
    (2.0, {"integer": True}, False), (3, {"integer": True, "high": 3}, True),
    (3, {"integer": True, "high": 3, "high_inclusive": False}, False), (None, {"allow_none": True}, True),
])
def test_check_number(value, kw, ok):
    if ok:
        assert check_number("x", value, **kw) == value
    else:
        with pytest.raises(ValueError, match=r"^x=.* is not supported; accepted values: "):
            check_number("x", value, **kw)


def test_messages_name_argument_value_accepted_and_fix():
    with pytest.raises(ValueError) as err:
        check_fraction("val_fraction", 1.0, owner="DigitsDataModule", fix="use 0.2")
    assert str(err.value) == ("DigitsDataModule: val_fraction=1.0 is not supported; accepted values: "
                              "a finite number in [0, 1). Fix: use 0.2")
    with pytest.raises(ValueError, match=r"mode='Loss' is not supported; accepted values: 'loss', 'gradient'"):
        check_choice("mode", "Loss", ("loss", "gradient"))
    with pytest.raises(ValueError):
        check_choice("flag", 1, (True, False))  # 1 == True, but it is not the bool


def test_derive_seed_is_splitmix64_and_stable():
    # SplitMix64 of 0 is the published first output of the generator seeded with 0: 0xE220A8397B1DCDAF
    assert derive_seed(0) == 0xE220A8397B1DCDAF & 0x7FFF_FFFF_FFFF_FFFF
    assert derive_seed(1, 2) != derive_seed(2, 1)
    a = torch.randn(3, generator=seeded_generator(7, 3))
    assert torch.equal(a, torch.randn(3, generator=seeded_generator(7, 3)))
