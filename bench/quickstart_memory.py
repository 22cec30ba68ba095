"""Resident memory of the process over a long quickstart run; prints one JSON line.

    python bench/quickstart_memory.py --steps 400

Runs ``dip-r1 fit --config recipes/quickstart.yaml --trainer.max_steps STEPS`` in this process, in a scratch
folder (``--workdir``: the synthetic set, the warm-started tiny policy, logs and checkpoints go there), with a
callback that reads the RSS after every training step. Keys: ``rss_mb_quarters`` (mean RSS of each quarter of
the steps), ``growth_q2_to_q4`` (last quarter over the second, minus 1: the target is at most 0.03),
``rss_mb_first`` / ``rss_mb_last`` / ``rss_mb_max``, ``step_s_median``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import _common
import lightning as L

ROOT = Path(__file__).resolve().parent.parent


class RSSProbe(L.Callback):
    """RSS (MiB) and seconds of every training step, kept on the class (the CLI builds the instance)."""

    rss: list[float] = []
    seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RSSProbe.seconds.append(time.perf_counter() - self.start)
        RSSProbe.rss.append(_common.rss_mb())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="GRPO steps (--trainer.max_steps)")
    p.add_argument("--workdir", default="runs/quickstart-memory", help="scratch folder the run writes to")
    p.add_argument("--config", default=str(ROOT / "recipes/quickstart.yaml"))
    args, extra = p.parse_known_args(argv)  # the rest goes to the CLI (e.g. --model.init_args.X=Y)
    config = str(Path(args.config).resolve())
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    from dip_r1 import cli

    # this script runs as __main__: the CLI imports it again by name, so the probe's lists live on that module
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    cli.main(
        [
            "fit",
            "--config",
            config,
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.enable_progress_bar=false",
        ]
        + ["--trainer.callbacks+=quickstart_memory.RSSProbe", *extra]
    )
    probe = sys.modules["quickstart_memory"].RSSProbe
    rss, q = probe.rss, len(probe.rss) // 4
    quarters = [statistics.mean(rss[i * q : (i + 1) * q]) for i in range(4)]
    print(
        json.dumps(
            {
                "steps": len(rss),
                "rss_mb_quarters": [round(x, 1) for x in quarters],
                "growth_q2_to_q4": round(quarters[3] / quarters[1] - 1, 4),
                "rss_mb_first": round(rss[0], 1),
                "rss_mb_last": round(rss[-1], 1),
                "rss_mb_max": round(max(rss), 1),
                "step_s_median": round(statistics.median(probe.seconds), 4),
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            }
        )
    )


if __name__ == "__main__":
    main()
