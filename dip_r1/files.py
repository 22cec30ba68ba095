"""Folders built aside and published whole: a build interrupted half-way never passes for a finished one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def built_aside(final: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``final`` (named for this process), renamed to ``final`` when the block ends
    without error, removed when it raises.

    Two processes building the same folder do not write into each other's files. If ``final`` exists by then
    (another process finished first), theirs is kept, unless ``replace``.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with built_aside(root / "set") as tmp:
    ...     _ = (tmp / "a.txt").write_text("done")
    >>> (root / "set" / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
    ('done', ['set'])
    """
    final = Path(final)
    tmp = final.with_name(f"{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final.parent.mkdir(parents=True, exist_ok=True)
    if replace:
        shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # `final` exists and is not empty: keep it
        shutil.rmtree(tmp, ignore_errors=True)
