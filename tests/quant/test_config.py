import pytest

from bitcliff.quant.config import QuantConfig


@pytest.mark.parametrize("bits", [1, 5, 8, 0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=f"bits must be one of .*{bits!r}"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("group_size", [0, -2, -128, 1.5, True, 7, 100])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        QuantConfig(group_size=group_size)


def test_bad_method_and_damp():
    with pytest.raises(ValueError, match="'awq'"):
        QuantConfig(method="awq")
    with pytest.raises(ValueError, match="damp_percent"):
        QuantConfig(damp_percent=0)
    with pytest.raises(ValueError, match="calib_samples"):
        QuantConfig(calib_samples=0)


def test_frozen_round_trip_and_effective_bits():
    config = QuantConfig(bits=3, group_size=64, skip_modules=["lm_head"])
    assert config.skip_modules == ("lm_head",)
    with pytest.raises(AttributeError):
        config.bits = 4
    assert QuantConfig.from_dict(config.to_dict()) == config
    assert config.effective_bits(576) == pytest.approx(3 + 19 / 64)
    assert QuantConfig(bits=4, group_size=-1).effective_bits(576) == pytest.approx(4 + 20 / 576)
    assert config.describe() == "rtn-w3g64-asym"
