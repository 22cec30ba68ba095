"""Checks of GRPO settings when the module is built: one line naming the argument and its allowed range.

A setting that cannot work (``temperature 0``, ``max_new_tokens 0``, ``micro_batch_size 0``, ``group_size -3``)
otherwise surfaces as a traceback from deep inside a training step (a NaN in ``multinomial``, an empty
``argmax``, ``range()`` with step 0, a negative repeat of the KV cache). The CLI prints a
:class:`SettingError` as its one line (``dip_r1.cli``).
"""

from __future__ import annotations

import math
import warnings


class SettingError(ValueError):
    """A setting outside its allowed range; the message is one line naming the argument and the range."""


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> None:
    """Raise :class:`SettingError` unless ``low <= value <= high`` (``low < value`` with ``low_open``).

    >>> check_range("top_p", 1.0, 0, 1, low_open=True)
    >>> check_range("top_p", 0.0, 0, 1, low_open=True)
    Traceback (most recent call last):
    ...
    dip_r1.settings.SettingError: top_p must be in (0, 1], got 0.0
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if ok:
        return
    left = "(" if low_open else "["
    if high is None:
        allowed = f"{'>' if low_open else '>='} {_num(low)}"
    else:
        allowed = f"in {left}{_num(low)}, {_num(high)}]"
    raise SettingError(f"{name} must be {allowed}, got {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_grpo_settings(hp) -> None:
    """Check ``GRPOModule``'s own settings (its hparams, attribute access); :mod:`dip_r1.config`'s objects check
    theirs when they are built."""
    check_range("micro_batch_size", hp.micro_batch_size, 1)
    check_range("group_size", hp.group_size, 1)
    check_range("num_iterations", hp.num_iterations, 1)
    check_range("max_resample_batches", hp.max_resample_batches, 0)
    check_range("max_grad_norm", hp.max_grad_norm, 0)
    if hp.group_size == 1:
        # Group-relative advantages of a group of one are all 0: only the KL term (beta > 0) gives a gradient.
        warnings.warn(
            "group_size 1: every GRPO advantage is 0, so the policy only moves through the KL term (beta)",
            stacklevel=3,
        )
