"""Every random stream of a run seeded from its configured seed *and its own name*, so that no two roles share a
stream by accident: the teacher, the student and shadow 0 all configured with seed 0 used to start from the same
initial weights, and a shadow's initial-weight seed was another epoch's augmentation seed of the teacher."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager


def derive_seed(seed: int, *stream: str | int) -> int:
    """A 63-bit seed for the stream named by ``stream`` (a role, an index, an epoch, ...) under ``seed``: distinct
    for distinct names, and the same on every machine and every version of numpy or torch (SHA-256 of the names)."""
    name = "/".join(str(part) for part in (seed, *stream))
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def section_seed(root: int, section: str) -> int:
    """A config section's seed under the run's root seed: 31 bits, so that it fits every RNG's seed argument and
    the arithmetic some streams do on it (``seed * 100_003 + epoch``) stays within 64 bits."""
    return derive_seed(root, "section", section) >> 32


def rng_state(device=None) -> dict:
    """Every global generator a step may draw from: torch's on the CPU and on ``device`` (a CUDA device, or the
    current one when CUDA is in use), NumPy's (timm's MixUp) and Python's."""
    import numpy as np
    import torch

    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    else:  # the current device's, once CUDA is in use (asking before would initialise it)
        cuda = torch.cuda.get_rng_state() if device is None and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": cuda}


def set_rng_state(state: dict, device=None) -> None:
    """Put back what :func:`rng_state` took. A state without Python's generator (checkpoints written before it
    was saved) leaves that one as it is."""
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    if "python" in state:
        random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], device if device is not None and device.type == "cuda" else "cuda")


@contextmanager
def own_stream(seed: int, device=None) -> Iterator[None]:
    """Run the block on random streams of its own, all seeded from ``seed`` (torch's on the CPU and on ``device``,
    NumPy's and Python's global ones), and give the caller's streams back afterwards: what the block draws depends
    on ``seed`` alone, not on whatever drew before it."""
    import numpy as np
    import torch

    saved = rng_state(device)
    try:
        torch.random.default_generator.manual_seed(seed)
        if device is not None and device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        yield
    finally:
        set_rng_state(saved, device)
