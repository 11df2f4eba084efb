"""The run report: a results table per stage (key metrics, wall time) in Markdown + flat metrics.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tckr.config import TckrConfig

# Rows of the report: stage -> the metrics that summarise it (present ones only).
STAGE_ROWS: dict[str, tuple[str, ...]] = {
    "ingest": ("data.train_images", "data.validation_images", "data.holdout_images",
               "data.public_images", "data.test_images", "data.num_classes"),
    "teacher": ("teacher.test_accuracy", "teacher.val_accuracy", "teacher.best_epoch",
                "teacher.images_per_second"),
    "caption": ("caption.train_images", "caption.train_distinct", "caption.public_images",
                "caption.public_distinct"),
    "generator": ("generator.cached",),
    "finetune": ("finetune.steps", "finetune.final_loss"),
    # The shards' compute (ParallelFor tasks, summed), then the gathering and scoring step.
    "generate_shards": ("synthetic.shards", "synthetic.images_per_second"),
    "generate": ("synthetic.images", "synthetic.teacher_agreement"),
}


def _format(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"


def results_table(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    """``(stage, key metrics, wall time)`` rows, in pipeline order."""
    rows = []
    for stage, keys in STAGE_ROWS.items():
        seconds = metrics.get(f"stage.{stage}.seconds")
        if seconds is None:
            continue
        shown = ", ".join(f"{key.split('.', 1)[1]}={_format(metrics[key])}" for key in keys if key in metrics)
        rows.append((stage, shown, f"{seconds:.1f}s"))
    if "run.seconds" in metrics:
        rows.append(("total", "", f"{metrics['run.seconds']:.1f}s"))
    return rows


def render_table(rows: list[tuple[str, str, str]]) -> str:
    header = ("stage", "key metrics", "wall time")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def write_report(cfg: TckrConfig, metrics: dict[str, float], out_dir: Path, parent_run: Any) -> list[Path]:
    """Write ``metrics.json``, ``report.md`` and ``config.yaml`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    config_path = out_dir / "config.yaml"
    config_path.write_text(cfg.to_yaml())
    report = [
        f"# tckr run `{parent_run.info.run_name}`",
        "",
        f"profile `{cfg.profile}` · dataset `{cfg.dataset}` · image size {cfg.image_size} px · "
        f"config hash `{cfg.fingerprint()}` · MLflow run `{parent_run.info.run_id}` "
        f"(experiment `{cfg.experiment_name}`)",
        "",
        "## Results",
        "",
        render_table(results_table(metrics)),
        "",
    ]
    if (out_dir / "samples.png").is_file():
        report += ["## Synthetic samples", "",
                   "One row per class (first ten images of each), generated from the private captions "
                   f"(teacher agreement {metrics.get('synthetic.teacher_agreement', float('nan')):.3f}).", "",
                   "![synthetic samples per class](samples.png)", ""]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(report))
    return [metrics_path, report_path, config_path]
