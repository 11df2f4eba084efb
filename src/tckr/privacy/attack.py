"""Stage 7: the membership-inference attack on the teacher and the student.

What the shadows imitate: the *teacher's* training — its architecture and recipe on real images —
each on a random half of the population (private train members + holdout non-members). That is
exactly the teacher's situation, so for the teacher this is textbook online LiRA. For the student
the same shadows answer the question that matters for TCKR: how much does the student reveal about
the *private real* images, compared with a model that trained on them? Imitating the student
itself would mean re-running caption -> LoRA -> generation -> distillation per shadow (hundreds of
GPU-hours in the paper's setting). A student that leaked nothing
would score members and non-members alike, so the statistic gives AUC 0.5 whatever the shadows
imitate, and any dependence of its scores on membership lifts the AUC above 0.5. An attacker who
imitated the whole pipeline could calibrate better, so the student's figures are what an attacker
with real-data shadows achieves: evidence of leakage when high, not a proof of privacy when low.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from tckr.core import distributed
from tckr.data.images import BatchAugment
from tckr.privacy.config import AttackConfig
from tckr.privacy.lira import AttackError, AttackResult, logit_scores, membership_statistic, roc
from tckr.privacy.shadows import (
    Population,
    build_population,
    is_done,
    keep_matrix,
    query_logits,
    shadow_dir,
    shadow_groups,
    train_shadow_group,
    use_vmap,
)
from tckr.training.classifier import load_classifier
from tckr.training.config import ClassifierConfig


def shadow_recipe(target: ClassifierConfig, cfg: AttackConfig) -> ClassifierConfig:
    """The target's recipe, seeded by the attack: what every shadow trains with."""
    return target.model_copy(update={"seed": cfg.seed})


def load_population(cfg: AttackConfig, image_size: int, data_dir: Path):
    """The prepared splits, the attack population and the real validation split (for selection)."""
    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared

    splits, info = load_prepared(Path(data_dir))
    population = build_population(splits, image_size, info.channels, cfg.seed)
    validation = (decode_split(splits["validation"], image_size, info.channels),
                  torch.as_tensor(np.asarray(splits["validation"]["label"])).long())
    return population, validation, info


def train_shadows(recipe: ClassifierConfig, cfg: AttackConfig, population: Population,
                  validation: tuple[torch.Tensor, torch.Tensor], info,
                  out_dir: Path, device: torch.device, groups: list[int] | None = None,
                  done_elsewhere: list[Path] = ()) -> list[int]:
    """Train the given shadow groups (default: every group with a shadow not found in ``out_dir`` or
    ``done_elsewhere``) into ``out_dir``; returns the shadows trained now.

    On several ranks (:mod:`tckr.core.distributed`) rank ``r`` of ``n`` trains shadows ``r, r + n, ...`` of each
    group as its own smaller stack; every shadow keeps its own seeds, and its outputs are its own files."""
    rank, ranks = distributed.rank(), distributed.world_size()
    keep = keep_matrix(cfg, len(population))
    all_groups = shadow_groups(cfg)
    wanted = range(len(all_groups)) if groups is None else groups
    sources = [Path(out_dir), *map(Path, done_elsewhere)]
    trained = []
    for group in wanted:
        share = all_groups[group][rank::ranks]  # all of it on a single rank
        if all(any(is_done(source, index) for source in sources) for index in share):
            continue
        trained += train_shadow_group(recipe, share, keep, population, validation, info, Path(out_dir), device,
                                      use_vmap(cfg, device))
    return trained


def collect_shadows(directories: list[Path], count: int) -> tuple[np.ndarray, list[dict]]:
    """Every shadow's query logits ``[M, Q, P, K]`` and summary, from whichever directory holds it."""
    found = {}
    for directory in directories:
        for index in range(count):
            if index not in found and is_done(directory, index):
                found[index] = shadow_dir(directory, index)
    missing = sorted(set(range(count)) - set(found))
    if missing:
        raise AttackError(f"{len(missing)} of {count} shadow models are missing (first: {missing[0]}): "
                          "run the attack stage again to train them")
    logits = np.stack([np.load(found[index] / "logits.npy") for index in range(count)])
    summaries = [json.loads((found[index] / "shadow.json").read_text()) for index in range(count)]
    return logits, summaries


def attack(cfg: AttackConfig, population: Population, info, shadow_logits: np.ndarray, targets: dict[str, Path],
           out_dir: Path, device: torch.device, batch_size: int) -> dict[str, AttackResult]:
    """Run the declared LiRA variant against each target; write ROC curves, scores and ``attack.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = keep_matrix(cfg, len(population))
    if shadow_logits.shape[0] != len(keep) or shadow_logits.shape[2] != len(population):
        raise AttackError(f"shadow logits {shadow_logits.shape} were made for another population or shadow count")
    shadow_scores = logit_scores(shadow_logits, population.labels.numpy())
    augment = BatchAugment(info.mean, info.std).to(device)
    results, statistics = {}, {}
    for name, model_dir in targets.items():
        model = load_classifier(Path(model_dir), device)
        logits = query_logits(model, augment, population.images, batch_size, device,
                              desc=f"{name} queries")
        statistic = membership_statistic(shadow_scores, keep, logit_scores(logits, population.labels.numpy()),
                                         cfg.variant, cfg.variance)
        results[name], statistics[name] = roc(statistic, population.is_member), statistic
        with open(out_dir / f"roc-{name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["fpr", "tpr", "threshold"])
            writer.writerows(zip(results[name].fpr.tolist(), results[name].tpr.tolist(),
                                 results[name].thresholds.tolist(), strict=True))
    _write_scores(out_dir / "scores.csv", population, statistics)
    plot_roc(results, out_dir / "roc.png")
    summary = {"variant": cfg.variant, "variance": cfg.variance, "shadows": cfg.shadows,
               "members": int(population.is_member.sum()), "non_members": int((~population.is_member).sum()),
               "targets": {name: {k.split(".", 1)[1]: v for k, v in result.metrics(name).items()}
                           for name, result in results.items()}}
    (out_dir / "attack.json").write_text(json.dumps(summary, indent=2) + "\n")
    return results


def _write_scores(path: Path, population: Population, statistics: dict[str, np.ndarray]) -> None:
    """Per-example statistics: which split row, its label, its true membership, each target's score."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "row", "label", "member", *statistics])
        for i in range(len(population)):
            member = bool(population.is_member[i])
            writer.writerow(["train" if member else "holdout", int(population.split_rows[i]),
                             int(population.labels[i]), int(member),
                             *(f"{statistic[i]:.6g}" for statistic in statistics.values())])


def roc_figure(results: dict[str, AttackResult]):
    """Log-log ROC (where LiRA's low-FPR regime is visible), one curve per target, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4.5, 4.5), dpi=120)
    floor = 1e-5
    for name, result in results.items():
        axes.plot(np.maximum(result.fpr, floor), np.maximum(result.tpr, floor),
                  label=f"{name} (AUC {result.auc:.3f}, TPR@1% {result.tpr_at_1_fpr:.3f})")
    axes.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    axes.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1), xlabel="false positive rate",
             ylabel="true positive rate", title="LiRA membership inference")
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return figure


def plot_roc(results: dict[str, AttackResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = roc_figure(results)
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
