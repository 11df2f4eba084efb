"""What every recipe's report is made of (Markdown tables, number formatting, the per-stage wall-time table),
and the report that puts runs of both recipes side by side (``tckr report RUN_DIR...``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from tckr.core.errors import TckrError


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

    rows = []
    for name, config, metrics in runs:
        for recipe, prefix, label in COMPARED_MODELS:
            if config.get("recipe", "tckr") != recipe or f"{prefix}.test_accuracy" not in metrics:
                continue
            private = recipe == "privimage"
            fid = metrics.get("privimage.fid" if private else "synthetic.fid") if prefix != "teacher" else None
            rows.append((name, label, shown(metrics, f"{prefix}.test_accuracy", True),
                         "-" if fid is None else f"{fid:.2f}", shown(metrics, f"{prefix}.mia.auc", True),
                         shown(metrics, f"{prefix}.mia.tpr_at_1pct_fpr", True), shown(metrics, f"{prefix}.aop", True),
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
             "Accuracy, AUC_MIA, TPR and AOP in %, on the real test split and LiRA's member/non-member population. "
             "A TCKR run gives no differential-privacy guarantee (epsilon = inf); a PrivImage run's (epsilon, delta) "
             "covers its semantic query and DP-SGD, not its hyperparameter search or the public data.", "",
             render_table(comparison_rows(runs), COMPARISON_HEADER), ""]
    for (name, config, _), run_dir in zip(runs, run_dirs, strict=True):
        grid = Path(run_dir).resolve() / "samples.png"
        if grid.is_file():
            lines += [f"## {config.get('recipe', 'tckr')}: `{name}`", "", f"![samples]({grid})", ""]
    return "\n".join(lines)
