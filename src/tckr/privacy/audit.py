"""Does the synthetic set copy its private training images? The distance-to-closest-record (DCR) audit.

Every synthetic image is matched to its nearest private-train image (the generator's members) and to its nearest
holdout image (never seen by any model), in pixel space and in a public feature space. The holdout set is drawn to
the train set's size from the same distribution, so for a generator that treats members like any other image of the
distribution, the two sets are exchangeable: whether an image is labelled "train" or "holdout" says nothing about
how near the synthetic images come to it. Two one-sided tests ask whether they come nearer the members:

* **closer-to-train share**: the synthetic images whose nearest record (in train and holdout together) is a member;
* **near copies**: those whose nearest record is a member and lies closer than the ``near_copy_quantile`` of real
  holdout images lie to the train set (the calibration: how close two *different* real images of this distribution
  come); the near copies of holdout images are reported beside them.

Both p-values come from relabelling: the train/holdout labels of the pooled reference images are reshuffled
``permutations`` times, and the statistic recomputed with every synthetic image keeping its nearest record. That
keeps the dependence a binomial test would ignore: generated images crowd onto a few "hub" records (in the TCKR
demo one holdout image is the nearest record of 214 of 5,000 synthetic images, and the share's variance is ~18 times
the independent one, logged as ``hub_inflation``), so a test that treats them as independent calls chance lopsided.
The set is flagged when either p-value is below ``alpha / 2`` (Bonferroni over the two). A small p-value says the
samples sit nearer the generator's members than its non-members; a large one does not prove the absence of leakage
(membership inference on the released models measures that), only that no copying is visible at this sample size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tckr.core.seeds import derive_seed
from tckr.privacy.config import AuditConfig


def closest_records(queries: torch.Tensor, references: torch.Tensor, batch_size: int = 1024,
                    device: torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance ``[N]`` from each query ``[N, D]`` to its nearest reference ``[M, D]``, and that
    reference's index ``[N]``; batched over queries (one matrix product per block) on ``device``."""
    references = references.to(device, torch.float32)
    distances, indices = [], []
    for start in range(0, len(queries), batch_size):
        block = torch.cdist(queries[start:start + batch_size].to(device, torch.float32), references)
        nearest = block.min(dim=1)
        distances.append(nearest.values.cpu())
        indices.append(nearest.indices.cpu())
    return torch.cat(distances).numpy(), torch.cat(indices).numpy()


def relabelling_pvalue(nearest: np.ndarray, counted: np.ndarray, members: int, draws: int, seed: int) -> float:
    """P-value of the ``counted`` synthetic images whose nearest record is a member (``nearest``: index into train
    then holdout, ``members`` each), against the same count when the records' train/holdout labels are shuffled
    ``draws`` times (every synthetic image keeps its nearest record); 1 when nothing is counted."""
    counts = np.bincount(nearest[counted], minlength=2 * members)
    hubs = np.flatnonzero(counts)
    if not len(hubs):
        return 1.0
    observed = counts[:members].sum()
    rng = np.random.default_rng(seed)
    labels = np.arange(2 * members) < members
    at_least = 0
    for start in range(0, draws, 256):
        shuffled = rng.permuted(np.tile(labels, (min(256, draws - start), 1)), axis=1)
        at_least += int(np.sum(shuffled[:, hubs].astype(np.int64) @ counts[hubs] >= observed))
    return (1 + at_least) / (1 + draws)


@dataclass(frozen=True)
class SpaceAudit:
    """The audit in one space: per synthetic image, its DCR to the train and the holdout set and which images,
    and the figures (:func:`audit_space`)."""

    space: str
    dcr_train: np.ndarray
    dcr_holdout: np.ndarray
    nearest_train: np.ndarray
    nearest_holdout: np.ndarray
    figures: dict[str, float]

    def worst(self, count: int) -> np.ndarray:
        """The ``count`` synthetic images nearest a member, nearest first."""
        return np.argsort(self.dcr_train, kind="stable")[:count]


def audit_space(space: str, synthetic: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor, cfg: AuditConfig,
                device: torch.device | None = None) -> SpaceAudit:
    """The audit of ``synthetic`` ``[S, D]`` against ``train`` and ``holdout`` (``[N, D]`` each, the same size: a
    DCR shrinks as its reference set grows) in one embedding."""
    if len(train) != len(holdout):
        raise ValueError(f"the audit compares equal-sized sets: {len(train)} train and {len(holdout)} holdout rows")
    dcr_train, nearest_train = closest_records(synthetic, train, cfg.batch_size, device)
    dcr_holdout, nearest_holdout = closest_records(synthetic, holdout, cfg.batch_size, device)
    calibration, _ = closest_records(holdout, train, cfg.batch_size, device)
    threshold = float(np.quantile(calibration, cfg.near_copy_quantile))
    to_member = dcr_train < dcr_holdout  # a tie goes to the holdout image: it never counts as a member match
    nearest = np.where(to_member, nearest_train, len(train) + nearest_holdout)  # into train, then holdout
    near_copy = np.minimum(dcr_train, dcr_holdout) < threshold
    hubs = np.bincount(nearest)
    seed = derive_seed(cfg.seed, "audit", space, "relabel")
    figures = {
        "dcr_train_median": float(np.median(dcr_train)),
        "dcr_holdout_median": float(np.median(dcr_holdout)),
        "closer_to_train_share": float(to_member.mean()),
        "dcr_pvalue": relabelling_pvalue(nearest, np.ones_like(to_member), len(train), cfg.permutations, seed),
        "hub_inflation": float(np.sum(hubs.astype(np.float64) ** 2) / len(nearest)),
        "near_copy_threshold": threshold,
        "near_copy_fraction": float(np.mean(dcr_train < threshold)),
        "near_copy_fraction_holdout": float(np.mean(dcr_holdout < threshold)),
        "near_copy_pvalue": relabelling_pvalue(nearest, near_copy, len(train), cfg.permutations, seed),
    }
    figures["flagged"] = float(min(figures["dcr_pvalue"], figures["near_copy_pvalue"]) < cfg.alpha / 2)
    return SpaceAudit(space, dcr_train, dcr_holdout, nearest_train, nearest_holdout, figures)


def equal_sized(train: int, holdout: int, limit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of as many train as holdout images (at most ``limit`` each when > 0), drawn without replacement."""
    size = min(train, holdout, limit or max(train, holdout))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(train, size, replace=False)), np.sort(rng.choice(holdout, size, replace=False))


def pixel_embedding(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, C, S, S]`` as ``[N, C*S*S]`` in [0, 1], scaled so a distance is the RMS pixel difference."""
    flat = images.reshape(len(images), -1).float() / 255.0
    return flat / flat.shape[1] ** 0.5


def feature_embedding(images: torch.Tensor, cfg: AuditConfig, device: torch.device) -> torch.Tensor:
    """ImageNet MobileNetV2 features of uint8 ``[N, C, S, S]``, unit length (a distance is a function of the
    cosine): a public network, trained on none of the sets it compares, so it favours neither."""
    from tckr.core.progress import progress
    from tckr.training.semantic import ImageNetClassifier

    network = ImageNetClassifier(device, cfg.feature_size)
    blocks = [network.embed(images[start:start + cfg.batch_size]).float().cpu()
              for start in progress(range(0, len(images), cfg.batch_size), desc="audit features", unit="batch")]
    return torch.nn.functional.normalize(torch.cat(blocks), dim=1)


def audit_synthetic(synthetic: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor, cfg: AuditConfig,
                    device: torch.device) -> dict[str, SpaceAudit]:
    """The audit of uint8 image sets (``train`` and ``holdout`` the same size) in every space ``cfg`` names."""
    sets = (synthetic, train, holdout)
    audits = {"pixels": audit_space("pixels", *map(pixel_embedding, sets), cfg, device)}
    if cfg.features == "imagenet":
        embedded = feature_embedding(torch.cat(sets), cfg, device)
        audits["features"] = audit_space("features", *torch.split(embedded, [len(s) for s in sets]), cfg, device)
    return audits


def worst_pairs_figure(audit: SpaceAudit, synthetic: torch.Tensor, count: int,
                       real: tuple[torch.Tensor, torch.Tensor] | None):
    """The ``count`` synthetic images nearest a member (top row), each titled with both distances, above that member
    (middle) and the nearest holdout image (bottom): what "copying" would look like, or does not. ``real`` (train,
    holdout images) None: the synthetic row alone, so that no real image is shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = audit.worst(count)
    rows = [("synthetic", synthetic, worst)]
    if real is not None:
        rows += [("nearest member", real[0], audit.nearest_train[worst]),
                 ("nearest holdout", real[1], audit.nearest_holdout[worst])]
    figure, axes = plt.subplots(len(rows), len(worst), figsize=(1.1 * len(worst) + 1.2, 0.5 + 1.2 * len(rows)),
                                dpi=120, squeeze=False)
    for row, (label, images, indices) in enumerate(rows):
        for column, index in enumerate(indices):
            image = images[int(index)].permute(1, 2, 0).numpy()
            grey = image.shape[2] == 1
            axis = axes[row, column]
            axis.imshow(image[:, :, 0] if grey else image, cmap="gray" if grey else None, vmin=0, vmax=255)
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(label, fontsize=7)
            if row == 0:
                synthetic_index = worst[column]
                axis.set_title(f"{audit.dcr_train[synthetic_index]:.3f}\n{audit.dcr_holdout[synthetic_index]:.3f}",
                               fontsize=6)
    hidden = "" if real is not None else "; real images not shown (tracking.log_real_images)"
    figure.suptitle(f"Synthetic images nearest a member ({audit.space}; titles: DCR to member, to holdout; "
                    f"near copy < {audit.figures['near_copy_threshold']:.3f}{hidden})", fontsize=8)
    figure.tight_layout()
    return figure
