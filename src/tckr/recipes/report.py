"""What every recipe's report is made of (Markdown tables, number formatting, the per-stage wall-time table),
and the report that puts runs of both recipes side by side (``tckr report RUN_DIR...``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from tckr.core.errors import TckrError
from tckr.privacy.config import AuditConfig


def format_value(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.0f}"


def render_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = ("stage", "key metrics", "wall time")) -> str:
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([line(header), separator, *(line(row) for row in rows)])


def stage_rows(metrics: dict[str, float], stages: dict[str, tuple[str, ...]]) -> list[tuple[str, str, str]]:
    """``(stage, key metrics, wall time)`` rows, in pipeline order (``stages``: stage -> its summarising metrics)."""
    rows = []
    for stage, keys in stages.items():
        seconds = metrics.get(f"stage.{stage}.seconds")
        if seconds is None:
            continue
        shown = ", ".join(f"{key.split('.', 1)[1]}={format_value(metrics[key])}" for key in keys if key in metrics)
        rows.append((stage, shown, f"{seconds:.1f}s"))
    if "run.seconds" in metrics:
        rows.append(("total", "", f"{metrics['run.seconds']:.1f}s"))
    return rows


# ------------------------------------------------------------------------------------- privacy figures
# LiRA's figures as reports show them (header, metric under ``<role>.mia.``) and what each is by chance.
MIA_FIGURES = (("AUC_MIA", "auc"), ("TPR@0.1%FPR", "tpr_at_0.1pct_fpr"), ("TPR@1%FPR", "tpr_at_1pct_fpr"),
               ("balanced accuracy", "balanced_accuracy"))


def with_interval(metrics: dict[str, float], key: str, percent: bool = True, signed: bool = False) -> str:
    """``52.43 [51.80, 53.05]``: a figure and its 95% bootstrap interval (``<key>_ci_low``/``_ci_high``) if logged."""
    scale = 100 if percent else 1
    shown = f"{{:{'+' if signed else ''}.2f}}"
    text = shown.format(scale * metrics[key])
    if f"{key}_ci_low" in metrics:
        low, high = (shown.format(scale * metrics[f"{key}_ci_{end}"]) for end in ("low", "high"))
        text += f" [{low}, {high}]"
    return text


def null_band_cells(metrics: dict[str, float], figures: tuple[str, ...]) -> tuple[str, ...]:
    """The band a target that learnt nothing scores, per figure (in %); ``-`` where none applies."""
    return tuple(f"[{100 * metrics[f'attack.null.{f}_low']:.2f}, {100 * metrics[f'attack.null.{f}_high']:.2f}]"
                 if f"attack.null.{f}_low" in metrics else "-" for f in figures)


ATTACKS = (("mia", "LiRA"), ("rmia", "RMIA"))  # metric infix, name: LiRA the primary, RMIA always beside it


def attack_table(metrics: dict[str, float], roles: dict[str, str]) -> str:
    """Both attacks' figures for the ``roles`` (metric prefix -> name shown), in % with 95% intervals, and the
    null band; empty before the attack."""
    rows = [(f"{name} ({attack})", *(with_interval(metrics, f"{prefix}.{infix}.{figure}") for _, figure in MIA_FIGURES))
            for infix, attack in ATTACKS for prefix, name in roles.items() if f"{prefix}.{infix}.auc" in metrics]
    if not rows:
        return ""
    if "attack.null.auc_low" in metrics:
        rows.append(("null band (no leak)", *null_band_cells(metrics, tuple(figure for _, figure in MIA_FIGURES))))
    return render_table(rows, ("target (attack)", *(header for header, _ in MIA_FIGURES)))


def chance_verdict(metrics: dict[str, float], roles: dict[str, str]) -> str:
    """One sentence per report: which of the ``roles``' (prefix -> name) attack figures are indistinguishable from
    chance (the null band overlaps their 95% interval), and which are not."""
    inside, outside = [], []
    for infix, attack in ATTACKS:
        for prefix, name in roles.items():
            for header, figure in MIA_FIGURES:
                key = f"{prefix}.{infix}.{figure}"
                if f"{key}_ci_low" not in metrics or f"attack.null.{figure}_low" not in metrics:
                    continue
                overlaps = (metrics[f"{key}_ci_low"] <= metrics[f"attack.null.{figure}_high"]
                            and metrics[f"attack.null.{figure}_low"] <= metrics[f"{key}_ci_high"])
                (inside if overlaps else outside).append(f"{name} {attack} {header}")
    if not inside and not outside:
        return ""
    parts = []
    if inside:
        parts.append(f"indistinguishable from chance (the 95% interval overlaps the null band): {', '.join(inside)}")
    if outside:
        parts.append(f"above chance: {', '.join(outside)}")
    return ("Membership figures " + "; ".join(parts) + ". Intervals: paired stratified bootstrap over the "
            "population; null band: what a target whose scores ignore membership scores. A figure inside the band "
            "shows this attack found no leak, not that there is none.")


# ------------------------------------------------------------------------------------- synthetic-set audit
AUDIT_SPACES = (("audit.", "pixels (RMS difference)"), ("audit.features.", "ImageNet features (unit L2)"))
AUDIT_HEADER = ("space", "median DCR to train", "median DCR to holdout", "closer to train (%)", "p-value",
                "hub inflation", "near copies of train (%)", "near copies of holdout (%)", "p-value", "flagged")
WORST_PAIRS = "worst-pairs.png"
WORST_PAIRS_CAPTIONS = {True: "synthetic images nearest a member, the member, the nearest holdout image",
                        False: "synthetic images nearest a member (the real images are shown only with "
                               "tracking.log_real_images: true)"}


def audit_table(metrics: dict[str, float]) -> str:
    """One row per audited space; empty before the audit."""
    rows = [(space, *(f"{metrics[prefix + key]:.4f}" for key in ("dcr_train_median", "dcr_holdout_median")),
             f"{100 * metrics[prefix + 'closer_to_train_share']:.2f}", f"{metrics[prefix + 'dcr_pvalue']:.3g}",
             f"{metrics[prefix + 'hub_inflation']:.1f}",
             *(f"{100 * metrics[prefix + key]:.2f}" for key in ("near_copy_fraction", "near_copy_fraction_holdout")),
             f"{metrics[prefix + 'near_copy_pvalue']:.3g}", "yes" if metrics[prefix + "flagged"] else "no")
            for prefix, space in AUDIT_SPACES if prefix + "dcr_pvalue" in metrics]
    return render_table(rows, AUDIT_HEADER) if rows else ""


def audit_verdict(metrics: dict[str, float]) -> str:
    """What the audit shows, in one sentence, and what it does not."""
    flagged = [space for prefix, space in AUDIT_SPACES if metrics.get(prefix + "flagged")]
    if flagged:
        return (f"Flagged in {', '.join(flagged)}: the synthetic images sit nearer the generator's members than "
                "fresh images of the same distribution would.")
    return ("Not flagged: the synthetic images are as near the holdout images as the members, and near copies of "
            "members are no more frequent than of holdout images, at this sample size. That shows no copying, not "
            "the absence of every leak (the attacks measure the released models).")


def audit_section(metrics: dict[str, float], audit: AuditConfig) -> list[str]:
    """The synthetic-set audit as report lines (table, what it means, the worst pairs); empty before the audit."""
    table = audit_table(metrics)
    if not table:
        return []
    return ["## Does the synthetic set copy members? (distance to closest record)", "", table, "",
            f"Each of the {metrics['audit.synthetic_images']:.0f} synthetic images against "
            f"{metrics['audit.references']:.0f} private-train images (the members) and as many holdout images. "
            "Closer to train: the share whose nearest record (train and holdout together) is a member, 50% when the "
            "generator treats members like other images. A near copy lies closer than all but "
            f"{100 * audit.near_copy_quantile:g}% of real holdout images lie to the train set. p-values: one-sided, "
            f"from {audit.permutations} relabellings of the train and holdout images, each synthetic image keeping its "
            "nearest record, so images that crowd onto the same record count together (hub inflation: the share's "
            "variance over what independent matches would give). Flagged: either p-value below alpha / 2 = "
            f"{audit.alpha / 2:g}. "
            + audit_verdict(metrics), "",
            f"![{WORST_PAIRS_CAPTIONS[bool(metrics.get('audit.real_images_shown'))]}]({WORST_PAIRS})", ""]


# ------------------------------------------------------------------------------------- both recipes
class RunDirectoryError(TckrError, ValueError):
    """A path given to ``tckr report`` is not a finished run directory (a usage error, like a bad config)."""

    exit_code = 2


# One row per model a run produced: (recipe, the metrics' prefix, the model's name in the table).
COMPARED_MODELS = (("tckr", "teacher", "TCKR teacher (real data)"), ("tckr", "student", "TCKR student"),
                   ("privimage", "privimage", "PrivImage classifier"))
COMPARISON_HEADER = ("run", "model", "accuracy", "FID", "AUC_MIA", "TPR@1%FPR", "AOP", "epsilon", "delta",
                     "wall time")


def read_run(run_dir: Path) -> tuple[dict, dict[str, float]]:
    """A finished run's configuration and metrics."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise RunDirectoryError(f"{run_dir} is not a finished tckr run (no metrics.json and config.yaml): pass "
                                "directories under runs/, e.g. runs/latest")
    return yaml.safe_load((run_dir / "config.yaml").read_text()), json.loads((run_dir / "metrics.json").read_text())


def latest_run_of(recipe: str, beside: Path) -> Path | None:
    """The newest finished run of ``recipe`` on the same dataset as the run in ``beside``, in the same runs folder
    (run directories are named by their start time, so the newest sorts last)."""
    dataset = read_run(beside)[0].get("dataset")
    for candidate in sorted(Path(beside).resolve().parent.iterdir(), reverse=True):
        if candidate.is_symlink() or candidate == Path(beside).resolve() or not (candidate / "metrics.json").is_file():
            continue
        config, _ = read_run(candidate)
        if config.get("recipe", "tckr") == recipe and config.get("dataset") == dataset:
            return candidate
    return None


def comparison_rows(runs: list[tuple[str, dict, dict[str, float]]]) -> list[tuple[str, ...]]:
    """One row per model of each run. TCKR makes no DP claim: its epsilon is infinite, and shown so."""

    def shown(metrics: dict[str, float], key: str, percent: bool = False) -> str:
        value = metrics.get(key)
        if value is None or math.isnan(value):
            return "-"
        return f"{100 * value:.2f}" if percent else format_value(value)

    def interval(metrics: dict[str, float], key: str) -> str:
        return with_interval(metrics, key) if key in metrics else "-"

    rows = []
    for name, config, metrics in runs:
        for recipe, prefix, label in COMPARED_MODELS:
            if config.get("recipe", "tckr") != recipe or f"{prefix}.test_accuracy" not in metrics:
                continue
            private = recipe == "privimage"
            fid = metrics.get("privimage.fid" if private else "synthetic.fid") if prefix != "teacher" else None
            rows.append((name, label, shown(metrics, f"{prefix}.test_accuracy", True),
                         "-" if fid is None else f"{fid:.2f}", interval(metrics, f"{prefix}.mia.auc"),
                         interval(metrics, f"{prefix}.mia.tpr_at_1pct_fpr"), interval(metrics, f"{prefix}.aop"),
                         f"{metrics['privimage.epsilon']:.2f}" if private else "inf (no DP)",
                         f"{metrics['privimage.delta']:.2g}" if private else "-",
                         f"{metrics['run.seconds']:.0f}s" if "run.seconds" in metrics else "-"))
    return rows


def comparison_report(run_dirs: list[Path]) -> str:
    """Markdown: the runs' models side by side, then each run's sample grid."""
    runs = []
    for run_dir in run_dirs:
        config, metrics = read_run(run_dir)
        runs.append((Path(run_dir).resolve().name, config, metrics))
    lines = ["# tckr: recipes side by side", "",
             "Accuracy, AUC_MIA, TPR and AOP in %, on the real test split and LiRA's member/non-member population, "
             "with 95% bootstrap intervals in brackets (each run's null band, what a target that learnt nothing "
             "scores, follows the table). "
             "A TCKR run gives no differential-privacy guarantee (epsilon = inf); a PrivImage run's (epsilon, delta) "
             "covers its semantic query and DP-SGD, not its hyperparameter search or the public data.", "",
             render_table(comparison_rows(runs), COMPARISON_HEADER), ""]
    for name, _, metrics in runs:
        if "attack.null.auc_low" in metrics:
            auc, tpr = null_band_cells(metrics, ("auc", "tpr_at_1pct_fpr"))
            lines.append(f"- `{name}`: null band AUC_MIA {auc}, TPR@1%FPR {tpr}")
    lines.append("")
    for (name, config, _), run_dir in zip(runs, run_dirs, strict=True):
        grid = Path(run_dir).resolve() / "samples.png"
        if grid.is_file():
            lines += [f"## {config.get('recipe', 'tckr')}: `{name}`", "", f"![samples]({grid})", ""]
    return "\n".join(lines)
