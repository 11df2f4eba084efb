"""How far the attack's own randomness moves its figures: the demo's attack re-run under other seeds
(`make shadow-draws`).

``attack.seed`` draws everything random in the attack: which half of the population each shadow trains on (the
keep matrix), each shadow's own streams (initial weights, batch order, augmentations, dropout) and the bootstrap
behind the intervals. Each draw re-runs the attack stage as DVC would, on the outputs of a finished ``make repro``
(the targets stay the same models); the profile's own seed is read from that run's ``metrics/``. One draw's 95%
interval resamples the population with the shadows held fixed, so the spread across draws is uncertainty it does
not cover. Results go to ``bench/shadow_draws.json`` and a table to stdout.

    python bench/shadow_draws.py [--draws 5] [--inputs outputs] [--work /tmp/tckr-studies]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from stages import ROOT, Point, provenance, study_arguments

TARGETS = ("teacher", "student", "negative_control", "positive_control")
ATTACKS = {"mia": "LiRA", "rmia": "RMIA"}


def figures(metrics: dict) -> dict[str, dict[str, float]]:
    """Each target's AUC under each attack, and the student's minus the teacher's, with one draw's interval."""
    found = {}
    for attack in ATTACKS:
        for target in TARGETS:
            key = f"{target}.{attack}.auc"
            found[key] = {"value": metrics[key], "ci_low": metrics[f"{key}_ci_low"],
                          "ci_high": metrics[f"{key}_ci_high"]}
        found[f"delta.{attack}.auc"] = {"value": metrics[f"student.{attack}.auc"] - metrics[f"teacher.{attack}.auc"],
                                        "ci_low": metrics[f"delta.{attack}.auc_ci_low"],
                                        "ci_high": metrics[f"delta.{attack}.auc_ci_high"]}
    return found


def summarise(draws: list[dict]) -> dict[str, dict[str, float]]:
    """Per figure: the draws' mean, standard deviation (n - 1) and range, the mean width of one draw's interval,
    and how many draws' intervals hold the mean of all."""
    summary = {}
    for key in draws[0]["figures"]:
        values = np.array([draw["figures"][key]["value"] for draw in draws])
        lows = np.array([draw["figures"][key]["ci_low"] for draw in draws])
        highs = np.array([draw["figures"][key]["ci_high"] for draw in draws])
        summary[key] = {"mean": float(values.mean()), "sd": float(values.std(ddof=1)), "min": float(values.min()),
                        "max": float(values.max()), "interval_width": float((highs - lows).mean()),
                        "intervals_holding_mean": int(((lows <= values.mean()) & (values.mean() <= highs)).sum())}
    return summary


def print_table(draws: list[dict], summary: dict) -> None:
    print(f"\nthe attack's figures over {len(draws)} draws of attack.seed, AUC in %:")
    print("| figure | each draw | mean | sd | range | one draw's 95% interval, mean width | intervals holding "
          "the mean |")
    print("|---|---|---|---|---|---|---|")
    for key, row in summary.items():
        target, attack, _ = key.split(".")
        name = f"{'student - teacher' if target == 'delta' else target.replace('_', ' ')} ({ATTACKS[attack]})"
        each = ", ".join(f"{100 * draw['figures'][key]['value']:+.2f}" if target == "delta"
                         else f"{100 * draw['figures'][key]['value']:.2f}" for draw in draws)
        print(f"| {name} | {each} | {100 * row['mean']:.2f} | {100 * row['sd']:.2f} | "
              f"{100 * (row['max'] - row['min']):.2f} | {100 * row['interval_width']:.2f} | "
              f"{row['intervals_holding_mean']}/{len(draws)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    study_arguments(parser, "shadow_draws.json")
    parser.add_argument("--metrics", type=Path, default=ROOT / "metrics",
                        help="the metrics/ of the run that made --inputs (the profile's own draw)")
    parser.add_argument("--draws", type=int, default=5, help="draws in all, the profile's own included")
    args = parser.parse_args()
    seed = yaml.safe_load(args.profile.read_text())["attack"]["seed"]
    inputs, profile = args.inputs.resolve(), args.profile.resolve()
    draws = [{"seed": seed, "source": "metrics/ (the profile's own seed)",
              "figures": figures(json.loads((args.metrics / "attack.json").read_text()))}]
    for other in range(seed + 1, seed + args.draws):
        made = Point.varying("attack.seed", other, ("attack",), {}).run(inputs, args.work, profile)
        draws.append({"seed": other, "source": "measured", "seconds": made["seconds"]["attack"],
                      "figures": figures(made["metrics"])})
    summary = summarise(draws)
    args.out.write_text(json.dumps({"run": provenance(inputs, profile), "draws": draws, "summary": summary},
                                   indent=2) + "\n")
    print_table(draws, summary)


if __name__ == "__main__":
    main()
