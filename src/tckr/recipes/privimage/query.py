"""PrivImage's DP semantic query: which public classes look like each sensitive class, privately.

Every sensitive image ``(x, y)`` votes for the ``k`` public classes a semantic classifier ranks highest for
it: ``H[y, topk(f(x))] += 1`` in a ``[sensitive classes x public vocabulary]`` histogram. Adding or removing
one image changes ``k`` cells by 1, an L2 sensitivity of sqrt(k), so ``H + N(0, (sigma_q * sqrt(k))^2)`` is the
Gaussian mechanism with noise multiplier ``sigma_q``: one full-batch step in the run's accountant. Sensitive
classes then choose in order, each taking its ``k`` noisiest-highest public classes among those not taken yet
(the reference's shipped selections overlap across classes: masking is what makes them disjoint). Every public
image of a chosen class is relabelled with the sensitive class that chose it.

Only the noisy histogram touches private data; the rest (masking, the pool's contents, relabelling) is
post-processing of it and of public data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tckr.core.errors import ConfigError
from tckr.core.progress import progress


def vote_histogram(top_classes: np.ndarray, labels: np.ndarray, num_sensitive: int, vocabulary: int) -> np.ndarray:
    """``H[y, c]``: how many images of sensitive class ``y`` rank public class ``c`` in their top k
    (``top_classes``: int ``[N, k]``, distinct per row)."""
    histogram = np.zeros((num_sensitive, vocabulary), dtype=np.float64)
    np.add.at(histogram, (np.repeat(labels, top_classes.shape[1]), top_classes.reshape(-1)), 1.0)
    return histogram


def gaussian_noise_std(query_sigma: float, k: int) -> float:
    """The noise standard deviation for noise multiplier ``query_sigma`` at L2 sensitivity sqrt(k)."""
    return query_sigma * float(np.sqrt(k))


def select_public_classes(noisy: np.ndarray, k: int, available: np.ndarray | None = None) -> list[list[int]]:
    """Sensitive classes in order ``0..C-1``, each taking the ``k`` highest noisy counts of its row among
    the public classes still free (``available``: bool ``[V]``, e.g. classes the pool has images of)."""
    free = np.ones(noisy.shape[1], dtype=bool) if available is None else available.copy()
    if free.sum() < k * len(noisy):
        raise ConfigError(f"the public pool has {int(free.sum())} classes to choose from, fewer than "
                          f"{len(noisy)} sensitive classes x query.k = {k}: lower query.k or use a richer pool")
    chosen = []
    for row in noisy:
        candidates = np.flatnonzero(free)
        picked = candidates[np.argsort(-row[candidates], kind="stable")[:k]]
        free[picked] = False
        chosen.append(picked.tolist())
    return chosen


@dataclass(frozen=True)
class Selection:
    """The query's outcome, saved as ``selection.json`` and logged: per sensitive class, the public classes
    it took (ids, names) with their noisy counts."""

    sensitive_classes: list[str]
    vocabulary: list[str]
    chosen: list[list[int]]
    noisy_counts: list[list[float]]
    k: int
    query_sigma: float
    noise_std: float
    voters: int

    def public_to_sensitive(self) -> dict[int, int]:
        return {public: sensitive for sensitive, row in enumerate(self.chosen) for public in row}

    def relabel(self, public_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of the pool whose public class was chosen, and the sensitive class each now carries."""
        mapping = np.full(len(self.vocabulary), -1, dtype=np.int64)
        for public, sensitive in self.public_to_sensitive().items():
            mapping[public] = sensitive
        labels = mapping[public_labels]
        rows = np.flatnonzero(labels >= 0)
        return rows, labels[rows]

    def as_dict(self) -> dict:
        return asdict(self) | {"by_class": {
            name: [{"class": self.vocabulary[c], "id": c, "noisy_count": round(n, 2)}
                   for c, n in zip(self.chosen[i], self.noisy_counts[i], strict=True)]
            for i, name in enumerate(self.sensitive_classes)}}


def semantic_query(top_classes: np.ndarray, labels: np.ndarray, sensitive_classes: list[str], vocabulary: list[str],
                   k: int, query_sigma: float, seed: int, available: np.ndarray | None = None) -> Selection:
    """The whole query: votes, the Gaussian mechanism, the ordered selection without repeats."""
    if query_sigma <= 0:
        raise ConfigError(f"query.sigma must be > 0 (got {query_sigma}): without noise the query is not private")
    histogram = vote_histogram(top_classes, labels, len(sensitive_classes), len(vocabulary))
    std = gaussian_noise_std(query_sigma, k)
    noisy = histogram + np.random.default_rng(seed).normal(0.0, std, size=histogram.shape)
    chosen = select_public_classes(noisy, k, available)
    counts = [[float(noisy[i, c]) for c in row] for i, row in enumerate(chosen)]
    return Selection(list(sensitive_classes), list(vocabulary), chosen, counts, k, query_sigma, std, len(labels))


def semantic_precision(categories: Sequence[str], labels: np.ndarray, sensitive_classes: list[str]) -> float:
    """The share of selected public images whose true category is the sensitive class that chose them."""
    if len(labels) == 0:
        return 0.0
    return float(np.mean([category == sensitive_classes[label] for category, label in zip(categories, labels,
                                                                                             strict=True)]))


def chance_precision(categories: Sequence[str], sensitive_classes: list[str]) -> float:
    """What a query that saw nothing scores: pool images drawn at random, each given a random sensitive class
    (the pool's share of images in some sensitive category, over the number of classes)."""
    names = set(sensitive_classes)
    return float(np.mean([category in names for category in categories])) / len(sensitive_classes)


def top_classes(classify: Callable[[list], torch.Tensor], images: Sequence, k: int, batch_size: int,
                desc: str) -> np.ndarray:
    """int ``[N, k]``: each image's ``k`` highest-scoring classes under ``classify`` (images -> logits);
    ``images`` is sliced batch by batch (a list, or a ``datasets`` image column, decoded lazily)."""
    rows = []
    for start in progress(range(0, len(images), batch_size), desc=desc, unit="batch"):
        rows.append(classify(images[start:start + batch_size]).topk(k, dim=1).indices.cpu().numpy())
    return np.concatenate(rows) if rows else np.zeros((0, k), dtype=np.int64)
