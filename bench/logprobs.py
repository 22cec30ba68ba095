"""Cost of the token entropies that ``train/entropy`` and ``top_entropy_quantile`` need: ``token_logprobs`` forward
and backward on random logits with and without ``with_entropy``, interleaved; print one JSON line.

    python bench/logprobs.py --rows 16 --length 256 --vocab 567      # the quickstart's micro-batch (tiny vocab)
    python bench/logprobs.py --rows 2 --length 256 --vocab 151936    # a Qwen-VL vocabulary

Keys: ``plain_s`` and ``entropy_s``, the fastest of ``--repeats`` forward + backward passes each (the fastest,
not the median, because a loaded machine only ever adds time); ``extra_s`` their difference, the entropy's
cost per micro-batch of that shape; ``extra_share``, ``extra_s / plain_s``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from dip_r1.grpo import token_logprobs


def run(rows: int, length: int, vocab: int, repeats: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, length, vocab, generator=g).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    times = {False: [], True: []}
    for _ in range(repeats):
        for with_entropy in (False, True):
            begin = time.perf_counter()
            out = token_logprobs(logits, labels, with_entropy=with_entropy)
            logp = out[0] if with_entropy else out
            logp.sum().backward()
            times[with_entropy].append(time.perf_counter() - begin)
            logits.grad = None
    plain, entropy = min(times[False]), min(times[True])
    return {
        "plain_s": round(plain, 5),
        "entropy_s": round(entropy, 5),
        "extra_s": round(entropy - plain, 5),
        "extra_share": round((entropy - plain) / plain, 3),
        "shape": [rows, length, vocab],
        "repeats": repeats,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16, help="completions in the micro-batch")
    p.add_argument("--length", type=int, default=256, help="completion positions T")
    p.add_argument("--vocab", type=int, default=567, help="vocabulary size V")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    print(json.dumps(run(args.rows, args.length, args.vocab, args.repeats)))


if __name__ == "__main__":
    main()
