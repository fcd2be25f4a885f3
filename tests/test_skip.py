import pytest

from adn import SkipConfig


def test_parses_every_accepted_form():
    assert str(SkipConfig("TTFF")) == "TTFF"
    assert str(SkipConfig("ttff")) == "TTFF"
    assert str(SkipConfig([True, True, False, False])) == "TTFF"
    assert str(SkipConfig((False, True))) == "FT"
    assert str(SkipConfig("super", num_stages=3)) == "FFF"
    assert str(SkipConfig("base", num_stages=3)) == "TTT"
    assert SkipConfig(SkipConfig("TF")) == SkipConfig("TF")
    assert SkipConfig("TTFF") == (True, True, False, False)


def test_all_lists_every_subnetwork_super_first_base_last():
    configs = SkipConfig.all(4)
    assert len(configs) == 16 and len(set(configs)) == 16
    assert configs[0].is_super and configs[-1].is_base
    assert [sum(c) for c in configs] == sorted(sum(c) for c in configs)


@pytest.mark.parametrize("bad", ["TTF", "TTFFF", "TTFX", "", "deep", [True] * 5, [1, 0, 1, 0], 7, None])
def test_bad_forms_raise_value_error_naming_stage_count_and_forms(bad):
    with pytest.raises(ValueError) as info:
        SkipConfig(bad, num_stages=4)
    message = str(info.value)
    assert "4 stages" in message and "'super'" in message and "TTFF" in message


def test_super_and_base_need_the_stage_count():
    with pytest.raises(ValueError, match="number of stages"):
        SkipConfig("base")
