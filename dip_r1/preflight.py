"""Checks of what a run reads, made before any weights load: one line naming the file and what to do.

One function per kind of input: a model folder (:func:`check_model_folder`), a dataset's annotation file and
image folder (:func:`check_annotation_file`, :func:`check_folder`), a Lightning checkpoint
(:func:`check_checkpoint`) and the accelerator (:func:`check_accelerator`). Each raises :class:`InputError`,
whose message reads ``<what> at <path>: <why> (<what to do>)``; ``dip-r1`` prints it as
``dip-r1: error: <message>`` and exits with status 2 (the traceback only under ``--debug`` or
``DIP_R1_DEBUG=1``). The checks read headers, not weights: a model folder's check reads its ``config.json``
and the header of each weights file, a checkpoint's its zip directory.
"""

from __future__ import annotations

import codecs
import json
import os
import struct
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dip_r1.settings import SettingError

MODEL_FLAG = "--model.init_args.policy.path"
"""Where a ``dip-r1`` run names its model folder."""


class InputError(ValueError):
    """An input a run cannot use; the message is one line: ``<what> at <path>: <why> (<what to do>)``.

    Built from one argument, the message is taken as it is (a message that travelled from a DataLoader
    worker).
    """

    def __init__(
        self, what: str, path: object = None, why: str | None = None, todo: str | None = None
    ) -> None:
        message = what if path is None else f"{what} at {path}: {why}" + (f" ({todo})" if todo else "")
        super().__init__(message)
        self.what, self.path, self.why, self.todo = what, path, why, todo

    def __reduce__(self):  # pickled whole (DataLoader workers, spawn): not re-built from the message only
        return (type(self), (self.what, self.path, self.why, self.todo))


class MissingInput(InputError, FileNotFoundError):
    """An :class:`InputError` for a path that does not exist (also a ``FileNotFoundError``)."""


# ------------------------------------------------------------------------------------------- model folders

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def check_model_folder(path: str | Path, *, what: str = "model", flag: str = MODEL_FLAG) -> Path:
    """The folder of a transformers checkpoint, checked: ``config.json`` parses and names a ``model_type``,
    every weights file is there and complete (its header read, its size matching it), and the tokenizer and
    image processor files are there. Returns the path; raises :class:`InputError` naming the file."""
    p = Path(path).expanduser()
    todo = f"check {flag}"
    if not p.exists():
        raise MissingInput(what, p, "no such folder", todo)
    if not p.is_dir():
        raise InputError(what, p, "a file, not a model folder", todo)
    config = p / "config.json"
    if not config.is_file():
        raise MissingInput(what, p, "no config.json, so no transformers checkpoint", todo)
    values = _read_json(config, what)
    if not isinstance(values, dict) or not values.get("model_type"):
        raise InputError(what, config, "names no model_type", "restore the file from the model's source")
    for weights in _weight_files(p, what):
        _check_weights(weights, what)
    if not any((p / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(
            what, p, f"no tokenizer files ({', '.join(TOKENIZER_FILES[:2])})", "copy them from the base model"
        )
    if not any((p / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        raise InputError(
            what, p, f"no image processor file ({IMAGE_PROCESSOR_FILES[0]})", "copy it from the base model"
        )
    return p


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(
            what, path, f"not valid JSON ({error})", "restore the file from the model's source"
        ) from None


def _weight_files(folder: Path, what: str) -> list[Path]:
    """The weights files of a checkpoint folder: the single file, or the shards its index lists."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    for name in WEIGHT_INDEXES:
        index = folder / name
        if index.is_file():
            weight_map = _read_json(index, what).get("weight_map") or {}
            shards = [folder / shard for shard in sorted(set(weight_map.values()))]
            for shard in shards:
                if not shard.is_file():
                    raise MissingInput(
                        what, shard, f"a shard {name} lists is missing", "copy the whole model folder"
                    )
            return shards
    raise MissingInput(
        what, folder, f"no weights ({WEIGHT_FILES[0]} or {WEIGHT_INDEXES[0]})", "copy the whole model folder"
    )


def _check_weights(path: Path, what: str) -> None:
    """A safetensors file's header parses and its size is what the header says; a ``.bin`` is a whole zip."""
    if path.suffix != ".safetensors":
        return _check_zip(path, what, "weights file")
    size = path.stat().st_size
    todo = "copy the file again from the model's source"
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= size - 8:
            raise InputError(what, path, f"truncated or not safetensors ({size} bytes)", todo)
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(what, path, "its safetensors header does not parse", todo) from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end > size:
        raise InputError(what, path, f"truncated: {size} bytes of {8 + length + end}", todo)


# ------------------------------------------------------------------------------------------------- datasets


def check_annotation_file(path: str | Path, what: str = "annotation file") -> Path:
    """A dataset's annotation file: there, a file, UTF-8 text (with or without a byte order mark)."""
    p = Path(path).expanduser()
    todo = "check the path in the data section of the config"
    if not p.exists():
        raise MissingInput(what, p, "no such file", todo)
    if p.is_dir():
        raise InputError(what, p, "a folder, not a file", "name the annotation file inside it")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk[: error.start].count(b"\n")
                raise InputError(
                    what,
                    f"{p}:{line}",
                    f"not UTF-8 text (byte 0x{chunk[error.start]:02x} at offset {offset + error.start})",
                    "save the file as UTF-8",
                ) from None
            offset, line = offset + len(chunk), line + chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise InputError(
                what, f"{p}:{line}", "not UTF-8 text (ends inside a character)", "save the file as UTF-8"
            ) from None
    return p


def check_folder(path: str | Path, what: str = "image folder") -> Path:
    """A folder a dataset reads from (its images): there, and a folder."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInput(what, p, "no such folder", "check the path in the data section of the config")
    if not p.is_dir():
        raise InputError(what, p, "a file, not a folder", "check the path in the data section of the config")
    return p


# ---------------------------------------------------------------------------------------------- checkpoints


def check_checkpoint(path: str | Path, flag: str = "--ckpt_path") -> Path:
    """A Lightning checkpoint: there, and a whole ``torch.save`` file (its zip directory and pickle read);
    a folder (a sharded FSDP checkpoint) is passed on as it is."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInput("checkpoint", p, "no such file", f"check {flag}")
    if not p.is_dir():
        _check_zip(p, "checkpoint", "checkpoint", f"check {flag}, or take an earlier checkpoint")
    return p


def _check_zip(path: Path, what: str, kind: str, todo: str = "copy the file again") -> None:
    """A ``torch.save`` file: a zip whose directory reads and whose ``data.pkl`` is whole (CRC checked)."""
    try:
        with zipfile.ZipFile(path) as z:
            pickles = [n for n in z.namelist() if n.endswith("data.pkl")]
            if not pickles:
                raise zipfile.BadZipFile("no data.pkl")
            z.read(pickles[0])
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise InputError(
            what, path, f"not a whole {kind}, truncated or not written by torch.save ({error})", todo
        ) from None


# ---------------------------------------------------------------------------------------------- accelerator


def check_accelerator(accelerator: object, flag: str = "--trainer.accelerator") -> None:
    """The accelerator a trainer asks for is on this machine (``gpu`` / ``cuda``: a CUDA device; ``mps``)."""
    import torch

    name = accelerator.lower() if isinstance(accelerator, str) else None
    if name in ("gpu", "cuda") and not torch.cuda.is_available():
        why = "torch sees no CUDA GPU on this machine"
    elif name == "mps" and not torch.backends.mps.is_available():
        why = "torch sees no Apple GPU on this machine"
    else:
        return
    raise InputError(
        f"accelerator {accelerator!r}", flag, why, f"run on the CPU with {flag} cpu (and float32 weights)"
    )


# ------------------------------------------------------------------------------------------ reporting them

ONE_LINE_ERRORS = (InputError, SettingError, FileNotFoundError)
"""Errors that reach the user as one line (with ``--debug`` or ``DIP_R1_DEBUG=1``: with their traceback)."""


def one_line_error(exc: BaseException | None) -> BaseException | None:
    """The one-line error that ``exc`` is or was caused by, if any (jsonargparse wraps what a constructor
    raises in pages of config dump)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ONE_LINE_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def debugging(argv: list[str]) -> tuple[bool, list[str]]:
    """``(debug, argv without --debug)``: tracebacks asked for by ``--debug`` or ``DIP_R1_DEBUG=1``."""
    debug = "--debug" in argv or os.environ.get("DIP_R1_DEBUG", "") not in ("", "0")
    return debug, [a for a in argv if a != "--debug"]


@contextmanager
def reported(prog: str, debug: bool = False) -> Iterator[None]:
    """Turn a bad input raised inside into ``<prog>: error: <message>`` on stderr and exit status 2."""
    try:
        yield
    except Exception as exc:
        error = one_line_error(exc)
        if error is None or debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
