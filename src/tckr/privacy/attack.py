"""Stage 7: the membership-inference attack on the teacher and the student.

What the shadows imitate: the *teacher's* training — its architecture and recipe on real images —
each on a random half of the population (private train members + holdout non-members). That is
exactly the teacher's situation, so for the teacher this is textbook online LiRA. For the student
the same shadows answer the question that matters for TCKR: how much does the student reveal about
the *private real* images, compared with a model that trained on them? Imitating the student
itself would mean re-running caption -> LoRA -> generation -> distillation per shadow (hundreds of
GPU-hours in the paper's setting). A student that leaked nothing would score members and non-members
alike, so its AUC lies in the null band whatever the shadows imitate. With ``variance: global`` the
statistic increases with the target's score wherever the shadows' IN scores exceed their OUT scores, so
a student whose scores rise with membership is ranked the right way round even when its confidence
scale differs from the shadows'; a student that leaks in another way (lower scores on members, or a
dependence the teacher's shadows do not show) can go unseen. An attacker who imitated the whole
pipeline could calibrate better, so the student's figures are what an attacker with real-data shadows
achieves: evidence of leakage when above the null band, not a proof of privacy when inside it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tckr.core import distributed
from tckr.core.errors import ConfigError
from tckr.data.images import BatchAugment
from tckr.privacy.config import AttackConfig
from tckr.privacy.lira import (
    AttackError,
    AttackResult,
    bootstrap_intervals,
    logit_scores,
    membership_statistic,
    null_band,
    roc,
    score_spreads,
    training_queries,
)
from tckr.privacy.rmia import label_probability, rmia_statistic
from tckr.privacy.shadows import (
    Population,
    build_population,
    is_done,
    keep_matrix,
    mismatch,
    provenance,
    query_logits,
    shadow_dir,
    train_shadow_group,
    use_vmap,
)
from tckr.training.classifier import load_classifier
from tckr.training.config import ClassifierConfig


def shadow_recipe(target: ClassifierConfig, cfg: AttackConfig) -> ClassifierConfig:
    """The target's recipe, seeded by the attack: what every shadow trains with. Refuses queries shifted further
    than the recipe's crop padding ever shifted a training image."""
    if cfg.query_shift > target.crop_padding:
        raise ConfigError(f"attack.query_shift {cfg.query_shift} exceeds the targets' crop_padding "
                          f"{target.crop_padding}: the queries would be shifts no model trained on")
    return target.model_copy(update={"seed": cfg.seed})


def load_population(cfg: AttackConfig, image_size: int, data_dir: Path):
    """The prepared splits, the attack population and the real validation split (for selection)."""
    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared

    splits, info = load_prepared(Path(data_dir))
    population = build_population(splits, image_size, info.channels, cfg.seed, cfg.rmia_references)
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
    queries = training_queries(cfg.query_shift)
    made_for = [provenance(recipe, keep, index, population, queries) for index in range(cfg.shadows)]
    all_groups = cfg.groups()
    wanted = range(len(all_groups)) if groups is None else groups
    sources = [Path(out_dir), *map(Path, done_elsewhere)]
    trained = []
    for group in wanted:
        share = all_groups[group][rank::ranks]  # all of it on a single rank
        if all(any(is_done(source, index, made_for[index]) for source in sources) for index in share):
            continue
        trained += train_shadow_group(recipe, share, keep, population, validation, info, Path(out_dir), device,
                                      use_vmap(cfg, device), queries)
    return trained


def collect_shadows(directories: list[Path], recipe: ClassifierConfig, cfg: AttackConfig,
                    population: Population) -> tuple[np.ndarray, list[dict]]:
    """Every shadow's query logits ``[M, Q, P, K]`` and summary, from whichever directory holds it made for this
    attack (:func:`tckr.privacy.shadows.provenance`); one made for something else is refused, never used."""
    keep = keep_matrix(cfg, len(population))
    found, stale = {}, {}
    for index in range(cfg.shadows):
        made_for = provenance(recipe, keep, index, population, training_queries(cfg.query_shift))
        for directory in directories:
            differs = mismatch(directory, index, made_for)
            if differs == []:
                found[index] = shadow_dir(directory, index)
                break
            if differs:
                stale.setdefault(index, (shadow_dir(directory, index), differs))
    refused = {index: why for index, why in stale.items() if index not in found}
    if refused:
        index, (path, differs) = next(iter(refused.items()))
        raise AttackError(f"{len(refused)} shadow model(s) were made for another attack (first: {path}, another "
                          f"{', '.join(differs)}): delete them, or run the shadows again for this configuration")
    missing = sorted(set(range(cfg.shadows)) - set(found))
    if missing:
        raise AttackError(f"{len(missing)} of {cfg.shadows} shadow models are missing (first: {missing[0]}): "
                          "run the attack stage again to train them")
    logits = np.stack([np.load(found[index] / "logits.npy") for index in range(cfg.shadows)])
    summaries = [json.loads((found[index] / "shadow.json").read_text()) for index in range(cfg.shadows)]
    return logits, summaries


@dataclass(frozen=True)
class AttackOutcome:
    """Each attack's figures and ROC per target (keyed ``<target>.mia`` for LiRA, ``<target>.rmia`` for RMIA), their
    bootstrap intervals (and those of the named differences), the band a target that learnt nothing would score,
    and the shadows' score spreads."""

    results: dict[str, AttackResult]
    intervals: dict[str, dict[str, tuple[float, float]]]
    null: dict[str, tuple[float, float]]
    spreads: dict[str, float]

    def lira(self) -> dict[str, AttackResult]:
        """LiRA's result per target name."""
        return {key.removesuffix(".mia"): result for key, result in self.results.items() if key.endswith(".mia")}

    def metrics(self) -> dict[str, float]:
        """``<target>.<attack>.<figure>`` with ``_ci_low``/``_ci_high``; the same for each difference;
        ``attack.null.<figure>_low``/``_high``; ``attack.sigma_in``/``_out``/``_shared``."""
        metrics: dict[str, float] = {}
        for key, result in self.results.items():
            metrics |= result.metrics(key)
        for key, figures in self.intervals.items():
            for figure, (low, high) in figures.items():
                metrics |= {f"{key}.{figure}_ci_low": low, f"{key}.{figure}_ci_high": high}
        for figure, (low, high) in self.null.items():
            metrics |= {f"attack.null.{figure}_low": low, f"attack.null.{figure}_high": high}
        return metrics | {f"attack.{name}": value for name, value in self.spreads.items()}


def attack(cfg: AttackConfig, population: Population, info, shadow_logits: np.ndarray, targets: dict[str, Path],
           out_dir: Path, device: torch.device, batch_size: int,
           differences: dict[str, tuple[str, str]] | None = None) -> AttackOutcome:
    """LiRA (the declared variant) and RMIA against each target; write ROC curves, scores and ``attack.json``.
    ``differences``: name -> (a, b), the targets whose difference ``a - b`` gets its own intervals (per attack)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = keep_matrix(cfg, len(population))
    images, labels = population.queried
    if shadow_logits.shape[0] != len(keep) or shadow_logits.shape[2] != len(images):
        raise AttackError(f"shadow logits {shadow_logits.shape} were made for another population or shadow count")
    challenge = slice(0, len(population))
    references = slice(len(population), len(images))
    shadow_scores = logit_scores(shadow_logits[:, :, challenge], population.labels.numpy())
    shadow_probabilities = label_probability(shadow_logits, labels.numpy())
    augment = BatchAugment(info.mean, info.std).to(device)
    results, statistics = {}, {}
    for name, model_dir in targets.items():
        model = load_classifier(Path(model_dir), device)
        logits = query_logits(model, augment, images, batch_size, device, training_queries(cfg.query_shift),
                              desc=f"{name} queries")
        statistics[f"{name}.mia"] = membership_statistic(
            shadow_scores, keep, logit_scores(logits[:, challenge], population.labels.numpy()), cfg.variant,
            cfg.variance)
        if len(population.references):
            probabilities = label_probability(logits, labels.numpy())
            statistics[f"{name}.rmia"] = rmia_statistic(
                shadow_probabilities[:, :, challenge], keep, probabilities[:, challenge],
                shadow_probabilities[:, :, references], probabilities[:, references], cfg.variant, cfg.rmia_gamma,
                cfg.rmia_offline_a)
    for key, statistic in statistics.items():
        results[key] = roc(statistic, population.is_member)
        with open(out_dir / f"roc-{column_name(key)}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["fpr", "tpr", "threshold"])
            writer.writerows(zip(results[key].fpr.tolist(), results[key].tpr.tolist(),
                                 results[key].thresholds.tolist(), strict=True))
    _write_scores(out_dir / "scores.csv", population, statistics)
    pairs = {f"{difference}.{method}": (f"{a}.{method}", f"{b}.{method}")
             for difference, (a, b) in (differences or {}).items() for method in ("mia", "rmia")
             if f"{a}.{method}" in statistics}
    members = int(population.is_member.sum())
    outcome = AttackOutcome(
        results, bootstrap_intervals(statistics, population.is_member, pairs, cfg.bootstrap, cfg.seed),
        null_band(members, len(population) - members, cfg.bootstrap, cfg.seed), score_spreads(shadow_scores, keep))
    plot_roc(curve_labels(results), out_dir / "roc.png")
    summary = {"variant": cfg.variant, "variance": cfg.variance, "shadows": cfg.shadows, "members": members,
               "non_members": len(population) - members, "rmia_references": len(population.references),
               "rmia_gamma": cfg.rmia_gamma, "bootstrap_resamples": cfg.bootstrap,
               "targets": {key: {k.rsplit(".", 1)[1]: v for k, v in result.metrics(key).items()}
                           for key, result in results.items()},
               "intervals_95": outcome.intervals, "null_band_95": outcome.null, "spreads": outcome.spreads}
    (out_dir / "attack.json").write_text(json.dumps(summary, indent=2) + "\n")
    return outcome


def column_name(key: str) -> str:
    """``teacher.mia`` -> ``teacher`` (LiRA, the primary attack), ``teacher.rmia`` -> ``teacher-rmia``."""
    target, method = key.rsplit(".", 1)
    return target if method == "mia" else f"{target}-{method}"


def curve_labels(results: dict[str, AttackResult], target: str | None = None) -> dict[str, AttackResult]:
    """The results to draw (all, or ``target``'s), labelled ``teacher (LiRA)``, ``teacher (RMIA)``."""
    names = {"mia": "LiRA", "rmia": "RMIA"}
    return {f"{key.rsplit('.', 1)[0]} ({names[key.rsplit('.', 1)[1]]})": result for key, result in results.items()
            if target is None or key.rsplit(".", 1)[0] == target}


def _write_scores(path: Path, population: Population, statistics: dict[str, np.ndarray]) -> None:
    """Per-example statistics: which split row, its label, its true membership, each target's score (LiRA's
    under the target's name, RMIA's under ``<target>-rmia``)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "row", "label", "member", *map(column_name, statistics)])
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
             ylabel="true positive rate", title="Membership inference (LiRA, RMIA)")
    axes.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return figure


def plot_roc(results: dict[str, AttackResult], path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure = roc_figure(results)
    figure.savefig(path)
    plt.close(figure)
    return Path(path)
