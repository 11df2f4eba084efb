"""Which torch device a stage runs on."""

from __future__ import annotations

import torch

from tckr.core import distributed
from tckr.core.config import RuntimeConfig
from tckr.core.errors import DeviceError


def resolve_device(requested: str) -> torch.device:
    """``auto`` takes a GPU when one is visible; ``cuda`` refuses to run without one."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("runtime.device is 'cuda' but no CUDA GPU is visible: run on a GPU node, or "
                          "set runtime.device=auto (or cpu) for a CPU run")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def stage_device(runtime: RuntimeConfig) -> torch.device:
    """The stage's device (this rank's own GPU among several), with the configured thread count applied."""
    if runtime.torch_threads:
        torch.set_num_threads(runtime.torch_threads)
    return distributed.rank_device(resolve_device(runtime.device))
