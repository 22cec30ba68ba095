"""Configuration errors: LightningCLI's message for a wrong key or type; one line naming the path for a missing
model or dataset, raised while the classes are built (before any weights load)."""

from __future__ import annotations

import sys

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


def test_a_missing_model_path_is_one_line(run_cli, tmp_path):
    def edit(config):
        config["model"]["init_args"]["policy"]["path"] = str(tmp_path / "no-model")

    message = str(run_cli(edit).code)
    assert message == (
        f"dip-r1: error: no model checkpoint at {tmp_path}/no-model (expected {tmp_path}/no-model/config.json)"
    )


def test_a_missing_dataset_path_is_one_line(run_cli, tmp_path):
    def edit(config):
        config["data"]["train"] = [
            {
                "class_path": "dip_r1.data.sources.CrowdHuman",
                "init_args": {"annotation_file": str(tmp_path / "train.odgt"), "image_dir": str(tmp_path)},
            }
        ]

    message = str(run_cli(edit).code)
    assert message == f"dip-r1: error: crowdhuman: annotation_file {tmp_path}/train.odgt does not exist"


def test_a_missing_image_folder_is_caught_at_construction(tmp_path):
    annotation = tmp_path / "train.odgt"
    annotation.write_text("")
    with pytest.raises(FileNotFoundError, match=rf"^crowdhuman: image_dir {tmp_path}/Images does not exist$"):
        DetectionStream([CrowdHuman(annotation, tmp_path / "Images")])
    DetectionStream([CrowdHuman(annotation, tmp_path)])  # both there: fine, however empty


def test_a_setting_out_of_range_is_one_line(run_cli):
    # a CLI override as a user would type it: the settings are checked before any weights load
    message = str(run_cli(lambda c: None, "--model.init_args.sampling.temperature", "0").code)
    assert message == "dip-r1: error: sampling.temperature must be > 0, got 0.0"
    message = str(run_cli(lambda c: None, "--model.init_args.micro_batch_size", "0").code)
    assert message == "dip-r1: error: micro_batch_size must be >= 1, got 0"
