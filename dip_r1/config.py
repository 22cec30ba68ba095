"""Settings that travel together, each a typed, documented object passed whole.

:class:`SamplingConfig` is how completions are decoded (the rollout, ``validate`` / ``test`` / ``predict``, the
benchmarks); :class:`LossConfig` is the GRPO objective (:func:`dip_r1.grpo.grpo_loss`, the advantages). In YAML
they are nested under the module's arguments::

    model:
      init_args:
        sampling: {max_new_tokens: 256, temperature: 1.0}
        loss: {beta: 0.04, loss_type: bnpo}

and on the command line ``--model.init_args.sampling.temperature 0.7``. Each checks its values when built: a
setting out of range is one line naming it (:class:`~dip_r1.settings.SettingError`), before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from dip_r1.settings import SettingError, check_range

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
LOOK_MODES = ("text", "zoom")
SCALES = ("group", "batch", "none")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class SamplingConfig:
    """How a completion is decoded.

    Args:
        max_new_tokens: most tokens of a completion, >= 1; longer ones are truncated.
        min_new_tokens: fewest tokens of a completion (EOS is suppressed until then), in [0, max_new_tokens];
            benchmarks set it to ``max_new_tokens`` so that every run generates the same number of tokens.
        temperature: sampling temperature (also divides the logits when the completions are scored); > 0.
        top_p: nucleus sampling, in (0, 1].
        do_sample: sample; False decodes greedily (all G completions of a prompt alike, so their advantages
            are 0: for debugging), which is the way to greedy rollouts, not temperature 0.
        look_mode: ``"text"``: the ``<look>`` boxes are written and scored, nothing more; ``"zoom"``: after
            ``</look>`` the looked regions are cropped from the source image and shown to the model, as images,
            before it writes the answer, whose boxes may then be read off a crop (``"region": k``).
        max_looks: zoom: crops opened per completion, the first look boxes with an area on the image, >= 0.
        zoom_min_side: zoom: a look box smaller than this many source pixels a side is grown around its centre
            to it, >= 1.
        zoom_max_pixels: zoom: pixels a crop is shown with (magnified or reduced to fill them); None: the prompt
            image's budget.
    """

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True
    look_mode: Literal["text", "zoom"] = "text"
    max_looks: int = 2
    zoom_min_side: int = 32
    zoom_max_pixels: int | None = None

    def __post_init__(self) -> None:
        check_range("sampling.max_new_tokens", self.max_new_tokens, 1)
        check_range("sampling.min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        check_range("sampling.temperature", self.temperature, 0, None, low_open=True)
        check_range("sampling.top_p", self.top_p, 0, 1, low_open=True)
        if self.look_mode not in LOOK_MODES:
            raise SettingError(f"sampling.look_mode must be one of {LOOK_MODES}, got {self.look_mode!r}")
        check_range("sampling.max_looks", self.max_looks, 0)
        check_range("sampling.zoom_min_side", self.zoom_min_side, 1)
        if self.zoom_max_pixels is not None:
            check_range("sampling.zoom_max_pixels", self.zoom_max_pixels, 1)


@dataclass(frozen=True)
class LossConfig:
    """The GRPO objective: advantages, clipping, KL and how token losses are aggregated (:mod:`dip_r1.grpo`).

    Args:
        beta: weight of the KL penalty to the reference model, >= 0; 0 skips the reference forward entirely.
        epsilon_low: lower clip range of the ratio, >= 0.
        epsilon_high: upper clip range of the ratio, >= 0 (DAPO's clip-higher when above ``epsilon_low``);
            with ``loss_type="cispo"`` the bound on the importance weight itself, >= 1 (ScaleRL recommends 5).
        loss_type: ``"grpo"`` (mean per sequence), ``"bnpo"`` (mean per token of this rank's batch),
            ``"dr_grpo"`` (sum over sequences x ``max_new_tokens``), ``"dapo"`` (mean per token of the whole
            batch over all ranks; TRL's default) or ``"cispo"`` (MiniMax-M1: clipped, detached weight x
            advantage x log-prob, aggregated as ``"dapo"``).
        scale_rewards: advantages divided by the std of the ``"group"``, of the ``"batch"``, or ``"none"``.
        mask_truncated: leave completions that hit ``max_new_tokens`` out of the loss.
        importance_sampling_level: ``"token"`` (one ratio per token, PPO) or ``"sequence"`` (GSPO: one ratio
            per completion, the exp of its mean token log-ratio; the GSPO paper aggregates with ``"grpo"``).
        top_entropy_quantile: in (0, 1]: the surrogate counts on this top fraction of each micro-batch's tokens
            by entropy only ("Beyond the 80/20 rule" recommends 0.2); 1 (default) counts every token.
    """

    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    mask_truncated: bool = False
    importance_sampling_level: Literal["token", "sequence"] = "token"
    top_entropy_quantile: float = 1.0

    def __post_init__(self) -> None:
        check_range("loss.beta", self.beta, 0)
        check_range("loss.epsilon_low", self.epsilon_low, 0)
        check_range("loss.epsilon_high", self.epsilon_high, 0)
        if self.loss_type not in LOSS_TYPES:
            raise SettingError(f"loss.loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALES:
            raise SettingError(f"loss.scale_rewards must be one of {SCALES}, got {self.scale_rewards!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise SettingError(
                f"loss.importance_sampling_level must be one of {IS_LEVELS}, got {self.importance_sampling_level!r}"
            )
        check_range("loss.top_entropy_quantile", self.top_entropy_quantile, 0, 1, low_open=True)
        if self.loss_type == "cispo" and self.epsilon_high < 1:
            # CISPO clips the weight at epsilon_high itself: below 1 even on-policy tokens (weight 1) are cut.
            raise SettingError(
                f"loss.epsilon_high is CISPO's bound on the importance weight and must be >= 1 with loss_type "
                f"'cispo' (ScaleRL uses 5), got {self.epsilon_high!r}"
            )


# A module's hyper-parameters hold these objects, and checkpoints hold the hyper-parameters: let
# ``torch.load(weights_only=True)`` (Lightning's resume, ``dip_r1.export``) rebuild them.
torch.serialization.add_safe_globals([SamplingConfig, LossConfig])
