"""The pipeline's optional shared volume (``kubernetes.work_pvc``): where a pod finds the Hugging Face cache,
tckr's own caches and the checkpoints of the task it runs, so none of them dies with the pod.

KFP retries a failed pod (``set_retry``) as a new pod with new, empty output paths: a checkpoint beside the
outputs is gone and the retry trains from the start. With the volume, each task's checkpoints live in a folder
named by what the task is (recipe, stage and a digest of its settings and input artifacts: the same for every
retry, as KFP's own cache key is), so the retry resumes where the dead pod stopped. The training loop still
refuses a checkpoint of another trainer and starts over on one of other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

CACHE_ENV = "TCKR_CACHE"
"""Where tckr keeps what it can reuse across runs (pretrained generators, FID statistics); default ~/.cache/tckr."""
VOLUME_ENV = "TCKR_VOLUME"
"""The volume's mount path in the pod, set by the compiled pipeline when there is one."""
CHECKPOINT_DIR_ENV = "TCKR_CHECKPOINT_DIR"
"""The running task's checkpoint folder on the volume, set by the launcher (:func:`enter_task`)."""


def cache_dir(name: str) -> Path:
    """tckr's cache folder ``name`` (under ``$TCKR_CACHE``, on the volume when a pod has one)."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "tckr")) / name


def cache_environment(root: str) -> dict[str, str]:
    """The variables that put the Hugging Face cache and tckr's caches under ``root``."""
    return {"HF_HOME": f"{root}/huggingface", CACHE_ENV: f"{root}/cache"}


def volume_environment(mount: str) -> dict[str, str]:
    """The variables a pod with the volume at ``mount`` gets: the Hugging Face cache, tckr's caches, the volume."""
    return cache_environment(mount) | {VOLUME_ENV: mount}


def task_key(recipe: str, stage: str, identity: dict[str, Any]) -> str:
    """``<recipe>-<stage>-<digest of identity>``: names one task of one pipeline run, the same for each retry."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{recipe}-{stage}-{digest}"


def task_checkpoint_dir(volume: Path, recipe: str, stage: str, identity: dict[str, Any]) -> Path:
    """``<volume>/checkpoints/<task key>``."""
    return Path(volume) / "checkpoints" / task_key(recipe, stage, identity)


def enter_task(recipe: str, stage: str, identity: dict[str, Any]) -> Path | None:
    """Point this process's checkpoints at the task's folder on the volume, if the pod has one."""
    volume = os.environ.get(VOLUME_ENV)
    if not volume:
        return None
    folder = task_checkpoint_dir(Path(volume), recipe, stage, identity)
    os.environ[CHECKPOINT_DIR_ENV] = str(folder)
    return folder


def checkpoint_location(path: Path) -> Path:
    """Where the checkpoint a stage would write at ``path`` (beside its outputs) lives: there, or under the same
    name in the task's folder on the volume."""
    folder = os.environ.get(CHECKPOINT_DIR_ENV)
    if not folder:
        return Path(path)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / Path(path).name
