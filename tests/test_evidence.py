"""bench/evidence.py --quick writes every output, well formed (the figures themselves are not judged here), on
synthetic crowds and on the real-data recipe over the readers' fixture files; its statistics by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import load_bench
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SETS = ["in_domain", "ood_dense", "ood_scene"]
METRICS = ["precision", "recall", "f1", "ap50", "ap", "mr2", "format_valid", "look_boxes", "crops"]
COMPARISONS = ["dip_r1_zoom - sft", "dip_r1_zoom - dip_r1", "dip_r1_zoom - no_look_zoom"]


def _summary_rows(results: dict, arms: list[str], sets: list[str], seeds: int) -> None:
    for arm in arms:
        assert list(results[arm]) == sets
        for s in sets:
            assert list(results[arm][s]) == METRICS
            for row in results[arm][s].values():
                assert set(row) == {"mean", "std", "seeds"} and len(row["seeds"]) == seeds
                assert all(
                    v is None or isinstance(v, float) for v in [row["mean"], row["std"], *row["seeds"]]
                )


def _validate(config: Path, sources: list[dict]) -> dict:
    """What ``dip-r1 validate --config CONFIG --data.val '[...]'`` logs."""
    from dip_r1.cli import main

    cli = main(["validate", "--config", str(config), "--data.val", json.dumps(sources)])
    return {k: float(v) for k, v in cli.trainer.logged_metrics.items()}


def test_quick_run_writes_every_output(tmp_path, capsys):
    import torch

    from dip_r1.models import PolicySpec

    arms = load_bench("_evidence_arms")
    threads = torch.get_num_threads()
    out = tmp_path / "evidence"
    every = [a for a in arms.DEFAULT_ARMS if a != "base_zoom"]  # the default arms but one more untrained one
    # No checkpoint at --base: --quick builds a random tiny one under --out (never at --base).
    argv = [
        "--quick",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--base",
        str(tmp_path / "none"),
        "--arms",
        ",".join(every),
        "--jobs",
        "2",  # arms side by side in two spawned processes (the real-data test below runs them in this one)
    ]
    load_bench("evidence").main(argv)
    assert torch.get_num_threads() == threads  # process-wide settings are handed back
    assert not (tmp_path / "none").exists()
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out)
    skipped = summary["skipped_arms"]
    ran = [a for a in every if a not in skipped]
    assert skipped == {}  # every arm runs, the zoom ones (sft_zoom on the zoom teacher targets) included

    results = json.loads((out / "results.json").read_text())
    assert list(results) == [*ran, "comparisons", "splits"]
    _summary_rows(results, ran, SETS, seeds=2)
    assert list(results["comparisons"]) == COMPARISONS
    for key, per_set in results["comparisons"].items():
        if "skipped" in per_set:  # an arm of it not run: said so
            assert any(a in per_set["skipped"] for a in key.split(" - "))
            continue
        assert list(per_set) == SETS
        for c in per_set.values():
            assert c["low"] <= c["difference"] <= c["high"] and c["pairs"] == 2 * 2  # 2 images x 2 seeds
    splits = results["splits"]
    assert list(splits) == ["train", "validation", "test", "controls", "chosen_on"]
    seeds = [splits["train"][0]["init_args"]["seed"], splits["validation"][0]["init_args"]["seed"]]
    seeds += [sources[0]["init_args"]["seed"] for sources in splits["test"].values()]
    assert len(set(seeds)) == len(seeds) == 5  # every set from its own seed: nothing chosen on a test set
    assert splits["validation"][0]["init_args"]["name"] == "validation"
    assert list(splits["controls"]) == ["control_in_domain_480x360"]

    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["jobs"] == 2
    for arm in (a for a in ran if arms.ARMS[a].trains == "grpo"):
        training = diagnostics["arms"][arm]["training"]
        for reward in ("format", "look", "accuracy"):  # weight-0 rewards are logged too
            assert 0.0 <= training[f"reward_{reward}"]["zero_std_ratio"] <= 1.0
        for key in ("completion_length", "truncated_ratio", "kl"):
            assert training[key] is not None
    assert diagnostics["reward_weights"]["dip_r1"] == {"format": 1.0, "look": 1.0, "accuracy": 1.0}
    grpo_seconds = diagnostics["arms"]["dip_r1"]["train_seconds"]["seeds"]
    for stop, least in zip(diagnostics["arms"]["sft"]["early_stopping"], grpo_seconds):
        # SFT chose its checkpoint on validation, and was to train at least as long as its seed's GRPO arm
        assert stop["monitor"] == "val/validation/f1" and stop["history"] and stop["best_step"] >= 1
        assert stop["min_seconds"] >= least - 0.1
    assert set(diagnostics["controls"]["base"]) == {"control_in_domain_480x360"}
    sizes = {s: diagnostics["sets"][s]["model_size"] for s in [*SETS, "control_in_domain_480x360"]}
    assert len({tuple(v) for v in sizes.values()}) == 1  # one pixel budget: every set seen at one size
    assert diagnostics["sets"]["ood_dense"]["source_size"] == [480, 360]

    table = (out / "results.md").read_text()
    assert all(f"| {arm} |" in table for arm in ran) and "### ood_dense" in table and "bootstrap" in table
    with Image.open(out / "evidence.png") as image:
        assert image.width >= 1000 and image.height >= 600

    for arm in ran:
        for seed in (0, 1):
            folder = out / arm / f"seed{seed}"
            assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
            assert (folder / "validate.yaml").is_file()
            assert (folder / "fit.yaml").is_file() == (arm not in ("base", "base_zoom"))
    model, processor = PolicySpec(str(out / "dip_r1" / "seed0")).load()  # what policy.path points at
    assert processor.tokenizer is not None and sum(p.numel() for p in model.parameters()) > 0

    # The arm's validate.yaml evaluates it as the experiment did: the same F1 on the same set.
    in_domain = splits["test"]["in_domain"]
    for arm in (a for a in ("dip_r1", "sft", "dip_r1_zoom") if a in ran):  # the zoom's look mode included
        logged = _validate(out / arm / "seed1" / "validate.yaml", in_domain)
        assert logged["val/in_domain/images"] == 2.0
        assert logged["val/in_domain/f1"] == pytest.approx(
            results[arm]["in_domain"]["f1"]["seeds"][1], abs=1e-5
        )


def _fixture_images(recipe: dict) -> None:
    """Write an image wherever the recipe's readers expect one, large enough for its boxes (the fixtures hold
    annotations only)."""
    from jsonargparse import ArgumentParser

    from dip_r1.data import DetectionSource

    parser = ArgumentParser()
    parser.add_argument("--sources", type=list[DetectionSource])
    data = recipe["data"]
    config = parser.parse_object({"sources": data["train"] + data["val"] + data["test"]})
    rng = np.random.default_rng(0)
    for source in parser.instantiate_classes(config).sources:
        for sample in source:
            extent = sample.boxes.amax(0)[2:].tolist() if len(sample.boxes) else [0, 0]
            size = (max(96, int(extent[0]) + 8), max(64, int(extent[1]) + 8))
            sample.image_path.parent.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(sample.image_path)


def test_crowdhuman_recipe_runs_end_to_end_on_the_fixtures(tmp_path, capsys):
    """The real-data recipe's structure, readers and LoRA path, on the fixture files and a tiny checkpoint."""
    from dip_r1.tiny import save_tiny

    fixtures = tmp_path / "fixtures"
    shutil.copytree(ROOT / "tests" / "fixtures", fixtures)
    text = (ROOT / "recipes" / "evidence_crowdhuman.yaml").read_text()
    text = text.replace(
        "/path/to/CrowdHuman/annotation_train.odgt", str(fixtures / "crowdhuman/annotation.odgt")
    )
    text = text.replace(
        "/path/to/CrowdHuman/annotation_val.odgt", str(fixtures / "crowdhuman/annotation.odgt")
    )
    text = text.replace("/path/to/CrowdHuman/Images", str(fixtures / "crowdhuman/Images"))
    text = text.replace("/path/to/cityscapes", str(fixtures / "citypersons"))
    text = text.replace(
        "/path/to/WiderPedestrian/val_annotations.txt",
        str(fixtures / "wider_pedestrian/train_annotations.txt"),
    )
    text = text.replace(
        "/path/to/WiderPedestrian/val_ignore.txt", str(fixtures / "wider_pedestrian/train_ignore.txt")
    )
    text = text.replace("/path/to/WiderPedestrian/val_data", str(fixtures / "wider_pedestrian/images"))
    text = text.replace("/path/to/UAVDT", str(fixtures / "uavdt"))
    assert "/path/to" not in text
    recipe_path = tmp_path / "evidence_crowdhuman.yaml"
    recipe_path.write_text(text)
    recipe = yaml.safe_load(text)
    _fixture_images(recipe)
    base = save_tiny(tmp_path / "tiny", "qwen2_5_vl", "xs")
    out = tmp_path / "out"
    argv = [
        *(
            "--config",
            str(recipe_path),
            "--quick",
            "--seeds",
            "1",
            "--out",
            str(out),
            "--arms",
            "base,sft,dip_r1",
            "--jobs",
            "1",
        ),
        *("--model.init_args.policy.path", str(base), "--model.init_args.policy.dtype", "float32"),
        *("--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.num_workers", "0"),
        # three CrowdHuman images: at 0.5 each part holds some (the history asserted below needs a validation)
        *("--data.train.0.init_args.fraction", "0.5", "--data.val.0.init_args.fraction", "0.5"),
    ]
    load_bench("evidence").main(argv)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sets = ["in_domain", "ood_citypersons", "ood_widerpedestrian", "ood_uavdt"]
    assert list(summary["f1"]["dip_r1"]) == sets
    results = json.loads((out / "results.json").read_text())
    _summary_rows(results, ["base", "sft", "dip_r1"], sets, seeds=1)
    validation = results["splits"]["validation"][0]["init_args"]
    assert (
        validation["part"] == "held_out"
        and validation["source"]["class_path"] == "dip_r1.data.sources.CrowdHuman"
    )
    diagnostics = json.loads((out / "diagnostics.json").read_text())
    assert diagnostics["sets"]["ood_uavdt"]["images"] >= 1 and diagnostics["jobs"] == 1
    assert diagnostics["arms"]["sft"]["early_stopping"][0]["history"]  # chosen on the held-out part
    fit = yaml.safe_load((out / "dip_r1" / "seed0" / "fit.yaml").read_text())
    assert fit["model"]["init_args"]["policy"]["lora"]["r"] == 16  # trained through adapters ...
    validate = yaml.safe_load((out / "dip_r1" / "seed0" / "validate.yaml").read_text())
    assert "lora" not in validate["model"]["init_args"]["policy"]  # ... saved merged
    assert (out / "results.md").is_file() and (out / "evidence.png").is_file()


def test_summary_over_seeds():
    stats = load_bench("_evidence_stats")
    assert stats.summary([0.5, 0.7]) == {"mean": 0.6, "std": 0.14142, "seeds": [0.5, 0.7]}  # sample std
    assert stats.summary([0.25]) == {"mean": 0.25, "std": 0.0, "seeds": [0.25]}
    # an undefined metric (AP without ground truth) is null, and left out of the mean
    assert stats.summary([float("nan"), 1.0]) == {"mean": 1.0, "std": 0.0, "seeds": [None, 1.0]}


def test_paired_bootstrap_by_hand():
    stats = load_bench("_evidence_stats")
    # per image [tp, predictions, ground truth]; F1 = 2 tp / (predictions + ground truth) over the summed images
    a = np.array([[2, 2, 2], [1, 1, 2], [0, 0, 1], [3, 4, 3]], float)  # 12 / 15 = 0.8 ... 2*6 / (7 + 8)
    b = np.array([[1, 2, 2], [1, 3, 2], [0, 1, 1], [2, 2, 3]], float)  # 2*4 / (8 + 8) = 0.5
    assert stats.f1(a.sum(0)) == pytest.approx(0.8) and stats.f1(b.sum(0)) == pytest.approx(0.5)
    result = stats.paired_bootstrap(a, b, resamples=4000)
    assert result["difference"] == pytest.approx(0.3) and result["pairs"] == 4
    # every image is at least as good under a: no resample can make a worse than b
    assert 0.0 <= result["low"] < 0.3 < result["high"] <= 1.0
    # an arm against itself: exactly 0, an interval of width 0
    same = stats.paired_bootstrap(a, a)
    assert same["difference"] == same["low"] == same["high"] == 0.0
    counts = {
        "x": {0: {"s": {"i1": [1, 1, 1], "i2": [0, 1, 1]}}, 1: {"s": {"i1": [1, 1, 1], "i2": [1, 1, 1]}}},
        "y": {0: {"s": {"i1": [0, 1, 1], "i2": [0, 1, 1]}}, 1: {"s": {"i1": [0, 1, 1], "i2": [1, 1, 1]}}},
    }
    out = stats.comparisons(counts, [("x", "y"), ("x", "z")], ["s"])
    assert out["x - y"]["s"]["pairs"] == 4  # two images in each of two seeds, pooled
    assert out["x - y"]["s"]["difference"] == pytest.approx(3 / 4 - 1 / 4)
    assert out["x - z"] == {"skipped": "not run: z"}
    with pytest.raises(ValueError):
        stats.paired_bootstrap(a, b[:2])


def test_arms_are_their_text_arm_plus_the_look_mode():
    arms = load_bench("_evidence_arms")
    for name, arm in arms.ARMS.items():
        if arm.look_mode == "zoom":
            text = arms.ARMS[name.removesuffix("_zoom")]
            assert (arm.trains, arm.weights) == (text.trains, text.weights)
    assert set(arms.DEFAULT_ARMS) == {
        "base",
        "sft",
        "dip_r1",
        "base_zoom",
        "sft_zoom",
        "dip_r1_zoom",
        "no_look_zoom",
    }
    assert arms.order(["sft", "base", "dip_r1", "sft_zoom", "no_look_zoom"]) == [
        "base",
        "dip_r1",
        "no_look_zoom",
        "sft",
        "sft_zoom",  # SFT last: it needs the GRPO arms' times
    ]
    model = {"class_path": "dip_r1.module.GRPOModule", "init_args": {"sampling": {"max_new_tokens": 8}}}
    levers = arms.Levers(look_credit=False, look_resolve=False)
    text = arms.grpo_model(model, arms.ARMS["dip_r1"], "/base", levers)
    zoom = arms.grpo_model(model, arms.ARMS["dip_r1_zoom"], "/base", levers)
    assert zoom["init_args"]["sampling"] == {**text["init_args"]["sampling"], "look_mode": "zoom"}
    zoom["init_args"]["sampling"].pop("look_mode")
    assert zoom == text  # nothing else differs
    suite = text["init_args"]["rewards"]["init_args"]
    assert suite["credit"] == {} and suite["rewards"]["look"]["init_args"] == {"resolve": False}
    assert "credit" not in arms.rewards_config(arms.ARMS["dip_r1"], arms.Levers())["init_args"]  # the default


def test_best_policy_stops_after_its_patience_once_the_time_is_spent_and_keeps_the_best():
    import torch

    run = load_bench("_evidence_run")

    class Trainer:  # what the callback reads of a Lightning Trainer
        sanity_checking, should_stop, global_step = False, False, 0
        callback_metrics: dict = {}

    class Module:
        policy = torch.nn.Linear(2, 1)

    trainer, module = Trainer(), Module()
    stopper = run.BestPolicy("val/validation/f1", patience=2, min_seconds=10.0)
    for step, f1, trained in ((1, 0.2, 3.0), (2, 0.5, 3.0), (3, 0.4, 3.0), (4, 0.3, 0.5), (5, 0.45, 3.0)):
        module.policy.weight.data.fill_(step)  # the weights of this step
        trainer.global_step, trainer.callback_metrics = step, {"val/validation/f1": torch.tensor(f1)}
        stopper.train_seconds += trained
        stopper.on_validation_end(trainer, module)
        # two validations without a new best after step 2, but only 9.5 s trained at step 4: not yet
        assert trainer.should_stop == (step == 5)
    stopper.restore(module.policy)
    assert module.policy.weight.data.tolist() == [[2.0, 2.0]]  # step 2's, the best
    record = stopper.record()
    assert (record["best"], record["best_step"], record["stopped_by"]) == (0.5, 2, "patience")
    assert [h["step"] for h in record["history"]] == [1, 2, 3, 4, 5]


def test_a_missing_base_is_built_by_the_recipes_warm_start(tmp_path):
    plan = load_bench("_evidence_plan")
    crowd = {
        "root": str(tmp_path / "crowd"),
        "n": 2,
        "width": 64,
        "height": 48,
        "min_people": 1,
        "max_people": 2,
    }
    warm = {
        "class_path": "dip_r1.quickstart.TinySFT",
        "init_args": {"steps": 1, "batch_size": 2, "data": crowd, "home": str(tmp_path / "base")},
    }
    source = [
        {"class_path": "dip_r1.data.sources.SyntheticCrowd", "init_args": {**crowd, "name": "in_domain"}}
    ]
    recipe = {
        "model": {
            "class_path": "dip_r1.module.GRPOModule",
            "init_args": {"policy": {"path": str(tmp_path / "base")}, "warm_start": warm},
        },
        "data": {"train": source, "val": source, "test": source},
    }
    path, origin = plan.ensure_base(recipe, quick=False, out=tmp_path / "out")
    assert (path, origin) == (str(tmp_path / "base"), "built by dip_r1.quickstart.TinySFT")
    assert (tmp_path / "base" / "config.json").is_file()
    assert plan.ensure_base(recipe, quick=False, out=tmp_path / "out") == (path, "given")
    del recipe["model"]["init_args"]["warm_start"]
    recipe["model"]["init_args"]["policy"]["path"] = str(tmp_path / "nothing")
    with pytest.raises(SystemExit, match="no checkpoint at"):
        plan.ensure_base(recipe, quick=False, out=tmp_path / "out")


def test_units_start_once_what_they_need_is_done_and_in_order_otherwise():
    from concurrent.futures import Future

    jobs = load_bench("_evidence_jobs")
    names = ["base", "dip_r1", "no_look_zoom", "sft"]
    started, finished = [], []

    def start(unit):
        started.append(unit)
        return None if unit.arm == "no_look_zoom" and unit.seed == 1 else (lambda u: u.arm.upper(), unit)

    def finish(unit, future: Future):
        finished.append((unit, future.result()))

    jobs.run_units(jobs.units(names, 2), names, start, finish, jobs=1, threads=1)
    order = [(u.seed, u.arm) for u in started]
    assert order == [
        (0, "base"),
        (0, "dip_r1"),
        (0, "no_look_zoom"),
        (0, "sft"),  # after its seed's GRPO arms
        (1, "base"),  # after seed 0's base: it reuses that evaluation
        (1, "dip_r1"),
        (1, "no_look_zoom"),  # skipped by start (None): counts as done, never finished
        (1, "sft"),
    ]
    assert [u.arm for u, _ in finished if u.seed == 1] == ["base", "dip_r1", "sft"]
    assert finished[0][1] == "BASE"


def test_a_failed_unit_reaches_finish_through_its_future():
    jobs = load_bench("_evidence_jobs")
    seen = {}

    def boom(unit):
        raise ValueError(f"no zoom for {unit.arm}")

    def finish(unit, future):
        seen[unit.arm] = type(future.exception()).__name__

    names = ["dip_r1_zoom", "sft"]
    jobs.run_units(jobs.units(names, 1), names, lambda u: (boom, u), finish, jobs=1, threads=1)
    assert seen == {"dip_r1_zoom": "ValueError", "sft": "ValueError"}
