"""The demo's time against its quality bars, one setting at a time (`make tradeoff`).

Each knob is a setting of the demo profile that costs minutes; each of its values re-runs the stages it changes,
as DVC would, on the outputs of a finished ``make repro`` of the demo (``--inputs``), and reads the figure that the
knob moves. The demo's quality bars (teacher test accuracy >= 0.86, the teacher's agreement on synthetic images
>= 0.80, student / teacher accuracy >= 0.90, AUC(student) < AUC(teacher)) say where a value stops being enough.
Results go to ``bench/tradeoff.json`` and ``bench/tradeoff.png`` (time against the figure, the bar drawn), and a
table to stdout. A knob's time is the wall time of the stages it changes; what else it scales is said beside it
(the shadows and the negative control train with the teacher's recipe, the positive control with the student's).

    python bench/tradeoff.py [--inputs outputs] [--work /tmp/tckr-studies] [--only generator.steps,attack.shadows]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from stages import ROOT, Point, provenance, study_arguments

# Agreement is measured on 640 samples (minutes of generation less per point than the demo's whole set): its binomial
# standard error there is ~1.6 points, so the curve is read for its trend, and the chosen setting in a full demo.
AGREEMENT_SAMPLES = {"generate.ratio": 0.064}


@dataclass(frozen=True)
class Knob:
    key: str
    values: tuple
    stages: tuple[str, ...]  # what a changed value re-runs; the figure comes from the last
    figure: str
    bar: float
    also_scales: str = ""
    fixed: dict = field(default_factory=dict)
    # The stages whose time the knob changes (its cost); None: the first it re-runs (the rest only measure it).
    timed: tuple[str, ...] | None = None
    # The demo's own value is not re-run (minutes each): its figure is the finished demo's (``metrics/``, made with
    # the inputs), its time the straight line through the measured points (time is linear in steps and shadows).
    default_from_demo: bool = False


KNOBS = [
    Knob("teacher.epochs", (4, 8, 12), ("teacher",), "teacher.test_accuracy", 0.86,
         also_scales="the shadows and the negative control (the teacher's recipe)"),
    Knob("generator.steps", (125, 250, 500), ("generator", "finetune", "generate"),
         "synthetic.teacher_agreement", 0.80, fixed=AGREEMENT_SAMPLES),
    Knob("finetune.epochs", (1, 2), ("finetune", "generate"), "synthetic.teacher_agreement", 0.80,
         fixed=AGREEMENT_SAMPLES),
    Knob("generate.steps", (8, 12), ("generate",), "synthetic.teacher_agreement", 0.80, fixed=AGREEMENT_SAMPLES),
    Knob("student.epochs", (10, 15, 30), ("student",), "student_teacher_ratio", 0.90,
         also_scales="the positive control (the student's recipe)"),
    Knob("generate.ratio", (0.125, 0.25, 0.5), ("generate", "student"), "student_teacher_ratio", 0.90,
         timed=("generate", "student"), also_scales="the audit (it reads every synthetic image)",
         default_from_demo=True),
    Knob("attack.shadows", (2, 4, 8), ("attack",), "teacher_minus_student_auc", 0.0, default_from_demo=True),
]


def figure(knob: Knob, metrics: dict, demo: dict) -> dict:
    """The knob's figure (and its interval where the run has one); a student is compared with the demo's teacher."""
    if knob.figure == "student_teacher_ratio":
        return {"figure": metrics["student.test_accuracy"] / demo["teacher.test_accuracy"]}
    if knob.figure == "teacher_minus_student_auc":
        return {"figure": metrics["teacher.mia.auc"] - metrics["student.mia.auc"],
                "ci_low": -metrics["delta.mia.auc_ci_high"], "ci_high": -metrics["delta.mia.auc_ci_low"],
                "teacher_auc": metrics["teacher.mia.auc"], "student_auc": metrics["student.mia.auc"]}
    return {"figure": metrics[knob.figure]}


def stage_seconds(knob: Knob, run: dict, demo_images: int) -> float:
    """The wall time the knob's own stages would take in the demo: generation scaled from the measured sample
    rate to the demo's synthetic set."""
    seconds = dict(run["seconds"])
    if "generate" in seconds and knob.fixed == AGREEMENT_SAMPLES:
        rate = run["metrics"]["synthetic.images_per_second"]
        sampled = run["metrics"]["synthetic.images"]
        seconds["generate"] += (demo_images - sampled) / rate
    return sum(seconds[stage] for stage in knob.timed or knob.stages[:1])


def demo_metrics(folder: Path) -> dict:
    """The finished demo's figures: every stage's ``metrics/<stage>.json``, merged."""
    metrics = {}
    for path in sorted(folder.glob("*.json")):
        metrics.update(json.loads(path.read_text()))
    return metrics


def from_demo(knob: Knob, default, rows: list[dict], metrics: dict) -> dict:
    """The demo's own value: the finished demo's figure, the time on the line through the measured points."""
    slope, intercept = np.polyfit([row["setting"] for row in rows], [row["seconds"] for row in rows], 1)
    return {"setting": default, "demo_default": True, "source": "figure: the demo's metrics/; seconds: fitted",
            "seconds": round(float(slope * default + intercept), 1), **figure(knob, metrics, metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    study_arguments(parser, "tradeoff.json", only="comma-separated knob keys")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics",
                        help="the metrics/ of the run that made --inputs (its figures for the demo's own values)")
    args = parser.parse_args()
    profile = yaml.safe_load(args.profile.read_text())
    demo = demo_metrics(args.metrics)
    demo_images = int(round(profile["generate"]["ratio"] * demo["data.train_images"]))
    chosen = set(filter(None, args.only.split(",")))
    results = json.loads(args.out.read_text()).get("knobs", {}) if args.out.exists() else {}
    inputs, profile_path = args.inputs.resolve(), args.profile.resolve()
    run = provenance(inputs, profile_path)
    for knob in KNOBS:
        if chosen and knob.key not in chosen:
            continue
        section, name = knob.key.split(".")
        default = profile[section][name]
        rows = []
        for value in knob.values:
            if knob.default_from_demo and value == default:
                continue
            made = Point.varying(knob.key, value, knob.stages, knob.fixed).run(inputs, args.work, profile_path)
            rows.append({"setting": value, "demo_default": value == default, "source": "measured",
                         "seconds": round(stage_seconds(knob, made, demo_images), 1),
                         "stage_seconds": made["seconds"], **figure(knob, made["metrics"], demo)})
        if knob.default_from_demo:
            rows.append(from_demo(knob, default, rows, demo))
            rows.sort(key=lambda row: row["setting"])
        results[knob.key] = {"figure": knob.figure, "bar": knob.bar, "stages": list(knob.stages),
                             "also_scales": knob.also_scales, "settings": knob.fixed, "points": rows}
        run["defaults"] = {**run.get("defaults", {}), knob.key: default}
        args.out.write_text(json.dumps({"run": run, "knobs": results}, indent=2) + "\n")
    print_table(results)
    plot(results, args.out.with_suffix(".png"))


def held(knob: dict, row: dict) -> bool:
    return row["figure"] > knob["bar"] if knob["bar"] == 0 else row["figure"] >= knob["bar"]


def print_table(results: dict) -> None:
    """One row per measured value; * marks the demo profile's own."""
    print(f"| {'setting':<16} | {'value':>6} | {'seconds':>8} | {'figure':<27} | {'measured':>9} | bar    |")
    print(f"|{'-' * 18}|{'-' * 8}|{'-' * 10}|{'-' * 29}|{'-' * 11}|--------|")
    for key, knob in results.items():
        for row in knob["points"]:
            setting = f"{row['setting']}{'*' if row['demo_default'] else ''}"
            print(f"| {key:<16} | {setting:>6} | {row['seconds']:>8.1f} | {knob['figure']:<27} | "
                  f"{row['figure']:>9.4f} | {'held' if held(knob, row) else 'missed':<6} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, len(results))
    rows = -(-len(results) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(results):]:
        ax.set_visible(False)
    for ax, (key, knob) in zip(axes.flat, results.items(), strict=False):
        xs = [row["seconds"] for row in knob["points"]]
        ys = [row["figure"] for row in knob["points"]]
        ax.plot(xs, ys, "o-")
        for row in knob["points"]:
            if "ci_low" in row:
                ax.vlines(row["seconds"], row["ci_low"], row["ci_high"], color="C0", alpha=0.5)
        for x, y, row in zip(xs, ys, knob["points"], strict=True):
            label = f"{row['setting']}{'*' if row['demo_default'] else ''}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.axhline(knob["bar"], color="C3", ls="--", lw=1, label="bar")
        ax.set_title(f"{key} (* the demo's)" if any(row["demo_default"] for row in knob["points"]) else key,
                     fontsize=10)
        ax.set_xlabel("wall seconds of its stages")
        ax.set_ylabel(knob["figure"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
