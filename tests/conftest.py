"""Shared fixtures: tiny checkpoints written once per test session, and processor batches."""

from __future__ import annotations

import warnings

import pytest

warnings.filterwarnings("ignore", message=".*requires torchvision.*")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory) -> str:
    from dip_r1.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_vl", "qwen2_vl", "xs"))


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory) -> str:
    from dip_r1.tiny import save_tiny

    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "qwen2_5_vl", "qwen2_5_vl", "xs"))
