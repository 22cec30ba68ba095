"""Bad inputs as a new user types them: each gets one line (``dip-r1: error: <what> at <path>: <why> (<what to
do>)``, exit status 2) before any weights load, or the documented right behaviour; nothing is overwritten, no
``version_N`` is left by a run that failed its checks, nothing hangs.

The commands run as ``dip-r1`` / ``python -m dip_r1.export`` command lines in their own processes, forked
from one that imported the package once (``tests/cli_runner.py``; one case also runs ``python -m
dip_r1.cli`` itself): 30 commands in well under two minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_tools import ROOT, fit_config, fit_env, write_config
from PIL import Image

RUNNER = Path(__file__).with_name("cli_runner.py")
ERROR = "dip-r1: error: "


class Runner:
    """The forking command runner of ``tests/cli_runner.py``, one per test module."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(RUNNER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=fit_env(),
            text=True,
        )

    def __call__(self, module: str, *argv: str, cwd: Path, timeout: float = 60, **env: str) -> dict:
        """Run ``python -m <module> <argv>`` in ``cwd`` with ``env`` added to the tests' environment."""
        request = {
            "module": module,
            "argv": list(argv),
            "cwd": str(cwd),
            "env": fit_env() | env,
            "timeout": timeout,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        assert answer["rc"] != -9, f"{argv} ran past {timeout} s"
        return answer

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def run():
    runner = Runner()
    yield runner
    runner.close()


def _jsonlines(folder: Path, records: list[dict], name: str = "anno.jsonl", prefix: bytes = b"") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in records).encode())
    return path


def _source(path: Path, name: str = "crowd", **init_args) -> dict:
    return {
        "class_path": "dip_r1.data.sources.JSONLines",
        "init_args": {"path": str(path), "name": name, **init_args},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_qwen2_vl, run):
    """A tiny model folder, a JSONLines dataset (one box outside its image, which gives no size), a config,
    and a checkpoint trained one step by ``dip-r1 fit --ckpt_path last_or_new``."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = root / "model"
    shutil.copytree(tiny_qwen2_vl, model)
    images = root / "crowd"
    images.mkdir()
    records = []
    for i in range(4):
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(images / f"{i}.jpg")
        records.append({"image": f"{i}.jpg", "boxes": [[4, 4, 30, 40]], "labels": ["person"]})
    records[0]["boxes"].append([80, 60, 90, 70])  # wholly outside the 64 x 48 image
    records[0]["labels"].append("person")
    anno = _jsonlines(images, records)
    config = fit_config(root / "run", "model", images, group_size=2, micro_batch_size=4)
    config["trainer"]["max_steps"] = 1
    config["model"]["init_args"]["sampling"]["max_new_tokens"] = 6
    config["model"]["init_args"].pop("lr_scheduler")
    config["data"]["train"] = [_source(anno)]
    config["data"]["val"] = [_source(anno)]
    path = write_config(root / "recipe.yaml", config)  # not config.yaml: a run without logger writes that
    answer = run("dip_r1.cli", "fit", "--config", str(path), "--ckpt_path", "last_or_new", cwd=root)
    assert answer["rc"] == 0, answer["stderr"][-3000:]
    return {
        "root": root,
        "model": model,
        "anno": anno,
        "config": path,
        "ckpt": root / "run/checkpoints/last.ckpt",
    }


def _fails(answer: dict, *needles: str, prog: str = "dip-r1") -> str:
    """The error line of a command that must fail its checks: status 2, no traceback, the line names it all."""
    err = answer["stderr"]
    assert answer["rc"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"{prog}: error: ") and all(n in line for n in needles), line
    return line


EXPORT = "python -m dip_r1.export"


def _versions(world) -> list[Path]:
    return sorted((world["root"] / "run" / "logs").glob("version_*"))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bad_model(world, tmp_path, edit) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(world["model"], folder)
    edit(folder)
    return folder


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------------- never ended


def test_a_source_whose_images_all_fail_stops_naming_it(run, world, tmp_path):
    anno = _jsonlines(tmp_path, [{"image": f"missing/{i}.jpg", "boxes": []} for i in range(3)])
    answer = run(
        "dip_r1.cli", "fit", "--config", str(world["config"]), f"--data.train=[{json.dumps(_source(anno, 'lost'))}]",
        "--trainer.max_steps=5", "--trainer.logger=false",
        cwd=world["root"],
    )  # fmt: skip
    _fails(
        answer,
        "train source lost at",
        str(anno),
        "none of its first 32 images could be loaded",
        "missing_image",
    )
    assert answer["seconds"] < 60


def test_the_quickstart_with_a_mistyped_model_path_builds_nothing(run, tmp_path):
    answer = run(
        "dip_r1.cli", "fit", "--config", str(ROOT / "recipes/quickstart.yaml"),
        "--model.init_args.policy.path=data/tiny-qwen3_vl-seeign", cwd=tmp_path,
    )  # fmt: skip
    _fails(
        answer,
        "model at data/tiny-qwen3_vl-seeign",
        "warm_start builds only at data/tiny-qwen3_vl-seeing",
        "force true",
    )
    assert not (tmp_path / "data/tiny-qwen3_vl-seeign").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ silent and wrong, or lost


def test_export_refuses_the_base_folder_and_another_model(run, world, tmp_path):
    before = _sha(world["model"] / "model.safetensors")
    answer = run("dip_r1.export", "--ckpt", str(world["ckpt"]), "--out", str(world["model"]), cwd=tmp_path)
    _fails(answer, f"--out at {world['model']}: it is the base model's own folder", prog=EXPORT)
    other = _bad_model(world, tmp_path, lambda f: None)
    answer = run("dip_r1.export", "--ckpt", str(world["ckpt"]), "--out", str(other), "--merge", cwd=tmp_path)
    _fails(
        answer, f"--out at {other}: it holds files an export did not write", "pass --overwrite", prog=EXPORT
    )
    assert _sha(world["model"] / "model.safetensors") == before == _sha(other / "model.safetensors")
    answer = run(
        "dip_r1.export",
        "--ckpt",
        str(world["ckpt"]),
        "--out",
        str(other),
        "--merge",
        "--overwrite",
        cwd=tmp_path,
    )
    assert answer["rc"] == 0 and (other / "dip_r1_export.json").is_file(), answer["stderr"][-2000:]


def test_predict_keeps_same_named_images_apart_and_never_truncates(run, world, tmp_path):
    for name in ("a/x.jpg", "b/x.jpg", "x.png"):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (48, 40), (len(name) * 30, 60, 90)).save(tmp_path / "images" / name)
    args = [
        "predict", "--config", str(world["config"]), "--ckpt_path", str(world["ckpt"]), "--trainer.logger=false",
        f"--data.predict_images={tmp_path}/images/**/x.*", "--trainer.callbacks+=dip_r1.callbacks.PredictionWriter",
    ]  # fmt: skip
    out = world["root"] / "runs/predict"
    # a user's file in the working folder, which is where a run without a logger logs
    mine = world["root"] / "config.yaml"
    mine.write_text("# mine\n")
    first = run("dip_r1.cli", *args, cwd=world["root"])
    assert first["rc"] == 0, first["stderr"][-3000:]
    records = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in records) == ["a/x.jpg", "b/x.jpg", "x.png"]
    assert sorted(r["image_path"] for r in records) == [
        f"{tmp_path}/images/{n}" for n in ("a/x.jpg", "b/x.jpg", "x.png")
    ]
    assert len({r["image"] for r in records}) == 3 and len(list(out.glob("*.png"))) == 3
    second = run("dip_r1.cli", *args, cwd=world["root"])
    assert second["rc"] == 0 and "runs/predict/version_1" in second["stdout"], second["stderr"][-3000:]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    assert len((out / "version_1/predictions.jsonl").read_text().splitlines()) == 3
    assert mine.read_text() == "# mine\n"


def test_command_line_flags_win_over_the_checkpoint(run, world):
    # a setting out of range given on the command line is checked, not replaced by the checkpoint's value
    answer = run(
        "dip_r1.cli", "validate", "--config", str(world["config"]), "--ckpt_path", str(world["ckpt"]),
        "--model.init_args.sampling.temperature", "0", cwd=world["root"],
    )  # fmt: skip
    assert _fails(answer) == f"{ERROR}sampling.temperature must be > 0, got 0.0"


def test_compare_base_on_the_command_line_prints_the_base_row(run, world):
    answer = run(
        "dip_r1.cli", "validate", "--config", str(world["config"]), "--ckpt_path", str(world["ckpt"]),
        "--model.init_args.compare_base", "true", "--trainer.logger=false", cwd=world["root"],
    )  # fmt: skip
    assert answer["rc"] == 0, answer["stderr"][-3000:]
    assert "model.init_args.compare_base = True from the command line (checkpoint: False)" in answer["stderr"]
    assert "difference" in answer["stdout"]


def test_ckpt_path_last_without_a_checkpoint_is_an_error(run, world, tmp_path):
    config = json.loads(json.dumps(__import__("yaml").safe_load(world["config"].read_text())))
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp_path / "checkpoints")
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = write_config(tmp_path / "config.yaml", config)
    answer = run("dip_r1.cli", "fit", "--config", str(path), "--ckpt_path", "last", cwd=world["root"])
    _fails(
        answer,
        "checkpoint at --ckpt_path last: no last checkpoint yet",
        str(tmp_path / "checkpoints"),
        "last_or_new",
    )
    assert not list(tmp_path.glob("logs/version_*"))
    # `last_or_new` starts a new run when there is none: the fixture's own run began so


@pytest.mark.parametrize("val", ["none", "empty"])
def test_validate_without_validation_data_is_an_error(run, world, tmp_path, val):
    versions = _versions(world)
    empty = _jsonlines(tmp_path, [])
    arg = "--data.val=null" if val == "none" else f"--data.val=[{json.dumps(_source(empty, 'empty'))}]"
    answer = run("dip_r1.cli", "validate", "--config", str(world["config"]), arg, cwd=world["root"])
    _fails(
        answer,
        *(
            ["val data at --data.val: no sources given"]
            if val == "none"
            else ["val source empty at", str(empty)]
        ),
    )
    assert _versions(world) == versions


def test_a_box_outside_an_image_of_unknown_size_is_counted(world):
    (metrics,) = (world["root"] / "run" / "logs").rglob("metrics.csv")
    import csv

    rows = [r for r in csv.DictReader(metrics.open()) if r.get("data/skipped_empty_box")]
    assert rows and float(rows[-1]["data/skipped_empty_box"]) >= 1


# ------------------------------------------------------------------- tracebacks where one line was promised


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("only_config", ["no weights (model.safetensors"]),
        ("corrupt_config", ["config.json: not valid JSON"]),
        ("truncated_weights", ["model.safetensors: truncated"]),
    ],
)
def test_a_broken_model_folder_is_one_line(run, world, tmp_path, case, needles):
    def edit(folder: Path) -> None:
        if case == "only_config":
            for f in folder.iterdir():
                if f.name != "config.json":
                    f.unlink()
        elif case == "corrupt_config":
            (folder / "config.json").write_text('{"model_type": "qwen2_vl",')
        else:
            _truncate(folder / "model.safetensors")

    folder = _bad_model(world, tmp_path, edit)
    answer = run(
        "dip_r1.cli",
        "fit",
        "--config",
        str(world["config"]),
        f"--model.init_args.policy.path={folder}",
        cwd=world["root"],
    )
    _fails(answer, "model at", str(folder), *needles)


@pytest.mark.parametrize("case", ["latin1", "folder"])
def test_an_unreadable_annotation_file_is_one_line(run, world, tmp_path, case):
    if case == "latin1":
        anno = tmp_path / "anno.jsonl"
        anno.write_bytes(b'{"image": "0.jpg"}\n{"image": "caf\xe9.jpg"}\n')
        needles = [f"{anno}:2: not UTF-8 text (byte 0xe9", "save the file as UTF-8"]
    else:
        anno = tmp_path
        needles = [f"crowd path at {tmp_path}: a folder, not a file"]
    answer = run(
        "dip_r1.cli",
        "fit",
        "--config",
        str(world["config"]),
        f"--data.train=[{json.dumps(_source(anno))}]",
        cwd=world["root"],
    )
    _fails(answer, *needles)


def test_a_byte_order_mark_keeps_the_first_record(run, world, tmp_path):
    records = [json.loads(line) for line in world["anno"].read_text().splitlines()]
    anno = _jsonlines(tmp_path, records[:1], prefix=b"\xef\xbb\xbf")
    shutil.copy(world["anno"].parent / "0.jpg", tmp_path / "0.jpg")
    answer = run(
        "dip_r1.cli", "validate", "--config", str(world["config"]), "--data.strict=true", "--trainer.logger=false",
        f"--data.val=[{json.dumps(_source(anno, 'bom'))}]", cwd=world["root"],
    )  # fmt: skip
    assert answer["rc"] == 0, answer["stderr"][-3000:]  # strict: a malformed first line would have stopped it
    assert "bom" in answer["stdout"]


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--data.train_weights=[1.0, 2.0]"], "weights at [1.0, 2.0]: 2 weights for 1 sources"),
        (["--data.batch_size=0"], "data.batch_size must be >= 1, got 0"),
    ],
)
def test_a_data_setting_out_of_range_is_one_line(run, world, args, line):
    answer = run("dip_r1.cli", "fit", "--config", str(world["config"]), *args, cwd=world["root"])
    assert _fails(answer).startswith(ERROR + line)


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_a_bad_ckpt_path_is_one_line_and_leaves_no_version(run, world, tmp_path, case):
    ckpt = tmp_path / "last.ckpt"
    if case == "truncated":
        shutil.copy(world["ckpt"], ckpt)
        _truncate(ckpt)
    versions = _versions(world)
    answer = run(
        "dip_r1.cli", "fit", "--config", str(world["config"]), "--ckpt_path", str(ckpt), cwd=world["root"]
    )
    _fails(
        answer,
        f"checkpoint at {ckpt}: " + ("no such file" if case == "missing" else "not a whole checkpoint"),
    )
    assert _versions(world) == versions


def test_predict_on_a_glob_that_matches_nothing_is_one_line(run, world, tmp_path):
    answer = run(
        "dip_r1.cli", "predict", "--config", str(world["config"]), f"--data.predict_images={tmp_path}/*.jpg",
        cwd=world["root"],
    )  # fmt: skip
    _fails(answer, f"images at {tmp_path}/*.jpg: no images there")


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_export_of_a_bad_checkpoint_is_one_line(run, world, tmp_path, case):
    ckpt = tmp_path / "last.ckpt"
    if case == "truncated":
        shutil.copy(world["ckpt"], ckpt)
        _truncate(ckpt, 0.9)
    answer = run("dip_r1.export", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), cwd=tmp_path)
    _fails(
        answer,
        f"checkpoint at {ckpt}: " + ("no such file" if case == "missing" else "not a whole"),
        prog=EXPORT,
    )
    assert not (tmp_path / "out").exists()


def test_export_from_another_folder_finds_the_base(run, world, tmp_path):
    answer = run("dip_r1.export", "--ckpt", str(world["ckpt"]), "--out", "exported", cwd=tmp_path)
    assert answer["rc"] == 0, answer["stderr"][-3000:]
    assert (tmp_path / "exported/adapter_config.json").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_recipe_on_a_machine_without_one_is_one_line(run, world):
    answer = run(
        "dip_r1.cli", "fit", "--config", str(world["config"]), "--trainer.accelerator=gpu", cwd=world["root"]
    )
    _fails(
        answer,
        "accelerator 'gpu' at --trainer.accelerator: torch sees no CUDA GPU",
        "--trainer.accelerator cpu",
    )


def test_strict_applies_to_lines(run, world, tmp_path):
    # the bad line is the second: it is met in a DataLoader worker, after the weights load, and still one line
    anno = _jsonlines(tmp_path, [{"image": "0.jpg", "boxes": []}, {"image": "0.jpg", "boxes": [[1, 2, 3]]}])
    shutil.copy(world["anno"].parent / "0.jpg", tmp_path / "0.jpg")
    answer = run(
        "dip_r1.cli", "fit", "--config", str(world["config"]), "--data.strict=true", "--data.num_workers=1",
        f"--data.train=[{json.dumps(_source(anno))}]", "--trainer.logger=false", cwd=world["root"],
    )  # fmt: skip
    _fails(answer, f"crowd annotation at {anno}:2: a box must be 4 numbers", "set strict false")


# --------------------------------------------------------------------------------------------- debugging


def test_the_real_console_command_and_debug(run, world):
    """The same one line from a plain ``python -m dip_r1.cli``; ``--debug`` or ``DIP_R1_DEBUG=1`` shows the
    traceback instead."""
    args = ["fit", "--config", str(world["config"]), "--model.init_args.policy.path=nowhere"]
    plain = subprocess.run(
        [sys.executable, "-m", "dip_r1.cli", *args], env=fit_env(), capture_output=True, text=True, timeout=120, cwd=world["root"]
    )  # fmt: skip
    _fails({"rc": plain.returncode, "stderr": plain.stderr}, "model at nowhere: no such folder")
    for debug in (
        run("dip_r1.cli", *args, "--debug", cwd=world["root"]),
        run("dip_r1.cli", *args, cwd=world["root"], DIP_R1_DEBUG="1"),
    ):
        assert debug["rc"] == 1 and "Traceback" in debug["stderr"] and "MissingInput" in debug["stderr"]
