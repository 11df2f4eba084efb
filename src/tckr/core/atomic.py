"""Writes that leave a file or directory complete or absent, never half-written: what makes every
stage safe to kill and resume. Each writes beside the target, then renames into place."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a path to write the file at; it becomes ``path`` only if the block completes."""
    partial = _partial(Path(path))
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as partial:
        partial.write_text(text, encoding="utf-8")


def torch_save(obj: Any, path: Path) -> None:
    import torch

    with atomic_path(path) as partial:
        torch.save(obj, partial)


def copy_tree(source: Path, target: Path) -> None:
    """Copy a directory; an existing ``target`` is replaced."""
    target = Path(target)
    partial = _partial(target)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    if target.exists():
        shutil.rmtree(target)
    partial.replace(target)
