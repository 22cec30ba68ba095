"""Resuming: a `dip-r1 fit` killed with SIGKILL and resumed with `--ckpt_path last` ends with the weights of an
uninterrupted run; a kill during a checkpoint save leaves `last.ckpt` loadable. Subprocesses, tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from fault_tools import fit, fit_config, fit_env, metrics, write_config

from dip_r1.checkpointing import RNGStateCallback, rng_state, set_rng_state


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """The synthetic set, generated once here rather than by the first subprocess."""
    from dip_r1.data.sources import SyntheticCrowd

    root = tmp_path_factory.mktemp("crowd") / "crowd"
    iter(SyntheticCrowd(root, n=12, width=96, height=72, min_people=1, max_people=2))
    return root


def _load(path):
    # What Lightning's resume does: weights_only loading, so every saved state must be a plain type.
    return torch.load(path, weights_only=True, map_location="cpu")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


# Dynamic sampling draws extra batches inside a step: the rigged reward makes the groups of half the images flat,
# so steps draw more, and the stream position saved with step 2 must count those draws.
DYNAMIC = {
    "dynamic_sampling": True,
    "rewards": {
        "rewards": {"length": {"class_path": "fault_tools.LengthReward", "init_args": {"flat_even": True}}}
    },
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["plain", "dynamic_sampling"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_qwen2_vl, crowd, dynamic):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    extra = DYNAMIC if dynamic else {}
    config = fit_config(whole, tiny_qwen2_vl, crowd, **extra)
    done = fit(write_config(tmp_path / "whole.yaml", config))
    assert done.returncode == 0, done.stderr[-3000:]

    # The same run, killed with SIGKILL after step 3's work but before its checkpoint: last.ckpt is step 2.
    config = fit_config(broken, tiny_qwen2_vl, crowd, **extra)
    resume_config = write_config(tmp_path / "broken.yaml", config)
    config["trainer"]["callbacks"].append({"class_path": "fault_tools.KillAt", "init_args": {"step": 3}})
    killed = fit(write_config(tmp_path / "killed.yaml", config))
    assert killed.returncode == -signal.SIGKILL
    saved = _load(broken / "checkpoints/last.ckpt")
    assert saved["global_step"] == 2
    drawn_by_step_2 = (
        2 + sum(int(float(r["train/resampled_batches"])) for r in metrics(whole)[:2]) if dynamic else 2
    )
    assert saved["DetectionDataModule"]["train"]["consumed"] == [2 * drawn_by_step_2]  # batches x 2 prompts
    assert len(saved["callbacks"]["RNGStateCallback"]["ranks"]) == 1

    resumed = fit(resume_config, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = _load(whole / "checkpoints/last.ckpt"), _load(broken / "checkpoints/last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys() and all("lora_" in k for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    # the weights did move after step 2, so equality above is not the trivial one
    moved = max((a["state_dict"][k] - saved["state_dict"][k]).abs().max().item() for k in a["state_dict"])
    assert moved > 1e-4
    # optimiser moments, scheduler (lr 0.01 * 0.7^4) and stream position match too
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=1e-9)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(0.01 * 0.7**4)
    assert a["DetectionDataModule"] == b["DetectionDataModule"]

    # the resumed run logged steps 3 and 4 only, with the rewards the uninterrupted run logged there
    after = metrics(broken, version=1)
    assert [int(r["step"]) for r in after] == [2, 3]
    expected = [r["train/reward"] for r in metrics(whole)][2:]
    assert [r["train/reward"] for r in after] == expected
    if dynamic:  # extra batches were drawn, and the resumed run drew the same ones
        drawn = [r["train/resampled_batches"] for r in metrics(whole)]
        assert sum(float(d) for d in drawn) > 0
        assert [r["train/resampled_batches"] for r in after] == drawn[2:]
        assert [r["train/dropped_groups"] for r in after] == [
            r["train/dropped_groups"] for r in metrics(whole)
        ][2:]


def test_rng_states_are_put_back_at_the_first_batch_not_at_load():
    """Building the DataLoader iterator draws from torch's generator after Lightning's restore: restoring
    at load time would be undone by that draw."""
    callback = RNGStateCallback()
    torch.manual_seed(1)
    callback.load_state_dict(callback.state_dict())
    expected = torch.rand(3)
    torch.manual_seed(1)
    torch.empty((), dtype=torch.int64).random_()  # what DataLoader's iterator does on resume
    callback.on_train_batch_start(None, None, None, 0)
    torch.testing.assert_close(torch.rand(3), expected)
    callback.on_train_batch_start(None, None, None, 1)  # once only
    assert not torch.equal(torch.rand(3), expected)


# In the subprocess: torch.save writes half of last.ckpt at step 2, says so, and hangs: the kill comes mid-write.
SLOW_SAVE = """
import io, os, sys, time, torch
real_save = torch.save

def slow_save(obj, f, *args, **kwargs):
    name = "" if isinstance(f, io.BytesIO) else os.path.basename(os.fspath(getattr(f, "name", f)))
    if "last" in name and isinstance(obj, dict) and obj.get("global_step") == 2:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        target = f if hasattr(f, "write") else open(f, "wb")
        target.write(data[: len(data) // 2])
        target.flush()
        open(os.environ["SAVING_MARKER"], "w").close()
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)

torch.save = slow_save
from dip_r1.cli import main
main(sys.argv[1:])
"""


def test_a_kill_during_a_save_leaves_last_ckpt_loadable(tmp_path, tiny_qwen2_vl, crowd):
    run = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", fit_config(run, tiny_qwen2_vl, crowd))
    marker = tmp_path / "saving"
    env = dict(fit_env(), SAVING_MARKER=str(marker))
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, "fit", "--config", str(config)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    folder = run / "checkpoints"
    partial = folder / ".last.ckpt.partial"
    assert partial.is_file() and partial.stat().st_size > 0  # the write in progress went to the side file
    with pytest.raises(RuntimeError):  # half a zip archive
        _load(partial)
    assert _load(folder / "last.ckpt")["global_step"] == 1
