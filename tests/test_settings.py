"""Settings that cannot work fail when GRPOModule is built, in one line naming the argument and its range."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

from dip_r1.config import LossConfig, SamplingConfig
from dip_r1.models import PolicySpec
from dip_r1.module import GRPOModule
from dip_r1.settings import SettingError, check_grpo_settings

DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(GRPOModule).parameters.items()
    if p.default is not inspect.Parameter.empty
}

# argument: (values outside the range, values at or inside its bounds, the range as the message says it)
BOUNDS = {
    "micro_batch_size": ([0, -2], [1, 16], ">= 1"),
    "group_size": ([0, -3], [2, 8], ">= 1"),
    "num_iterations": ([0, -1], [1, 4], ">= 1"),
    "max_grad_norm": ([-1.0], [0.0, 1.0], ">= 0"),
}
# the same for the fields of the settings objects, named as the message names them
CONFIG_BOUNDS = {
    (SamplingConfig, "temperature"): ([0, -1, float("nan")], [1e-3, 1.0, 5.0], "> 0"),
    (SamplingConfig, "top_p"): ([0, -0.5, 1.01], [1e-3, 1.0], "in (0, 1]"),
    (SamplingConfig, "max_new_tokens"): ([0, -1], [1, 256], ">= 1"),
    (SamplingConfig, "min_new_tokens"): ([-1, 257], [0, 256], "in [0, 256]"),
    (LossConfig, "beta"): ([-0.01], [0.0, 0.04], ">= 0"),
    (LossConfig, "epsilon_low"): ([-0.1], [0.0, 0.2], ">= 0"),
    (LossConfig, "epsilon_high"): ([-0.1], [0.0, 0.28], ">= 0"),
}
PREFIX = {SamplingConfig: "sampling", LossConfig: "loss"}


@pytest.mark.parametrize("key", sorted(CONFIG_BOUNDS, key=str))
def test_settings_objects_check_their_fields_in_one_line(key):
    cls, name = key
    bad, good, allowed = CONFIG_BOUNDS[key]
    for value in bad:
        with pytest.raises(SettingError) as info:
            cls(**{name: value})
        assert str(info.value) == f"{PREFIX[cls]}.{name} must be {allowed}, got {value!r}"
    for value in good:
        cls(**{name: value})


def test_loss_choices_are_checked():
    with pytest.raises(SettingError, match="loss.loss_type must be one of"):
        LossConfig(loss_type="mean")
    with pytest.raises(SettingError, match="loss.scale_rewards must be one of"):
        LossConfig(scale_rewards="token")


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_out_of_range_fails_at_construction_in_one_line(name, tmp_path):
    bad, _, allowed = BOUNDS[name]
    for value in bad:
        with pytest.raises(SettingError) as info:
            # no checkpoint there: the settings are checked before the model path is even looked at
            GRPOModule(PolicySpec(str(tmp_path / "no-model")), **{name: value})
        message = str(info.value)
        assert message == f"{name} must be {allowed}, got {value!r}"
        assert "\n" not in message


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_values_at_the_bounds_pass(name):
    for value in BOUNDS[name][1]:
        check_grpo_settings(SimpleNamespace(**{**DEFAULTS, name: value}))


def test_group_of_one_warns():
    with pytest.warns(UserWarning, match="group_size 1"):
        check_grpo_settings(SimpleNamespace(**{**DEFAULTS, "group_size": 1}))


def test_a_setting_error_is_a_value_error():
    assert issubclass(SettingError, ValueError)
