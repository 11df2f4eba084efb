"""What both recipes do with a synthetic set: log it (its MLflow dataset, its sample grid) and audit it (the
``audit`` stage, declared by each recipe from :data:`AUDIT_STAGE`). Apart from :mod:`tckr.recipes.common` so that
only the stages that touch a synthetic set reach this code (a DVC stage depends on the code it reaches)."""

from __future__ import annotations

from pathlib import Path

from tckr.core.config import RuntimeConfig, TrackingConfig
from tckr.core.stage import ARTIFACT, DATASET, resources
from tckr.privacy.config import AuditConfig


def log_synthetic_set(info, synthetic: Path, recipe: str, context: str, images: int) -> None:
    """A synthetic set as an MLflow dataset: named ``<dataset>/synthetic-<recipe>``, digest of its manifest."""
    from tckr.generators.pixel import digest_files
    from tckr.platform.tracking import log_dataset

    log_dataset(f"{info.name}/synthetic-{recipe}", digest_files([synthetic / "manifest.jsonl"]), str(synthetic),
                context, images)


def log_sample_grid(synthetic: Path, classes: list[str]) -> None:
    """The synthetic set's sample grid (one row per class) in the run's images."""
    import mlflow
    from PIL import Image

    from tckr.generators.generate import sample_grid

    with Image.open(sample_grid(synthetic, classes, per_class=10)) as grid:
        mlflow.log_image(grid, key="synthetic_samples", step=0)


def audit(*, image_size: int, audit: AuditConfig, tracking: TrackingConfig, runtime: RuntimeConfig, data: Path,
          synthetic: Path, results: Path) -> dict[str, float]:
    """Does the synthetic set copy members? Each synthetic image's nearest private-train and nearest holdout image
    (as many of each), in pixels (``audit.*``) and ImageNet features (``audit.features.*``); per-image distances in
    ``dcr.csv``, the images nearest a member in ``worst-pairs.png`` (beside that member and the nearest holdout image
    only with ``tracking.log_real_images``)."""
    import csv
    import json

    import matplotlib.pyplot as plt
    import mlflow

    from tckr.core.atomic import atomic_path, write_text
    from tckr.core.device import stage_device
    from tckr.core.errors import ConfigError
    from tckr.core.seeds import derive_seed
    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared
    from tckr.generators.generate import load_synthetic
    from tckr.privacy.audit import audit_synthetic, equal_sized, worst_pairs_figure

    splits, info = load_prepared(data)
    if "holdout" not in splits:
        raise ConfigError("the audit compares the synthetic set's distances to members with those to the holdout "
                          "split, and the prepared dataset has none: set ingest.holdout_fraction > 0")
    train_rows, holdout_rows = equal_sized(len(splits["train"]), len(splits["holdout"]), audit.references,
                                           derive_seed(audit.seed, "audit", "references"))
    train = decode_split(splits["train"].select(train_rows), image_size, info.channels)
    holdout = decode_split(splits["holdout"].select(holdout_rows), image_size, info.channels)
    images = decode_split(load_synthetic(synthetic, info.classes), image_size, info.channels)
    audits = audit_synthetic(images, train, holdout, audit, stage_device(runtime))

    results.mkdir(parents=True, exist_ok=True)
    metrics = {"audit.synthetic_images": float(len(images)), "audit.references": float(len(train_rows)),
               "audit.real_images_shown": float(tracking.log_real_images)}
    for space, outcome in audits.items():
        prefix = "audit." if space == "pixels" else f"audit.{space}."
        metrics |= {prefix + name: value for name, value in outcome.figures.items()}
    with atomic_path(results / "dcr.csv") as path, open(path, "w", newline="") as handle:
        writer = csv.writer(handle)  # rows as the user finds them: the synthetic manifest's, the splits' own
        writer.writerow(["synthetic_row"] + [f"{part}_{space}" for space in audits for part in
                                             ("dcr_train", "dcr_holdout", "train_row", "holdout_row")])
        for row in range(len(images)):
            writer.writerow([row] + [value for outcome in audits.values() for value in (
                f"{outcome.dcr_train[row]:.6f}", f"{outcome.dcr_holdout[row]:.6f}",
                int(train_rows[outcome.nearest_train[row]]), int(holdout_rows[outcome.nearest_holdout[row]]))])
    write_text(results / "audit.json", json.dumps({"config": audit.model_dump(mode="json"), "metrics": metrics},
                                                  indent=2) + "\n")
    figure = worst_pairs_figure(audits["pixels"], images, audit.worst_pairs,
                                (train, holdout) if tracking.log_real_images else None)
    figure.savefig(results / "worst-pairs.png")
    mlflow.log_figure(figure, "worst-pairs.png")
    plt.close(figure)
    for name in ("audit.json", "dcr.csv"):
        mlflow.log_artifact(str(results / name))
    return metrics


AUDIT_STAGE = {"sections": ("image_size", "audit", "tracking", "runtime"),
               "inputs": {"data": DATASET, "synthetic": DATASET}, "outputs": {"results": ARTIFACT},
               "resources": resources("4", "8", "16Gi", "24Gi", gpus=1)}  # the feature network
"""The ``audit`` stage's declaration: ``STAGES.declare(**AUDIT_STAGE)(audit)``."""
