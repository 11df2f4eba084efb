"""The run report: teacher vs student in the layout of the TCKR paper's Table 2, the log-log ROC of
the attack, the synthetic samples, and a table of every stage's key metrics and wall time
(Markdown, beside a flat ``metrics.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tckr.recipes.report import (
    WORST_PAIRS,
    attack_table,
    audit_section,
    chance_verdict,
    null_band_cells,
    render_table,
    stage_rows,
    with_interval,
)
from tckr.recipes.tckr.config import TckrRun

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
    "audit": ("audit.closer_to_train_share", "audit.near_copy_fraction", "audit.flagged"),
    "fid": ("synthetic.fid", "fid.samples"),
    "student": ("student.test_accuracy", "student.val_accuracy", "student.best_epoch", "student.synthetic_images"),
    "negative_control": ("negative_control.test_accuracy",),
    "positive_control": ("positive_control.test_accuracy",),
    # The shadow groups' compute (ParallelFor tasks, summed), then the attack itself.
    "shadows": ("attack.shadows", "attack.shadow_val_accuracy"),
    "attack": ("attack.population", "attack.shadows_trained_here"),  # its figures: the table above
}

# Metric prefix -> name in the tables: the two targets, then the controls (the ones the run trained).
TARGETS = {"teacher": "teacher", "student": "student", "negative_control": "negative control",
           "positive_control": "positive control"}
CONTROLS_NOTE = ("Controls: the negative control is the teacher's recipe trained on as many public images (no member, "
                 "no holdout image): every attack must score it inside the null band, or the attack is broken. The "
                 "positive control is the student's recipe distilled from the teacher on the real members instead "
                 "of synthetic images, for the teacher's epochs: beside the teacher it shows how much distillation "
                 "alone hides, beside the student what the synthetic data adds.")
# The paper's Table 2 columns (header, metric suffix per role), all shown in percent.
TABLE2_COLUMNS = (("Accuracy", "test_accuracy"), ("AUC_MIA", "mia.auc"), ("TPR@0.1%FPR", "mia.tpr_at_0.1pct_fpr"),
                  ("TPR@1%FPR", "mia.tpr_at_1pct_fpr"), ("AOP", "aop"))


def results_table(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    """``(stage, key metrics, wall time)`` rows, in pipeline order."""
    return stage_rows(metrics, STAGE_ROWS)


def privacy_table(metrics: dict[str, float]) -> list[tuple[str, ...]]:
    """Teacher, student and their difference, in percent with 95% intervals (the paper's Table 2, and the band a
    target that learnt nothing scores); empty before the attack."""
    roles = [role for role in ("teacher", "student") if f"{role}.aop" in metrics]
    rows = [(role, *(with_interval(metrics, f"{role}.{key}") for _, key in TABLE2_COLUMNS)) for role in roles]
    if len(roles) == 2:
        difference = {**{f"delta.{key}": metrics[f"student.{key}"] - metrics[f"teacher.{key}"]
                         for _, key in TABLE2_COLUMNS},
                      **{key: value for key, value in metrics.items() if key.startswith("delta.")}}
        rows.append(("student - teacher", *(with_interval(difference, f"delta.{key}", signed=True)
                                            for _, key in TABLE2_COLUMNS)))
    if rows and "attack.null.auc_low" in metrics:
        rows.append(("null band (no leak)", "-", *null_band_cells(
            metrics, tuple(key.removeprefix("mia.") for _, key in TABLE2_COLUMNS[1:-1])), "-"))
    return rows


def render_privacy_table(metrics: dict[str, float]) -> str:
    rows = privacy_table(metrics)
    return render_table(rows, ("model", *(name for name, _ in TABLE2_COLUMNS))) if rows else ""


def write_report(cfg: TckrRun, metrics: dict[str, float], out_dir: Path, parent_run: Any) -> list[Path]:
    """Write ``metrics.json``, ``report.md`` and ``config.yaml`` into ``out_dir``; returns them and the
    figures the report shows (everything to log with it)."""
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
    ]
    if privacy_table(metrics):
        report += [
            "## Utility and privacy (the layout of TCKR's Table 2, in %)", "",
            render_privacy_table(metrics), "",
            f"LiRA ({cfg.attack.variant}, {cfg.attack.variance} variance, {cfg.attack.shadows} shadow models of the "
            "teacher's recipe) on a balanced population of private-train members and holdout non-members; "
            "AOP = accuracy x (0.5 / max(AUC_MIA, 1 - AUC_MIA))^2, its interval carried from AUC_MIA's at the fixed "
            f"accuracy. Accuracy on the real test split. Brackets: 95% intervals ({cfg.attack.bootstrap} paired "
            "bootstrap resamples of the population).", "",
            "Both attacks, pre-declared (LiRA, and RMIA with the same shadows as reference models and "
            f"{metrics.get('attack.rmia_references', 0):.0f} test images as its population samples; neither is "
            "reported as the better of the two), in %:", "",
            attack_table(metrics, TARGETS), "",
            chance_verdict(metrics, TARGETS), "",
        ]
        if any(f"{control}.mia.auc" in metrics for control in ("negative_control", "positive_control")):
            report += [CONTROLS_NOTE, ""]
    if (out_dir / "roc.png").is_file():
        report += ["![LiRA ROC, log-log](roc.png)", ""]
    report += audit_section(metrics, cfg.audit)
    report += ["## Stages", "", render_table(results_table(metrics)), ""]
    if (out_dir / "samples.png").is_file():
        report += ["## Synthetic samples", "",
                   "One row per class (first ten images of each), generated from the private captions "
                   f"(teacher agreement {metrics.get('synthetic.teacher_agreement', float('nan')):.3f}).", "",
                   "![synthetic samples per class](samples.png)", ""]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(report))
    figures = [path for path in (out_dir / "roc.png", out_dir / "samples.png", out_dir / WORST_PAIRS)
               if path.is_file()]
    return [metrics_path, report_path, config_path, *figures]
