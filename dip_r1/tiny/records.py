"""What a built tiny base carries beside its weights: its README and its checksum; copying a base to go on from it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def copy_checkpoint(source: str | Path, folder: Path) -> None:
    """The model and processor files of the checkpoint at ``source`` into ``folder`` (not its README or
    scores)."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"dip_r1.pretrain: --start {source} holds no checkpoint (no config.json)")
    folder.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name not in ("README.md", "scores.json"):
            shutil.copy2(file, folder / file.name)


def sha256(path: str | Path) -> str:
    """The hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_readme(folder: Path, name: str, record: dict, command: str) -> None:
    """The README beside a built base: how it was made and what it scores."""
    config, rows = record["config"], []
    for key, score in record["scores"].items():
        set_name, _, mode = key.partition("/")
        s = record["held_out"][set_name]
        rows.append(
            f"| {set_name} ({s['min_people']}-{s['max_people']} people, {s['width']}x{s['height']}, {s['n']} "
            f"images) | {mode or 'text'} | {score['precision']:.3f} | {score['recall']:.3f} | {score['f1']:.3f} | "
            f"{score['format_valid']:.3f} | {score['distinct_answers']:.3f} |"
        )
    origin = f"from `{config['start']}`" if config.get("start") else "from random weights"
    budget = (
        f", each image reduced to at most {config['max_pixels']} pixels" if config.get("max_pixels") else ""
    )
    (folder / "README.md").write_text(
        f"# {name}\n\nA tiny {config['family']} ({config['size']}) built {origin} by `dip_r1.pretrain` in "
        f"{record['steps']} steps ({record['seconds'] / 60:.0f} min), {config.get('look_mode', 'text')} look "
        f"targets{budget}.\n\n```bash\n{command}\n```\n\nseed {config['seed']}; `model.safetensors` sha256 "
        f"`{record['sha256']}`.\n\nHeld-out greedy answers (IoU 0.5), with the look given:\n\n"
        "| set | look | precision | recall | F1 | format valid | distinct answers |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\nIts prompts use the system prompt `dip_r1.pretrain.TINY_SYSTEM_PROMPT`.\n"
    )
