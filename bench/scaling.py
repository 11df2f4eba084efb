"""How the demo's wall time grows with the private set, the synthetic ratio and the shadow count (`make scaling`).

Each axis re-runs the stages whose work grows along it, as DVC would (``bench/stages.py``), at three sizes, on the
outputs of a finished ``make repro`` of the demo (``--inputs``); everything else is the demo profile. The fitted
exponent of wall time against size (the slope on log-log axes) says what a bigger run costs: 1 is linear, below 1
means fixed costs (start-up, model loading, tracking) still weigh. Results go to ``bench/scaling.json`` and
``bench/scaling.png``, and a table to stdout.

    python bench/scaling.py [--inputs outputs] [--work /tmp/tckr-studies] [--only private,ratio,shadows]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from stages import Point, provenance, study_arguments


@dataclass(frozen=True)
class Axis:
    name: str
    key: str
    values: tuple
    stages: tuple[str, ...]
    size: str  # what the x axis counts, read from the point's metrics
    fixed: dict = field(default_factory=dict)
    note: str = ""
    figures: tuple[str, ...] = ()  # what else the points measured, kept beside their times


AXES = [
    # ingest.train_limit scales every split; the private (member) split is a quarter of it. Two shadows keep the
    # attack's share small (each shadow trains on the private set's size: the shadows axis has their count). The
    # teacher's figures are kept (its shadows imitate it); the student and controls come from --inputs, so theirs
    # would not mean anything.
    Axis("private", "ingest.train_limit", (10000, 20000, 40000), ("ingest", "teacher", "caption", "attack"),
         "data.train_images", fixed={"attack.shadows": 2}, figures=("teacher.test_accuracy", "teacher.mia.auc"),
         note="captioning also reads the public split, which grows with it; the attack trains 2 shadows"),
    Axis("ratio", "generate.ratio", (0.05, 0.1, 0.2), ("generate", "student"), "synthetic.images",
         figures=("student.test_accuracy",), note="the student trains its epochs over the synthetic set"),
    # The shadows train with the teacher's recipe at 3 epochs (the demo's 12 would take ~15 min at 8 shadows):
    # the axis measures how time grows with their count, which stacking (4 per group) makes stepwise.
    # No attack figures here: 3-epoch shadows do not imitate the 12-epoch targets.
    Axis("shadows", "attack.shadows", (2, 4, 8), ("attack",), "attack.shadows", fixed={"teacher.epochs": 3},
         note="shadows at 3 epochs (the demo: 12); scoring 4 targets x 2 attacks is the fixed part"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    study_arguments(parser, "scaling.json", only="comma-separated axes: private, ratio, shadows")
    args = parser.parse_args()
    chosen = set(filter(None, args.only.split(",")))
    results = json.loads(args.out.read_text()).get("axes", {}) if args.out.exists() else {}
    inputs, profile_path = args.inputs.resolve(), args.profile.resolve()
    run = provenance(inputs, profile_path)
    for axis in AXES:
        if chosen and axis.name not in chosen:
            continue
        rows = []
        for value in axis.values:
            made = Point.varying(axis.key, value, axis.stages, axis.fixed).run(inputs, args.work, profile_path)
            rows.append({"setting": value, "size": made["metrics"][axis.size], "stage_seconds": made["seconds"],
                         "seconds": round(sum(made["seconds"].values()), 1),
                         "figures": {name: made["metrics"][name] for name in axis.figures}})
        results[axis.name] = {"key": axis.key, "size": axis.size, "stages": list(axis.stages), "settings": axis.fixed,
                              "note": axis.note, "points": rows, "exponent": exponents(rows, axis.stages)}
        args.out.write_text(json.dumps({"run": run, "axes": results}, indent=2) + "\n")
    print_table(results)
    plot(results, args.out.with_suffix(".png"))


def exponents(rows: list[dict], stages: tuple[str, ...]) -> dict:
    """Least-squares slope of log(seconds) on log(size): the whole and each stage."""
    sizes = np.log([row["size"] for row in rows])
    series = {"total": [row["seconds"] for row in rows]} | {s: [row["stage_seconds"][s] for row in rows]
                                                              for s in stages}
    return {name: round(float(np.polyfit(sizes, np.log(seconds), 1)[0]), 2) for name, seconds in series.items()}


def print_table(results: dict) -> None:
    print(f"| {'axis':<8} | {'size':>7} | {'seconds':>8} | stages (s)")
    print(f"|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 60}")
    for name, axis in results.items():
        for row in axis["points"]:
            stages = ", ".join(f"{s} {t:.0f}" for s, t in row["stage_seconds"].items())
            figures = "".join(f"; {k} {v:.4f}" for k, v in row.get("figures", {}).items())
            print(f"| {name:<8} | {row['size']:>7.0f} | {row['seconds']:>8.1f} | {stages}{figures}")
        slopes = ", ".join(f"{s} {e:+.2f}" for s, e in axis["exponent"].items())
        print(f"| {name:<8} | exponent of time in size: {slopes}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, (name, axis) in zip(axes[0], results.items(), strict=True):
        sizes = [row["size"] for row in axis["points"]]
        ax.loglog(sizes, [row["seconds"] for row in axis["points"]], "o-", color="k",
                  label=f"total (slope {axis['exponent']['total']:.2f})")
        for stage in axis["stages"]:
            ax.loglog(sizes, [row["stage_seconds"][stage] for row in axis["points"]], ".--",
                      label=f"{stage} ({axis['exponent'][stage]:.2f})")
        low, high = min(sizes), max(sizes)
        ax.set_xticks(sizes, [f"{s:.0f}" for s in sizes], minor=False)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlim(low / math.sqrt(2), high * math.sqrt(2))
        ax.set_title(f"{name}: {axis['key']}", fontsize=10)
        ax.set_xlabel(axis["size"])
        ax.set_ylabel("wall seconds")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
