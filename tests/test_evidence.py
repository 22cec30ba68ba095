"""bench/evidence.py --quick writes every output, well-formed (the figures themselves are not judged here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"
ARMS = ["base", "sft", "dip_r1", "no_look", "accuracy_only"]
SETS = ["in_domain", "out_of_domain"]
METRICS = ["precision", "recall", "f1", "ap50", "ap", "mr2", "format_valid"]


def _load_bench():
    sys.path.insert(0, str(BENCH))  # the script imports its helper modules by bare name, as when run directly
    try:
        spec = importlib.util.spec_from_file_location("evidence_bench", BENCH / "evidence.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_quick_run_writes_every_output(tmp_path, capsys, monkeypatch):
    import torch

    threads = torch.get_num_threads()
    out = tmp_path / "evidence"
    # No checkpoint at --base: --quick builds a random tiny one under --out (never at --base).
    _load_bench().main(["--quick", "--seeds", "2", "--out", str(out), "--base", str(tmp_path / "none")])
    assert torch.get_num_threads() == threads  # process-wide settings are handed back
    assert not (tmp_path / "none").exists()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out)

    results = json.loads((out / "results.json").read_text())
    assert list(results) == ARMS
    for arm in ARMS:
        assert list(results[arm]) == SETS
        for s in SETS:
            assert list(results[arm][s]) == METRICS
            for row in results[arm][s].values():
                assert set(row) == {"mean", "std", "seeds"} and len(row["seeds"]) == 2
                assert all(
                    v is None or isinstance(v, float) for v in [row["mean"], row["std"], *row["seeds"]]
                )

    diagnostics = json.loads((out / "diagnostics.json").read_text())
    for arm in ("dip_r1", "no_look", "accuracy_only"):
        training = diagnostics["arms"][arm]["training"]
        for reward in ("format", "look", "accuracy"):  # weight-0 rewards are logged too
            assert 0.0 <= training[f"reward_{reward}"]["zero_std_ratio"] <= 1.0
        for key in ("completion_length", "truncated_ratio", "kl"):
            assert training[key] is not None
    assert diagnostics["reward_weights"]["accuracy_only"] == {"format": 0.0, "look": 0.0, "accuracy": 1.0}
    for arm in ARMS:  # what the answers look like, beside the F1
        for s in SETS:
            assert set(diagnostics["answers"][arm][s]) == {"duplicate_ratio", "look_boxes"}
            assert 0.0 <= diagnostics["answers"][arm][s]["duplicate_ratio"]["mean"] <= 1.0

    table = (out / "results.md").read_text()
    assert all(f"| {arm} |" in table for arm in ARMS) and "### out_of_domain" in table
    assert "look boxes" in table
    with Image.open(out / "evidence.png") as image:
        assert image.width >= 1000 and image.height >= 600

    from dip_r1.models import PolicySpec

    for arm in ARMS:
        for seed in (0, 1):
            assert (out / arm / f"seed{seed}" / "config.json").is_file()
            assert (out / arm / f"seed{seed}" / "tokenizer.json").is_file()
    model, processor = PolicySpec(str(out / "dip_r1" / "seed0")).load()  # what policy.path points at
    assert processor.tokenizer is not None and sum(p.numel() for p in model.parameters()) > 0

    # The command the docstring gives, on the quickstart's sets (shrunk): the folder is a policy the CLI runs.
    from dip_r1.cli import main

    monkeypatch.chdir(tmp_path)
    crowd = "{class_path: dip_r1.quickstart.SyntheticCrowd, init_args: {root: data/%s, n: 2, width: 160, height: 120, min_people: 1, max_people: 3}}"
    cli = main(
        [
            "validate",
            "--config",
            str(BENCH.parent / "recipes/quickstart.yaml"),
            f"--model.init_args.policy.path={out / 'dip_r1' / 'seed0'}",
            "--model.init_args.sampling.max_new_tokens=8",
            "--trainer.enable_progress_bar=false",
            f"--data.train=[{crowd % 'train'}]",
            f"--data.val=[{crowd % 'val'}]",
        ]
    )
    images = {k: float(v) for k, v in cli.trainer.logged_metrics.items() if k.endswith("/images")}
    assert list(images.values()) == [2.0], images


def test_summary_over_seeds():
    sys.path.insert(0, str(BENCH))
    try:
        import _evidence_report as report
    finally:
        sys.path.remove(str(BENCH))
    assert report.summary([0.5, 0.7]) == {"mean": 0.6, "std": 0.14142, "seeds": [0.5, 0.7]}  # sample std
    assert report.summary([0.25]) == {"mean": 0.25, "std": 0.0, "seeds": [0.25]}
    # an undefined metric (AP without ground truth) is null, and left out of the mean
    assert report.summary([float("nan"), 1.0]) == {"mean": 1.0, "std": 0.0, "seeds": [None, 1.0]}
