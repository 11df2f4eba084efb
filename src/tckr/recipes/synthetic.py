"""What both recipes log about a synthetic set: its MLflow dataset and its sample grid. Apart from
:mod:`tckr.recipes.common` so that only the stages that touch a synthetic set reach the generators package (a DVC
stage depends on the code it reaches)."""

from __future__ import annotations

from pathlib import Path


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
