"""Shared fixtures: tiny checkpoints written once per test session, and processor batches."""

from __future__ import annotations

import warnings

import pytest

from dip_r1.tiny import FAMILY_NAMES

warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family)``: the path of an xs checkpoint of that family, written once per session."""
    from dip_r1.tiny import save_tiny

    written: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in written:
            written[family] = str(save_tiny(tmp_path_factory.mktemp("tiny") / family, family, "xs"))
        return written[family]

    return get


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tiny_checkpoint) -> str:
    return tiny_checkpoint("qwen2_vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tiny_checkpoint) -> str:
    return tiny_checkpoint("qwen2_5_vl")


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def tiny_model(request, tiny_checkpoint) -> str:
    """One tiny checkpoint per family: a test that takes it runs once for each family."""
    return tiny_checkpoint(request.param)
