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
    "max_resample_batches": ([-1], [0, 3], ">= 0"),
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
    (LossConfig, "top_entropy_quantile"): ([0.0, -0.2, 1.5], [0.2, 1.0], "in (0, 1]"),
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
    with pytest.raises(SettingError, match="loss.importance_sampling_level must be one of"):
        LossConfig(importance_sampling_level="group")
    # CISPO's epsilon_high bounds the weight itself: below 1 it would cut on-policy tokens
    with pytest.raises(SettingError) as info:
        LossConfig(loss_type="cispo")
    assert str(info.value) == (
        "loss.epsilon_high is CISPO's bound on the importance weight and must be >= 1 with loss_type 'cispo' "
        "(ScaleRL uses 5), got 0.2"
    )
    LossConfig(loss_type="cispo", epsilon_high=5.0)
    for loss_type in ("dapo", "bnpo", "dr_grpo", "grpo"):
        LossConfig(loss_type=loss_type, importance_sampling_level="sequence")


def test_new_options_default_off():
    """Today's behaviour unless asked: token-level ratios, every token, no resampling."""
    loss = LossConfig()
    assert (loss.loss_type, loss.importance_sampling_level, loss.top_entropy_quantile) == (
        "grpo",
        "token",
        1.0,
    )
    assert DEFAULTS["dynamic_sampling"] is False and DEFAULTS["max_resample_batches"] == 3


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
