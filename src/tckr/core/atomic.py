"""Writes that leave a file or directory complete or absent, never half-written: what makes every
stage safe to kill and resume. Each writes beside the target, flushes it to the disk, renames it into place and
flushes the directory: a killed process cannot break that, and neither can a node that loses power."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tckr.core.errors import TckrError


class DiskFullError(TckrError, OSError):
    """The disk (or quota) a stage writes to is full."""


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _fsync(path: Path) -> None:
    """Flush a file's bytes, or a directory's entries, to the disk. Without it a node that loses power can keep the
    rename and lose the bytes (an empty file where a complete one was), or forget the rename."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a path to write the file at; it becomes ``path`` only if the block completes."""
    path = Path(path)
    partial = _partial(path)
    try:
        yield partial
        _fsync(partial)
        partial.replace(path)
        _fsync(path.parent)
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
    for copied in sorted(partial.rglob("*"), reverse=True):  # files before the folders that hold them
        _fsync(copied)
    _fsync(partial)
    if target.exists():
        shutil.rmtree(target)
    partial.replace(target)
    _fsync(target.parent)


@contextlib.contextmanager
def disk_full_as_error(stage: str) -> Iterator[None]:
    """A full disk mid-write as one line. Checkpoints, shards and manifests are written through the functions above,
    so the write that failed left no partial file and a run once there is space resumes from what was complete."""
    try:
        yield
    except OSError as error:
        # pyarrow's IO errors carry the errno in their text only
        if error.errno not in (errno.ENOSPC, errno.EDQUOT) and "[errno 28]" not in str(error).lower():
            raise
        where = f" writing {error.filename}" if error.filename else ""
        raise DiskFullError(f"no space left on the device{where} during stage {stage}: free some (or give the stage "
                            "an output directory on a larger disk) and run it again; it resumes from its last "
                            "checkpoint or shard") from None
