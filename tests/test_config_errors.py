"""Configuration errors: LightningCLI's message for a wrong key or type; one line naming the path for a missing
model or dataset, raised while the classes are built (before any weights load)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fault_tools import fit_config, write_config

from dip_r1 import cli
from dip_r1.data.sources import CrowdHuman
from dip_r1.data.stream import DetectionStream


@pytest.fixture
def run_cli(tmp_path, monkeypatch, tiny_qwen2_vl):
    monkeypatch.setattr(sys, "argv", ["dip-r1"])  # pytest's own arguments are not the CLI's
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = []
    monkeypatch.setattr(
        "dip_r1.models.load_policy", lambda *a, **k: loaded.append(a) or pytest.fail("loaded")
    )

    def run(edit=lambda c: None, *extra: str) -> SystemExit:
        config = fit_config(tmp_path / "run", tiny_qwen2_vl, tmp_path / "crowd", n_images=2)
        edit(config)
        path = write_config(tmp_path / "config.yaml", config)
        with pytest.raises(SystemExit) as info:
            cli.main(["fit", "--config", str(path), *extra])
        assert not loaded
        return info.value

    return run


def test_a_wrong_key_gives_lightningclis_message(run_cli, capsys):
    def edit(config):
        config["model"]["init_args"]["group_sise"] = 4

    assert run_cli(edit).code == 2
    err = capsys.readouterr().err
    assert "usage: dip-r1" in err and "group_sise" in err


def test_a_wrong_type_gives_lightningclis_message(run_cli, capsys):
    def edit(config):
        config["model"]["init_args"]["group_size"] = "many"

    assert run_cli(edit).code == 2
    err = capsys.readouterr().err
    assert "group_size" in err and "many" in err


def _error_line(exit_: SystemExit, capsys) -> str:
    """The one line a bad input gets: the last of stderr, with exit status 2."""
    assert exit_.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_model_path_is_one_line(run_cli, tmp_path, capsys):
    def edit(config):
        config["model"]["init_args"]["policy"]["path"] = str(tmp_path / "no-model")

    assert _error_line(run_cli(edit), capsys) == (
        f"dip-r1: error: model at {tmp_path}/no-model: no such folder (check --model.init_args.policy.path)"
    )


def test_a_missing_dataset_path_is_one_line(run_cli, tmp_path, capsys):
    def edit(config):
        config["data"]["train"] = [
            {
                "class_path": "dip_r1.data.sources.CrowdHuman",
                "init_args": {"annotation_file": str(tmp_path / "train.odgt"), "image_dir": str(tmp_path)},
            }
        ]

    assert _error_line(run_cli(edit), capsys) == (
        f"dip-r1: error: crowdhuman annotation_file at {tmp_path}/train.odgt: no such file "
        "(check the path in the data section of the config)"
    )


def test_a_missing_image_folder_is_caught_at_construction(tmp_path):
    annotation = tmp_path / "train.odgt"
    annotation.write_text("")
    with pytest.raises(
        FileNotFoundError, match=rf"^crowdhuman image_dir at {tmp_path}/Images: no such folder"
    ):
        DetectionStream([CrowdHuman(annotation, tmp_path / "Images")])
    DetectionStream([CrowdHuman(annotation, tmp_path)])  # both there: fine, however empty


def test_a_setting_out_of_range_is_one_line(run_cli, capsys):
    # a CLI override as a user would type it: the settings are checked before any weights load
    exit_ = run_cli(lambda c: None, "--model.init_args.sampling.temperature", "0")
    assert _error_line(exit_, capsys) == "dip-r1: error: sampling.temperature must be > 0, got 0.0"
    exit_ = run_cli(lambda c: None, "--model.init_args.micro_batch_size", "0")
    assert _error_line(exit_, capsys) == "dip-r1: error: micro_batch_size must be >= 1, got 0"


def test_a_warm_start_builds_only_at_its_home_or_when_forced(tmp_path, monkeypatch, tiny_qwen2_vl):
    import shutil

    from dip_r1.models import prepare_model_path

    class Builder:
        def __init__(self, home=None, force=False):
            self.home, self.force, self.built = home, force, []

        def build(self, path):
            self.built.append(path)
            shutil.copytree(tiny_qwen2_vl, path)

    monkeypatch.chdir(tmp_path)
    typo = Builder(home="data/base")
    with pytest.raises(
        FileNotFoundError, match=r"^model at data/bsae: no such model, .* builds only at data/base"
    ):
        prepare_model_path("data/bsae", typo)
    assert not typo.built and not (tmp_path / "data").exists()
    home = Builder(home="data/base")
    assert prepare_model_path("data/base", home) == Path("data/base")
    assert home.built and (tmp_path / "data/base/config.json").is_file()
    assert prepare_model_path("data/base", Builder(home="data/base")) == Path("data/base")  # there: no build
    forced = Builder(force=True)
    prepare_model_path(tmp_path / "anywhere", forced)
    assert forced.built == [tmp_path / "anywhere"]
    with pytest.raises(FileNotFoundError, match="builds only when asked"):
        prepare_model_path("elsewhere", Builder())


def test_the_grpo_variants_are_checked_and_printed(run_cli, capsys):
    message = _error_line(run_cli(lambda c: None, "--model.init_args.loss.loss_type", "cispo"), capsys)
    assert message.startswith("dip-r1: error: loss.epsilon_high is CISPO's bound on the importance weight")
    message = _error_line(run_cli(lambda c: None, "--model.init_args.max_resample_batches", "-1"), capsys)
    assert message == "dip-r1: error: max_resample_batches must be >= 0, got -1"
    message = _error_line(run_cli(lambda c: None, "--model.init_args.loss.top_entropy_quantile", "0"), capsys)
    assert message == "dip-r1: error: loss.top_entropy_quantile must be in (0, 1], got 0.0"
    # --print_config shows each new option with its default (off)
    assert run_cli(lambda c: None, "--print_config").code in (0, None)
    printed = capsys.readouterr().out
    for line in (
        "dynamic_sampling: false",
        "max_resample_batches: 3",
        "importance_sampling_level: token",
        "top_entropy_quantile: 1.0",
        "loss_type: grpo",
    ):
        assert line in printed, line
