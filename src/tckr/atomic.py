"""Writes that leave a file or directory complete or absent, never half-written: what makes every
stage safe to kill and resume. Each writes beside the target, then renames into place."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def write_text(path: Path, text: str) -> None:
    partial = _partial(Path(path))
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def torch_save(obj: Any, path: Path) -> None:
    import torch

    partial = _partial(Path(path))
    torch.save(obj, partial)
    partial.replace(path)


def copy_tree(source: Path, target: Path) -> None:
    """Copy a directory; an existing ``target`` is replaced."""
    target = Path(target)
    partial = _partial(target)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    if target.exists():
        shutil.rmtree(target)
    partial.replace(target)
