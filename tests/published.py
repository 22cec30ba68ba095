"""Checkpoint folders laid out as the published Qwen ones (``tests/fixtures/published/<name>``), made loadable.

A fixture folder holds the published files but the weights and the large tokenizer files. :func:`published_checkpoint`
copies it and adds what is missing: a ``tokenizer.json`` (the tiny BPE of :func:`dip_r1.tiny.build_tokenizer` for
ordinary text, plus the folder's own added tokens at their published ids, from its ``tokenizer_config.json``) and
random weights of the folder's ``config.json``.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "published"
NAMES = tuple(sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))


@functools.cache
def _bpe() -> dict:
    """The tiny BPE (``tokenizer.json`` as a dict) without its special tokens, its ordinary ids renumbered from 0."""
    from dip_r1.tiny import SPECIAL_TOKENS, build_tokenizer

    raw = json.loads(build_tokenizer(1024).backend_tokenizer.to_str())
    ordinary = sorted((i, t) for t, i in raw["model"]["vocab"].items() if t not in SPECIAL_TOKENS)
    raw["model"]["vocab"] = {t: n for n, (_, t) in enumerate(ordinary)}
    raw["added_tokens"] = []
    return raw


def write_tokenizer(folder: Path) -> None:
    """``tokenizer.json``: the tiny BPE, and every token of ``added_tokens_decoder`` at its published id.

    The tokenizers library keeps an added token's id only when the model's vocabulary holds it at that id too (it
    renumbers the others after the vocabulary), as in the published files where both agree: so each goes in both.
    """
    raw = json.loads(json.dumps(_bpe()))
    decoder = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    for i, token in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        raw["model"]["vocab"][token["content"]] = int(i)
        raw["added_tokens"].append({"id": int(i), **token})
    (folder / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False))


def published_checkpoint(name: str, out: Path, seed: int = 0) -> Path:
    """The fixture folder ``name`` copied to ``out``, with its tokenizer and seeded random weights; returns ``out``."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    shutil.copytree(FIXTURES / name, out)
    write_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out))
    # save_pretrained writes the model's generation config: keep the published file instead
    generation = (out / "generation_config.json").read_text()
    model.save_pretrained(out)
    (out / "generation_config.json").write_text(generation)
    return out
