"""The seeing base's recipe: grounding targets and losses by hand, a short pretrain end to end."""

from __future__ import annotations

import json

import pytest
import torch

from dip_r1.models import load_policy
from dip_r1.tiny.curriculum import Stage
from dip_r1.tiny.grounding import GroundingHead, cell_targets, grounding_loss, sinusoidal_positions
from dip_r1.tiny.pretrain import TinyPretrain, pretrain, write_readme


def test_cell_targets_assign_each_box_to_the_cell_of_its_centre():
    target = {
        "boxes": torch.tensor([[0.0, 0, 100, 100], [0, 0, 400, 400], [700, 100, 900, 300]]),
        "image_size": (1000, 1000),
    }
    positive, box = cell_targets(target, (2, 3))  # cells 333 wide, 500 high
    # centres (50, 50) and (200, 200) share cell 0: the larger box wins; (800, 200) is in cell 2
    assert positive.tolist() == [1, 0, 1, 0, 0, 0]
    assert box[0].tolist() == [0.0, 0.0, 0.4000000059604645, 0.4000000059604645]
    torch.testing.assert_close(box[2], torch.tensor([0.7, 0.1, 0.9, 0.3]))
    empty, _ = cell_targets({"boxes": torch.zeros(0, 4), "image_size": (1000, 1000)}, (2, 2))
    assert empty.sum() == 0


def test_sinusoidal_positions_make_rows_and_columns_linear_readable(tmp_path):
    from dip_r1.tiny import save_tiny

    model, _ = load_policy(save_tiny(tmp_path / "q3", "qwen3_vl", "xs"), freeze_vision=False)
    assert sinusoidal_positions(model)
    table = model.model.visual.pos_embed.weight.detach().double()  # [g*g, dim]
    g = int(table.shape[0] ** 0.5)
    rows = torch.arange(g).repeat_interleave(g).double()  # raster order: row-major
    # least squares on the table recovers the row index to within a cell: position is in the features
    design = torch.cat([table, torch.ones(g * g, 1, dtype=torch.float64)], 1)
    fit = design @ (torch.linalg.pinv(design) @ rows)
    assert (fit - rows).abs().max() < 0.5
    qwen2, _ = load_policy(save_tiny(tmp_path / "q2", "qwen2_vl", "xs"))
    assert not sinusoidal_positions(qwen2)  # no table to fill


def test_grounding_loss_trains_the_vision_tower_only(tmp_path):
    import sys

    sys.path.insert(0, "tests")
    from helpers import prompt_batch

    from dip_r1.tiny import save_tiny

    model, processor = load_policy(save_tiny(tmp_path / "q3", "qwen3_vl", "xs"), freeze_vision=False)
    inputs = prompt_batch(processor, sizes=((64, 64), (96, 64)))
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 500, 500]]), "image_size": (1000, 1000)},
        {"boxes": torch.zeros(0, 4), "image_size": (1000, 1000)},
    ]
    head = GroundingHead(model.config.get_text_config().hidden_size)
    loss = grounding_loss(model, head, inputs, targets)
    loss.backward()
    grads = {n: p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()}
    assert any(v for n, v in grads.items() if ".visual." in n)
    assert not any(v for n, v in grads.items() if ".visual." not in n)


def test_short_pretrain_writes_a_loadable_base_with_its_scores(tmp_path):
    torch.set_num_threads(1)
    config = TinyPretrain(
        size="xs",
        stages=[Stage(3, 1, 1, 8, 64, 64)],
        scales=[1.0, 1.5],
        batch_size=2,
        vision_warmup=2,
        cache=str(tmp_path / "sets"),
        eval_images=2,
    )
    out = tmp_path / "base"
    record = config.build(out)
    assert record == out
    written = json.loads((out / "scores.json").read_text())
    assert written["steps"] == 3 and set(written["scores"]) == {"few", "crowd"}
    assert 0.0 <= written["scores"]["few"]["f1"] <= 1.0
    # the stage's 8 images, half at its size and half at 1.5 times it, the first half with the stage's seed
    trained = sorted(p.name for p in (tmp_path / "sets").iterdir() if p.name.startswith("train"))
    assert trained == ["train-1-1-64x64-n4-s0", "train-1-1-96x96-n4-s7919"]
    readme = (out / "README.md").read_text()
    assert written["sha256"] in readme and f"python -m dip_r1.pretrain --out {out}" in readme
    write_readme(out, "base", written, "python -m dip_r1.pretrain --out base --seed 0")
    assert "--seed 0" in (out / "README.md").read_text()
    model, _ = load_policy(out)
    assert model.config.model_type == "qwen3_vl"
    assert pretrain.__doc__


@pytest.mark.parametrize("name", ["tiny-qwen3_vl-seeing", "tiny-qwen3_vl-zoom", "tiny-qwen3_vl-zoom-far"])
def test_committed_base_is_the_one_its_readme_describes(name):
    from pathlib import Path

    from dip_r1.tiny.pretrain import sha256

    base = Path(__file__).resolve().parents[1] / "data" / name
    record = json.loads((base / "scores.json").read_text())
    assert sha256(base / "model.safetensors") == record["sha256"]
    assert record["sha256"] in (base / "README.md").read_text()
    assert (base / "model.safetensors").stat().st_size < 20 * 2**20
    few = record["scores"].get("few") or record["scores"]["few/zoom"]
    assert few["distinct_answers"] > 0.9  # it answers each image with its own boxes
    if record["config"].get("look_mode") == "zoom":  # scored with both looks on the same images
        assert {"crowd/zoom", "crowd/text"} <= set(record["scores"])
    model, _ = load_policy(base, freeze_vision=False)
    assert model.config.model_type == "qwen3_vl"


def test_zoom_stage_goes_on_from_a_base_and_scores_both_looks(tmp_path, tiny_checkpoint):
    torch.set_num_threads(1)
    start = tiny_checkpoint("qwen3_vl")
    config = TinyPretrain(
        start=start,
        look_mode="zoom",
        stages=[Stage(2, 2, 4, 4, 128, 96)],
        batch_size=2,
        vision_warmup=0,
        max_pixels=64 * 64,  # the 128x96 images are seen at half size: their crops are worth opening
        cache=str(tmp_path / "sets"),
        eval_images=2,
        held_out_size=(128, 96),
    )
    out = tmp_path / "zoom"
    config.build(out)
    written = json.loads((out / "scores.json").read_text())
    assert set(written["scores"]) == {"few/zoom", "few/text", "crowd/zoom", "crowd/text"}
    readme = (out / "README.md").read_text()
    assert f"built from `{start}`" in readme and "| crowd (6-10 people, 128x96, 2 images) | zoom |" in readme
    trained, _ = load_policy(out)
    before, _ = load_policy(start)
    changed = [
        n for (n, p), q in zip(trained.named_parameters(), before.parameters()) if not torch.equal(p, q)
    ]
    assert any(".visual." in n for n in changed) and any(".language_model." in n for n in changed)


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--start", "nowhere", "--look-mode", "zoom"], "--start nowhere holds no checkpoint"),
        (["--look-mode", "zoom", "--text-share", "1.5"], "text_share must lie in [0, 1], got 1.5"),
        (["--look-mode", "zoom", "--max-pixels", "100"], "max_pixels must be at least 1024"),
        (["--look-mode", "zoom", "--zoom-max-pixels", "10"], "zoom_max_pixels must be at least 1024"),
        (["--look-mode", "sideways"], "invalid choice: 'sideways'"),
        (["--stages", "10:1"], "a stage is steps:min:max"),
        (["--styles", "0.5"], "a style is figure_scale:groups"),
        (["--styles", "1:0,3:2"], "a style's figure_scale must lie in (0, 2], got 3.0"),
    ],
)
def test_pretrain_refuses_a_bad_flag_in_one_line_before_building(tmp_path, capsys, flags, says):
    from dip_r1.tiny.pretrain import main

    with pytest.raises(SystemExit) as stop:
        main(["--out", str(tmp_path / "base"), *flags])
    assert stop.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "base").exists()


def test_a_styled_stage_draws_smaller_figures_in_its_own_folder(tmp_path):
    from dip_r1.tiny.curriculum import Stage, stage_sources

    stage = Stage(0, 4, 4, 4, 160, 120)
    assert [s.root.name for s in stage_sources(tmp_path, stage, 3, [1.0])] == ["train-4-4-160x120-n4-s3"]
    plain, small = stage_sources(tmp_path, stage, 3, [1.0], [(1.0, 0), (0.5, 1)])
    assert (
        plain.root.name == "train-4-4-160x120-n2-s3"
        and small.root.name == "train-4-4-160x120-f0.5-g1-n2-s7922"
    )

    def mean_height(source) -> float:
        heights = [float(b[3] - b[1]) for s in source for b in s.boxes]
        return sum(heights) / len(heights)

    assert mean_height(small) < 0.7 * mean_height(plain)
