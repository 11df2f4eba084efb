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


@contextmanager
def own_stream(seed: int, device=None) -> Iterator[None]:
    """Run the block on random streams of its own, all seeded from ``seed`` (torch's on the CPU and on ``device``,
    NumPy's and Python's global ones, which MixUp and AugMix draw from), and give the caller's streams back
    afterwards: what the block draws depends on ``seed`` alone, not on whatever drew before it."""
    import numpy as np
    import torch

    numpy_state, python_state = np.random.get_state(), random.getstate()
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            for cuda in devices:
                with torch.cuda.device(cuda):
                    torch.cuda.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
