"""The PrivImage run report: the privacy spent and what it bought (FID, downstream accuracy, what the downstream
classifier leaks), the semantic query's selection, the stages, the samples (Markdown beside ``metrics.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tckr.recipes.privimage.config import PrivImageRun
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

STAGE_ROWS: dict[str, tuple[str, ...]] = {
    "ingest": ("data.train_images", "data.holdout_images", "data.public_images", "data.test_images"),
    "public_pool": ("pool.images", "pool.public_classes", "pool.in_domain_images"),
    "query": ("query.selected_classes", "query.selected_images", "privimage.selection_precision",
              "privimage.selection_chance"),
    "pretrain": ("pretrain.images", "pretrain.cached"),
    "finetune": ("privimage.dp_steps", "privimage.noise_multiplier", "privimage.epsilon", "finetune.final_loss"),
    "sample_shards": ("synthetic.images_per_second",),
    "sample": ("synthetic.images",),
    "audit": ("audit.closer_to_train_share", "audit.near_copy_fraction", "audit.flagged"),
    "fid": ("privimage.fid", "fid.samples"),
    "classifier": ("privimage.test_accuracy", "privimage.val_accuracy", "privimage.best_epoch"),
    "shadows": ("attack.shadows", "attack.shadow_val_accuracy"),
    "attack": ("attack.population", "attack.shadows_trained_here"),
}

HEADLINE = (("epsilon spent", "privimage.epsilon", "{:.3f}"), ("delta", "privimage.delta", "{:.2g}"),
            ("FID", "privimage.fid", "{:.2f}"), ("accuracy (%)", "privimage.test_accuracy", "{:.2%}"))
# With their 95% intervals, in %, beside the null band.
PRIVACY_HEADLINE = (("AUC_MIA (%)", "privimage.mia.auc"), ("TPR@0.1%FPR (%)", "privimage.mia.tpr_at_0.1pct_fpr"),
                    ("TPR@1%FPR (%)", "privimage.mia.tpr_at_1pct_fpr"), ("AOP (%)", "privimage.aop"))


TARGETS = {"privimage": "classifier"}  # metric prefix -> name in the tables
HEADLINE_COLUMNS = ("figure", "value [95% interval]", "null band (no leak)")


def headline(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    """``(figure, value, null band)`` rows: the privacy spent, what it bought, what the classifier leaks."""
    rows = [(name, template.format(metrics[key]).rstrip("%"), "") for name, key, template in HEADLINE
            if key in metrics]
    for name, key in PRIVACY_HEADLINE:
        if key in metrics:
            figure = key.rsplit(".", 1)[1]
            band = null_band_cells(metrics, (figure,))[0] if key.startswith("privimage.mia.") else ""
            rows.append((name, with_interval(metrics, key), band))
    return rows


def write_report(cfg: PrivImageRun, metrics: dict[str, float], out_dir: Path, parent_run: Any) -> list[Path]:
    """Write ``metrics.json``, ``report.md`` and ``config.yaml`` into ``out_dir``; returns them and the figures
    and selection the report shows (everything to log with it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(dict(sorted(metrics.items())), indent=2) + "\n")
    config_path = out_dir / "config.yaml"
    config_path.write_text(cfg.to_yaml())
    selected_on = ("a held-out synthetic split (inside the guarantee)" if cfg.downstream.selection == "synthetic"
                   else "the REAL validation split: this selection is outside the (epsilon, delta) guarantee")
    report = [
        f"# PrivImage run `{parent_run.info.run_name}`", "",
        f"profile `{cfg.profile}` · dataset `{cfg.dataset}` · image size {cfg.image_size} px · config hash "
        f"`{cfg.fingerprint()}` · MLflow run `{parent_run.info.run_id}` (experiment `{cfg.experiment_name}`)", "",
        "## Privacy spent and what it bought", "",
        render_table(headline(metrics), HEADLINE_COLUMNS), "",
        f"(epsilon, delta) is end to end: the semantic query (a Gaussian histogram, noise multiplier "
        f"{cfg.query.sigma:g}) and {metrics.get('privimage.dp_steps', 0):.0f} DP-SGD steps (noise multiplier "
        f"{metrics.get('privimage.noise_multiplier', float('nan')):.3f}, sample rate "
        f"{metrics.get('privimage.sample_rate', float('nan')):.4f}) composed in one {cfg.privacy.accountant.upper()} "
        f"accountant for a target of {cfg.privacy.target_epsilon:g}. It does not cover hyperparameter search or "
        f"the public data. FID: {metrics.get('fid.samples', 0):.0f} synthetic images against "
        f"{metrics.get('fid.real_images', 0):.0f} private train images at the pipeline resolution "
        f"(Inception in {cfg.fid.dtype}); the downstream "
        f"classifier is trained on the synthetic set only, selected on {selected_on}, and tested on the real test "
        f"split. LiRA ({cfg.attack.variant}, {cfg.attack.variance} variance, {cfg.attack.shadows} shadows of the "
        "classifier's recipe on real data) on the same member/non-member population as TCKR's targets; "
        "AOP = accuracy x (0.5 / max(AUC_MIA, 1 - AUC_MIA))^2. Intervals: "
        f"{cfg.attack.bootstrap} paired bootstrap resamples of the population.", "",
        "Both attacks, pre-declared (LiRA, and RMIA with the same shadows as reference models), in %:", "",
        attack_table(metrics, TARGETS), "",
        chance_verdict(metrics, TARGETS), "",
    ]
    if "privimage.selection_precision" in metrics:
        report += [f"Semantic query: {metrics.get('query.selected_classes', 0):.0f} public classes, "
                   f"{metrics.get('query.selected_images', 0):.0f} public images selected; semantic precision "
                   f"{metrics['privimage.selection_precision']:.3f} against {metrics['privimage.selection_chance']:.3f}"
                   " for a selection that saw nothing (selection.json lists each class's choices and noisy counts).",
                   ""]
    if (out_dir / "roc.png").is_file():
        report += ["![LiRA ROC, log-log](roc.png)", ""]
    report += audit_section(metrics, cfg.audit)
    report += ["## Stages", "", render_table(stage_rows(metrics, STAGE_ROWS)), ""]
    if (out_dir / "samples.png").is_file():
        report += ["## Synthetic samples", "", "One row per class (first ten images of each).", "",
                   "![synthetic samples per class](samples.png)", ""]
    report_path = out_dir / "report.md"
    report_path.write_text("\n".join(report))
    extras = [path for path in (out_dir / "roc.png", out_dir / "samples.png", out_dir / WORST_PAIRS,
                                out_dir / "selection.json") if path.is_file()]
    return [metrics_path, report_path, config_path, *extras]
