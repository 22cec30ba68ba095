"""Time GRPO optimiser steps of ``GRPOModule`` on a fixed synthetic batch; print one JSON line.

    python bench/grpo_step.py --model runs/tiny-s --prompts 2 --group 8 --max-new-tokens 128 --steps 5 \\
        --fixed-length --lora-r 16 --image-size 448

Each step is the module's whole ``training_step``: rollout (G completions per prompt), rewards,
advantages, reference log-probs when beta > 0, the loss and its backward over micro-batches, the optimiser
step. The first ``--warmup`` steps are run but not counted. Keys:

- ``step_s``: median seconds per optimiser step; ``rollout_s``: the median rollout part of it.
- ``tokens_per_s``: completion tokens generated per second of step (``tokens_per_step / step_s``);
  ``rollout_tokens_per_s`` per second of rollout.
- ``vision_calls_per_step``: images through the vision encoder per step, everything included (rollout
  and scoring); it equals the number of prompts B when the encoder runs once per prompt and its output is
  reused by the scoring passes, B x G if the rollout repeated each prompt G times; with ``--look-mode zoom``,
  B + ``crops_per_step`` when each crop is encoded once.
  ``vision_calls_rollout_per_step`` / ``vision_calls_scoring_per_step`` split it;
  ``vision_forward_calls_per_step`` counts batched encoder forwards (one forward encodes many images).
- ``bare_decode_s``: the model alone decoding the rollout's tokens: ``T - 1`` forwards of one token for the
  ``B x G`` rows on HF's ``StaticCache``, with the rollout's weights (LoRA merged as the rollout merges it),
  no sampling, no stopping logic; ``rollout_over_bare_decode`` is ``rollout_s`` over it (the prefill and the
  vision encoder are in ``rollout_s`` only).
- ``bare_forward_backward_s``: one forward and backward of the policy over the scored tokens of the last
  rollout (the module's own scoring function, its micro-batches and prompt sharing, ``sum()`` as the loss):
  the floor of the loss part; ``scoring_s`` is ``step_s - rollout_s``, everything after the rollout.
- ``peak_rss_mb``: highest resident memory of the process (model loading included);
  ``train_peak_rss_mb``: highest during the timed steps; ``rss_after_import_mb``: the interpreter, torch
  and transformers alone. ``peak_gpu_mb`` on CUDA.

The GRPO variants are arguments here as in ``GRPOModule`` / ``LossConfig`` (``--loss-type``,
``--importance-sampling-level``, ``--top-entropy-quantile``, ``--epsilon-high``, ``--dynamic-sampling``,
``--max-resample-batches``). ``--flat-share S`` scores with a rigged reward instead of the DIP-R1 suite: the
groups of the first ``round(S x B)`` prompts of every batch all score alike (zero std), the others spread, so
dynamic sampling has groups to drop; ``rollouts_per_step`` counts the batches rolled out in a step (1 + the
extra draws). The quickstart's settings, dynamic sampling off and on:

    python bench/grpo_step.py --model data/tiny-qwen3_vl-seeing --prompts 2 --group 8 --max-new-tokens 256 \
        --micro-batch-size 16 --lr 1e-4 --flat-share 0.5 [--dynamic-sampling]

``--shape qwen2_5_vl_3b`` writes (or reuses, at ``--model``) a randomly initialised checkpoint of that
architecture: for GPU runs, ``--device cuda --dtype bfloat16 --quantization 4bit``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import _common

from dip_r1.config import LossConfig, SamplingConfig

START_RSS = _common.rss_mb()


class Probe:
    """Counts images through the vision encoder by the module's phase (a forward hook) and the batches rolled
    out, and reads each step's rollout time and tokens from what the module keeps (``step_timings``,
    ``last_rollout``)."""

    def __init__(self, module) -> None:
        self.module = module
        self.images = {"rollout": 0, "scoring": 0}
        self.forwards = self.rollouts = 0
        visual = next(m for n, m in module.policy.named_modules() if n.rsplit(".", 1)[-1] == "visual")
        visual.register_forward_hook(self._count, with_kwargs=True)
        roll_out = module._roll_out

        def counted(batch):
            self.rollouts += 1
            return roll_out(batch)

        module._roll_out = counted

    def _count(self, module, args, kwargs, output) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.images["rollout" if self.module.phase == "rollout" else "scoring"] += len(grid)
        self.forwards += 1

    @property
    def last(self):
        """The last step's Rollout."""
        record = self.module.last_rollout
        return record.rollout if record is not None else None

    def take(self) -> dict:
        """This step's counts (since the last call) and times."""
        rollout = self.last
        out = {
            **self.images,
            "forwards": self.forwards,
            "rollouts": self.rollouts,
            "rollout_s": self.module.step_timings.get("rollout_s", 0.0),
            "crops": int(rollout.crops_per_completion.sum()) if rollout is not None else 0,
            "tokens": int(rollout.mask.sum()) if rollout is not None else 0,
        }
        self.images, self.forwards, self.rollouts = {"rollout": 0, "scoring": 0}, 0, 0
        return out


def flat_share_suite(share: float, prompts: int):
    """A ``RewardSuite`` of one rigged reward (see ``--flat-share``)."""
    import torch

    from dip_r1.rewards import GroupReward, RewardSuite

    flat = round(share * prompts)

    class Rigged(GroupReward):
        def score(self, completions, targets, group_size):
            return torch.tensor(
                [0.5 if b < flat else j / group_size for b in range(len(targets)) for j in range(group_size)]
            )

    return RewardSuite({"rigged": Rigged()})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (with --shape: where to write or reuse the random one)")
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (B)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per completion (T)")
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--fixed-length", action="store_true", help="every completion exactly T tokens")
    p.add_argument("--quantization", choices=["4bit", "8bit"], help="QLoRA base weights")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank; 0: full fine-tuning")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--beta", type=float, default=0.0, help="KL weight; 0: no reference pass")
    p.add_argument(
        "--loss-type", default="grpo", help="LossConfig.loss_type (grpo, bnpo, dr_grpo, dapo, cispo)"
    )
    p.add_argument("--importance-sampling-level", default="token", help="token, or sequence (GSPO)")
    p.add_argument("--top-entropy-quantile", type=float, default=1.0, help="loss on this top share of tokens")
    p.add_argument("--epsilon-high", type=float, default=0.2, help="upper clip (CISPO: the weight's bound)")
    p.add_argument("--dynamic-sampling", action="store_true", help="drop flat groups, draw more prompts")
    p.add_argument("--max-resample-batches", type=int, default=3, help="most extra batches per step")
    p.add_argument(
        "--flat-share", type=float, help="rigged reward: this share of each batch's groups score alike"
    )
    p.add_argument("--image-size", type=int, default=448, help="side of the square synthetic images")
    p.add_argument("--look-mode", choices=["text", "zoom"], default="text", help="SamplingConfig.look_mode")
    p.add_argument(
        "--crowd",
        nargs=2,
        type=int,
        metavar=("W", "H"),
        help="prompts from the synthetic crowd generator at W x H (the quickstart's data; needed to zoom), "
        "with the tiny bases' system prompt; else plain square images",
    )
    p.add_argument("--max-pixels", type=int, help="--crowd: the prompt builder's pixel budget")
    p.add_argument("--train-vision", action="store_true", help="the vision tower trains (the quickstart's)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="completions per scoring forward")
    p.add_argument(
        "--no-share-prompt-prefix",
        action="store_true",
        help="score every completion with its own prompt forward (GRPOModule share_prompt_prefix=False)",
    )
    p.add_argument("--short-prompt", action="store_true", help="no system prompt, the short user prompt")
    p.add_argument(
        "--no-merge-lora", action="store_true", help="rollouts on unmerged LoRA (rollout_merge_lora)"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decoding forwards (rollout_compile)"
    )
    p.add_argument("--no-bounds", action="store_true", help="skip bare_decode_s and bare_forward_backward_s")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument(
        "--release-load-memory",
        action="store_true",
        help="after loading, copy weights out of the checkpoint's memory map and trim the heap (_common)",
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", help="weights and compute dtype (bfloat16 on GPUs)")
    p.add_argument("--shape", choices=sorted(_common.SHAPES), help="random-init model of a real architecture")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.model is None and args.shape is None:
        p.error("give --model DIR or --shape NAME")
    if args.quantization and not args.lora_r:
        p.error("--quantization trains through adapters: give --lora-r too")
    if args.look_mode == "zoom" and not args.crowd:
        p.error("--look-mode zoom needs source images with people: give --crowd W H")
    return args


def build_module(args):
    import torch

    from dip_r1.models import LoraSpec, PolicySpec
    from dip_r1.module import GRPOModule

    path = str(_common.build_shape(args.shape, args.model, args.dtype)) if args.shape else args.model
    lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout) if args.lora_r else None
    policy = PolicySpec(
        path,
        quantization=args.quantization,
        lora=lora,
        dtype=args.dtype,
        gradient_checkpointing=args.gradient_checkpointing,
        freeze_vision=not args.train_vision,
    )
    return GRPOModule(
        policy,
        group_size=args.group,
        sampling=SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens if args.fixed_length else 0,
            look_mode=args.look_mode,
        ),
        loss=LossConfig(
            beta=args.beta,
            epsilon_high=args.epsilon_high,
            loss_type=args.loss_type,
            importance_sampling_level=args.importance_sampling_level,
            top_entropy_quantile=args.top_entropy_quantile,
        ),
        rewards=flat_share_suite(args.flat_share, args.prompts) if args.flat_share is not None else None,
        dynamic_sampling=args.dynamic_sampling,
        max_resample_batches=args.max_resample_batches,
        micro_batch_size=args.micro_batch_size,
        share_prompt_prefix=not args.no_share_prompt_prefix,
        rollout_merge_lora=not args.no_merge_lora,
        rollout_compile=args.compile,
        optimizer=lambda params: torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0),
    )


def run(args) -> dict:
    import lightning as L

    L.seed_everything(args.seed, verbose=False)
    return _run(args)


def _run(args) -> dict:
    import lightning as L
    import torch

    module = build_module(args)
    module.configure_model()
    if args.release_load_memory:
        _common.release_load_memory(module.policy)
    loaded_rss = _common.rss_mb()
    probe = Probe(module)
    size = args.image_size
    if args.crowd:
        batch = _common.crowd_batch(module, args.prompts, *args.crowd, args.max_pixels, seed=args.seed)
    else:
        empty = {"boxes": torch.zeros(0, 4), "ignore": torch.zeros(0, 4), "image_size": (size, size)}
        batch = {
            "inputs": _common.prompt_inputs(module.processor, args.prompts, size, args.short_prompt),
            "targets": [empty] * args.prompts,
        }
    steps: list[dict] = []
    peaks: list[float] = []  # before the timed steps (model loading, warm-up)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if len(steps) == args.warmup:
                peaks.append(_common.peak_rss_mb())
                _common.reset_peak_rss()  # after warm-up: steady-state training memory
            probe.take()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            steps.append({"step_s": time.perf_counter() - self.start, **probe.take()})

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield batch

    trainer = L.Trainer(
        max_steps=args.warmup + args.steps,
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        logger=False,
        callbacks=[Timer()],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    timed = steps[args.warmup :]
    med = {k: statistics.median(s[k] for s in timed) for k in timed[0]}
    bound = {} if args.no_bounds else bounds(module, batch["inputs"], probe.last, args)
    if bound:
        bound["rollout_over_bare_decode"] = round(med["rollout_s"] / bound["bare_decode_s"], 3)
        bound["scoring_s"] = round(med["step_s"] - med["rollout_s"], 4)
    return {
        "step_s": round(med["step_s"], 4),
        "tokens_per_s": round(med["tokens"] / med["step_s"], 2),
        "peak_rss_mb": round(max(*peaks, _common.peak_rss_mb()), 1),
        "vision_calls_per_step": med["rollout"] + med["scoring"],
        "vision_calls_rollout_per_step": med["rollout"],
        "vision_calls_scoring_per_step": med["scoring"],
        "vision_forward_calls_per_step": med["forwards"],
        "rollouts_per_step": med["rollouts"],
        "rollout_s": round(med["rollout_s"], 4),
        "rollout_tokens_per_s": round(med["tokens"] / med["rollout_s"], 2),
        **bound,
        "tokens_per_step": med["tokens"],
        "crops_per_step": med["crops"],
        "train_peak_rss_mb": round(_common.peak_rss_mb(), 1),
        "rss_after_import_mb": round(START_RSS, 1),
        "rss_after_load_mb": round(loaded_rss, 1),
        **(
            {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
            if args.device == "cuda"
            else {}
        ),
        "step_s_all": [round(s["step_s"], 4) for s in timed],
        "weights_mb": round(_weights_mb(module.policy), 1),
        "parameters": sum(p.numel() for p in module.policy.parameters()),
        "trainable_parameters": sum(p.numel() for p in module.policy.parameters() if p.requires_grad),
        "config": {k: v for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }


def bounds(module, inputs, rollout, args) -> dict:
    """``bare_decode_s`` and ``bare_forward_backward_s``, medians of ``--steps`` repeats (see the module doc)."""
    import contextlib

    import torch
    from transformers.cache_utils import StaticCache

    from dip_r1.decoding import merged_lora
    from dip_r1.scoring import completion_logprobs, micro_batches, prompt_positions, select_prompts

    model, hp = module.policy, module.hparams
    n, t = len(rollout.prompt_index), args.max_new_tokens
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows = select_prompts(inputs, rollout.prompt_index)  # [N, P]: each prompt G times (untimed prefill)
    p = rows["input_ids"].shape[1]
    positions = prompt_positions(model, rows)  # [3, N, P] or None
    extra = {"position_ids": positions} if positions is not None else {}
    mask = rows["attention_mask"].new_ones(n, p + t)  # [N, P + T]: a static cache attends all its positions
    mask[:, :p] = rows["attention_mask"]
    start = positions[:, :, -1:] + 1 if positions is not None else mask[:, :p].sum(1, keepdim=True)
    steps = start + torch.arange(t, device=start.device)  # [3, N, T] or [N, T]
    decode, score = [], []
    for _ in range(args.steps):
        model.eval()
        merge = merged_lora(model, n * t) if hp.rollout_merge_lora else contextlib.nullcontext()
        with torch.no_grad(), merge:
            cache = StaticCache(config=model.config, max_cache_len=p + t)
            out = model(**rows, **extra, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)  # [N, 1]: the same token every step, no sampling
            sync()
            begin = time.perf_counter()
            for i in range(t - 1):
                model(
                    input_ids=token,
                    attention_mask=mask,
                    position_ids=steps[..., i : i + 1],
                    past_key_values=cache,
                )
            sync()
            decode.append(time.perf_counter() - begin)
            del cache, out
        model.train()
        begin = time.perf_counter()
        for mb in micro_batches(n, hp.micro_batch_size):
            completion_logprobs(
                model,
                inputs,
                rollout.prompt_index[mb],
                rollout.completion_ids[mb],
                rollout.mask[mb],
                temperature=module.sampling.temperature,
                image_features=rollout.image_features,
                share_prefix=hp.share_prompt_prefix,
            ).sum().backward()
        sync()
        score.append(time.perf_counter() - begin)
        model.zero_grad(set_to_none=True)
    return {
        "bare_decode_s": round(statistics.median(decode), 4),
        "bare_forward_backward_s": round(statistics.median(score), 4),
    }


def _weights_mb(model) -> float:
    """Bytes of the model's parameters and buffers (each storage once), MiB: 4-bit weights count packed."""
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()
    }
    return sum(storages.values()) / 2**20


def main(argv=None) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (counted in rss_after_import_mb below)
    import transformers  # noqa: F401

    global START_RSS
    START_RSS = _common.rss_mb()
    _common.flush_denormals()
    print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
    main()
