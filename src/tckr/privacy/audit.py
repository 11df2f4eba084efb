"""Does the synthetic set copy its private training images? The distance-to-closest-record (DCR) audit.

Every synthetic image is matched to its nearest private-train image (the generator's members) and to its nearest
holdout image (never seen by any model), in pixel space and in a public feature space. The holdout set is drawn to
the train set's size from the same distribution, so a generator that learnt the distribution without copying its
members is, image by image, as likely to land nearer a holdout image as nearer a member. Two one-sided exact tests
ask whether it lands nearer members more often than that:

* **closer-to-train share**: the synthetic images nearer a member than any holdout image, a binomial test of
  share = 1/2 (ties dropped);
* **near copies**: a synthetic image is a near copy of a set when it lies closer to it than the
  ``near_copy_quantile`` of real holdout images lie to the train set (the calibration: how close two *different*
  real images of this distribution come); near copies of members against near copies of holdout images, an exact
  McNemar test on the discordant images.

The set is flagged when either p-value is below ``alpha / 2`` (Bonferroni over the two). The tests treat the
synthetic images as independent draws given the generator; a small p-value says the generator's samples sit nearer
its members than fresh data would, a large one does not prove the absence of leakage (membership inference on the
released models measures that), only that no copying is visible at this sample size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import binomtest

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


def _one_sided_p(successes: int, trials: int) -> float:
    """Exact binomial p-value of ``successes`` or more out of ``trials`` at probability 1/2 (1 when no trial)."""
    return float(binomtest(successes, trials, 0.5, alternative="greater").pvalue) if trials else 1.0


@dataclass(frozen=True)
class SpaceAudit:
    """The audit in one space: per synthetic image, its DCR to the train and the holdout set and which images."""

    space: str
    dcr_train: np.ndarray
    dcr_holdout: np.ndarray
    nearest_train: np.ndarray
    nearest_holdout: np.ndarray
    threshold: float
    """A near copy lies closer than this: the calibration quantile of holdout-to-train DCRs."""
    alpha: float
    figures: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        nearer_train = int(np.sum(self.dcr_train < self.dcr_holdout))
        nearer_holdout = int(np.sum(self.dcr_train > self.dcr_holdout))
        copy_of_train = self.dcr_train < self.threshold
        copy_of_holdout = self.dcr_holdout < self.threshold
        only_train = int(np.sum(copy_of_train & ~copy_of_holdout))
        only_holdout = int(np.sum(copy_of_holdout & ~copy_of_train))
        figures = {
            "dcr_train_median": float(np.median(self.dcr_train)),
            "dcr_holdout_median": float(np.median(self.dcr_holdout)),
            "closer_to_train_share": nearer_train / max(1, nearer_train + nearer_holdout),
            "dcr_pvalue": _one_sided_p(nearer_train, nearer_train + nearer_holdout),
            "near_copy_threshold": self.threshold,
            "near_copy_fraction": float(copy_of_train.mean()),
            "near_copy_fraction_holdout": float(copy_of_holdout.mean()),
            "near_copy_pvalue": _one_sided_p(only_train, only_train + only_holdout),
        }
        figures["flagged"] = float(min(figures["dcr_pvalue"], figures["near_copy_pvalue"]) < self.alpha / 2)
        object.__setattr__(self, "figures", figures)

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
    return SpaceAudit(space, dcr_train, dcr_holdout, nearest_train, nearest_holdout,
                      float(np.quantile(calibration, cfg.near_copy_quantile)), cfg.alpha)


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


def worst_pairs_figure(audit: SpaceAudit, synthetic: torch.Tensor, train: torch.Tensor, holdout: torch.Tensor,
                       count: int):
    """The ``count`` synthetic images nearest a member (top row), that member (middle) and the nearest holdout
    image (bottom), each column titled with both distances: what "copying" would look like, or does not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = audit.worst(count)
    figure, axes = plt.subplots(3, len(worst), figsize=(1.1 * len(worst) + 1.2, 4.0), dpi=120, squeeze=False)
    rows = (("synthetic", synthetic, worst), ("nearest member", train, audit.nearest_train[worst]),
            ("nearest holdout", holdout, audit.nearest_holdout[worst]))
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
    figure.suptitle(f"Synthetic images nearest a member ({audit.space}; titles: DCR to member, to holdout; "
                    f"near copy < {audit.threshold:.3f})", fontsize=8)
    figure.tight_layout()
    return figure
