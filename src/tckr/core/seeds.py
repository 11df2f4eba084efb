"""Every random stream of a run seeded from its configured seed *and its own name*, so that no two roles share a
stream by accident: the teacher, the student and shadow 0 all configured with seed 0 used to start from the same
initial weights, and a shadow's initial-weight seed was another epoch's augmentation seed of the teacher."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *stream: str | int) -> int:
    """A 63-bit seed for the stream named by ``stream`` (a role, an index, an epoch, ...) under ``seed``: distinct
    for distinct names, and the same on every machine and every version of numpy or torch (SHA-256 of the names)."""
    name = "/".join(str(part) for part in (seed, *stream))
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def section_seed(root: int, section: str) -> int:
    """A config section's seed under the run's root seed: 31 bits, so that it fits every RNG's seed argument and
    the arithmetic some streams do on it (``seed * 100_003 + epoch``) stays within 64 bits."""
    return derive_seed(root, "section", section) >> 32
