"""Several GPUs in one pod: a stage given ``kubernetes.stages.<stage>.gpus = n > 1`` runs as n processes; and,
without a GPU, a stage whose work is independent items may run as several processes on a many-core machine.

The stage launcher calls :func:`run_stage`. With one device it calls the stage in its own process; with n it
launches ``torch.distributed.run --standalone --nproc-per-node=n`` on this module, which runs the same
stage function in every process (rank), one device (or an equal share of the cores) each. Rank 0, the lead,
does whatever must happen once: MLflow, validation, checkpoints, manifests, the returned metrics. The others
do their share of the work: classifier training is DistributedDataParallel
(:func:`tckr.training.classifier.train_classifier`), generation splits every shard's batches across ranks
(:func:`tckr.generators.generate.generate_shards`), a shadow group splits its shadows
(:func:`tckr.privacy.attack.train_shadows`). NCCL on GPUs; gloo on CPUs runs the same code.

Rank and world size are read from the environment torchrun sets, so code that only asks "am I the
lead?" (tracking) does not have to import torch.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tckr.core.errors import DeviceError, TckrError

PROCESSES_ENV = "TCKR_PROCESSES"
"""How many processes a multi-GPU stage runs as: the cluster sets it on the task to the pod's GPU count."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_lead() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world_size() > 1:
        import torch.distributed

        torch.distributed.barrier()


def rank_device(device):
    """This rank's GPU (``cuda:LOCAL_RANK``) when the stage runs on several; ``device`` otherwise."""
    import torch

    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class StageProcessFailed(TckrError):
    """A rank of a multi-process stage failed (its own error is printed above)."""


def processes() -> int:
    """How many processes this stage runs as (one per GPU the pod was given; 1 unless told otherwise)."""
    return max(1, int(os.environ.get(PROCESSES_ENV, "1")))


CORES_PER_CPU_PROCESS = 4
"""``runtime.cpu_processes: auto`` gives each process this many cores: a small model's batch keeps a few cores
busy, not dozens, so a many-core machine runs its independent items side by side instead."""


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (what a container's cpuset or ``taskset`` leaves it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_processes(setting: int | str, items: int) -> int:
    """How many CPU processes a stage of ``items`` independent items runs as under ``runtime.cpu_processes``."""
    wanted = max(1, usable_cores() // CORES_PER_CPU_PROCESS) if setting == "auto" else int(setting)
    return max(1, min(wanted, items))


def run_stage(stage: str, function: Callable[..., Any], kwargs: dict[str, Any], count: int, device: str) -> Any:
    """``function(**kwargs)`` in this process, or in ``count`` ranks under torchrun; returns what rank 0
    returned. ``device`` (``runtime.device``) picks NCCL for GPUs, gloo otherwise; gloo ranks share the cores
    equally (``OMP_NUM_THREADS``, unless the environment sets it)."""
    if count == 1:
        return function(**kwargs)
    import torch

    backend = "nccl" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "gloo"
    if backend == "nccl" and torch.cuda.device_count() < count:
        raise DeviceError(f"stage {stage} should run as {count} processes, one per GPU, but this pod sees "
                          f"{torch.cuda.device_count()} GPUs")
    with tempfile.TemporaryDirectory(prefix=f"tckr-{stage}-ranks-") as folder:
        job, result = Path(folder) / "job.pkl", Path(folder) / "result.pkl"
        job.write_bytes(pickle.dumps((function, kwargs, backend)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={count}",
                   "-m", "tckr.core.distributed", str(job), str(result)]
        environment = dict(os.environ)
        if backend == "gloo":
            environment.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // count)))
        returncode = subprocess.run(command, check=False, env=environment).returncode
        if returncode != 0:
            raise StageProcessFailed(f"stage {stage} failed in one of its {count} processes (exit code {returncode}); "
                                     "the failing rank's error is printed above")
        return pickle.loads(result.read_bytes())


def _run_rank(job: Path, result: Path) -> None:
    """One rank: join the process group, run the stage, and (lead only) hand its return value back."""
    import torch
    import torch.distributed

    function, kwargs, backend = pickle.loads(job.read_bytes())
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group(backend)
    try:
        value = function(**kwargs)
        if is_lead():
            result.write_bytes(pickle.dumps(value))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    _run_rank(Path(sys.argv[1]), Path(sys.argv[2]))
