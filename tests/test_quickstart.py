"""The quickstart, shortened: `dip-r1 fit --config recipes/quickstart.yaml` builds everything it needs,
trains, logs the documented metrics and saves a checkpoint. And the README's commands are CI's."""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_from_nothing(tmp_path, monkeypatch):
    from dip_r1.cli import main

    monkeypatch.chdir(tmp_path)  # relative paths of the recipe (data/, runs/) land here
    main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes/quickstart.yaml"),
            "--trainer.max_steps=3",
            "--trainer.enable_progress_bar=false",
            # the committed base is not in tmp_path: the warm start builds a small one, as on a clone without it
            "--model.init_args.warm_start.init_args.size=xs",
            "--model.init_args.warm_start.init_args.stages=[{steps: 2, min_people: 1, max_people: 1, n: 8, width: 64, height: 64}]",
            "--model.init_args.warm_start.init_args.vision_warmup=1",
            "--model.init_args.warm_start.init_args.batch_size=2",
            "--model.init_args.warm_start.init_args.eval_images=2",
            "--data.train=[{class_path: dip_r1.quickstart.SyntheticCrowd, init_args: {root: data/quickstart-crowd, n: 16, width: 160, height: 120, min_people: 1, max_people: 3}}]",
            "--model.init_args.sampling.max_new_tokens=16",
        ]
    )
    assert (tmp_path / "data/tiny-qwen3_vl-seeing/config.json").is_file()
    assert (tmp_path / "data/tiny-qwen3_vl-seeing/scores.json").is_file()
    assert (tmp_path / "data/quickstart-crowd/annotation.odgt").is_file()
    assert list((tmp_path / "runs/quickstart/checkpoints").glob("*.ckpt"))
    (metrics,) = (tmp_path / "runs/quickstart").rglob("metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    for key in ("train/reward", "train/reward_format", "train/reward_look", "train/reward_accuracy"):
        values = [float(r[key]) for r in rows if r.get(key)]
        assert len(values) == 3 and all(0.0 <= v <= 3.0 for v in values), key


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    block = re.search(r"## Set up\n\n```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    install, test = block
    for command in install.split(" && "):
        assert f"\n{command}\n" in ci, command
    assert f"\n{test}\n" in ci
    assert "dip-r1 fit --config recipes/quickstart.yaml\n" in readme
