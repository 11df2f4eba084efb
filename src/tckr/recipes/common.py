"""What every recipe's stages share: the pipeline's bookkeeping (the parent MLflow run, its closing report), the
private dataset's ingest, the LiRA shadow fan-out, registering a classifier with what it leaks, and the small
logging helpers. A recipe declares these in its own registry (:func:`declare_shared`), so its pipeline, DVC
stages and components treat them like its own."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tckr.core.config import RuntimeConfig
from tckr.core.stage import ALL_SECTIONS, DATASET, PipelineStatus, StageRegistry, resources
from tckr.data.ingest import IngestConfig
from tckr.platform.tracking import Tracking
from tckr.privacy.config import AttackConfig

Metrics = dict[str, float]


def start_run(*, config: Any, run_name: str, tracking: Tracking) -> None:
    """Open the pipeline's parent MLflow run (config logged as params and config.yaml), tagged with the KFP
    run id by which every later task finds it: no task takes the parent's id, so cache keys stay stable."""
    from tckr.platform.tracking import start_pipeline_run

    tags = {"tckr.recipe": config.recipe, "tckr.profile": config.profile, "tckr.dataset": config.dataset,
            "tckr.config_hash": config.fingerprint()}
    start_pipeline_run(tracking, run_name, tags, params=config.model_dump(mode="json"), config_yaml=config.to_yaml())


def finish_run(*, status: PipelineStatus, tracking: Tracking) -> None:
    """The pipeline's exit handler, run however its tasks ended: after a failure the MLflow parent run is marked
    FAILED, with the error, instead of staying RUNNING forever (a successful run was closed by its report)."""
    from tckr.platform.tracking import close_failed_pipeline_run

    if status.state != "SUCCEEDED":
        close_failed_pipeline_run(tracking, status.state, status.error)


def ingest(*, dataset: str, ingest: IngestConfig, data: Path) -> Metrics:
    """Load, validate and split the private dataset (splits, statistics, fingerprint)."""
    import mlflow

    from tckr.data.ingest import prepare

    info = prepare(ingest, data, dataset)
    log_private_splits(info, data, {split: "ingested" for split in info.splits})
    mlflow.log_artifact(str(data / "dataset.json"))
    mlflow.set_tag("tckr.dataset_fingerprint", info.fingerprint)
    if info.warnings:  # also in dataset.json, and on stderr as they were found
        mlflow.set_tag("tckr.data_warnings", " | ".join(info.warnings)[:5000])
    return {f"data.{name}_images": float(split.count) for name, split in info.splits.items()} | {
        "data.num_classes": float(info.num_classes), "data.warnings": float(len(info.warnings))}


def shadow_plan(*, attack: AttackConfig) -> list[int]:
    """The shadow-model groups, for the ParallelFor fan-out."""
    return list(range(len(attack.groups())))


def shadows_in_group(arguments: dict[str, Any]) -> int:
    """A shadow-group task's independent items: its shadow models (``parallel_items`` of the shadow stages)."""
    return len(arguments["attack"].groups()[int(arguments["group"])])


def sampling_batches(section: str) -> Callable[[dict[str, Any]], int]:
    """A generation task's independent items: the sampler batches of a shard of ``section`` (a generation
    config; ``parallel_items`` of the sampling stages)."""
    return lambda arguments: math.ceil(arguments[section].shard_size / arguments[section].batch_size)


SHARED_STAGES: dict[str, tuple[Callable, dict[str, Any]]] = {
    "start_run": (start_run, {"sections": (ALL_SECTIONS,), "params": {"run_name": str}, "returns": "nothing",
                              "own_run": False, "cache": False, "resources": resources("250m", "1", "1Gi", "2Gi")}),
    "finish_run": (finish_run, {"sections": (), "params": {"status": PipelineStatus}, "returns": "nothing",
                                "own_run": False, "cache": False, "resources": resources("250m", "1", "1Gi", "2Gi")}),
    "ingest": (ingest, {"sections": ("dataset", "ingest"), "outputs": {"data": DATASET},
                        "resources": resources("4", "8", "16Gi", "32Gi", scratch="20Gi")}),  # a hub dataset's download
    "shadow_plan": (shadow_plan, {"sections": ("attack",), "returns": "fan-out", "tracked": False,
                                  "resources": resources("250m", "1", "1Gi", "2Gi")}),
}
"""The stages every recipe shares, with their declarations."""


def declare_shared(registry: StageRegistry, *names: str) -> None:
    """Declare shared stages in a recipe's registry, at this point of its order."""
    for name in names:
        function, declaration = SHARED_STAGES[name]
        registry.declare(**declaration)(function)


# ------------------------------------------------------------------------------------------------ helpers
def run_device(runtime: RuntimeConfig):
    """The stage's torch device (torch imported only when a stage runs, not when stages are declared)."""
    from tckr.core.device import stage_device

    return stage_device(runtime)


def log_every(step: int, every: int, values: dict[str, float]) -> None:
    import mlflow

    if step % every == 0:
        mlflow.log_metrics(values, step=step)


def log_epoch(record: dict) -> None:
    import mlflow

    mlflow.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"])


def log_private_splits(info, data: Path, contexts: dict[str, str]) -> None:
    """The prepared splits a stage read (split -> what for: "training", "validation", ...) as MLflow datasets,
    each named ``<dataset>/<split>`` with its own content fingerprint (``dataset.json``)."""
    from tckr.platform.tracking import log_dataset

    for split, context in contexts.items():
        log_dataset(f"{info.name}/{split}", info.split_fingerprints[split], str(data), context,
                    info.splits[split].count)


def training_metrics(role: str, result) -> Metrics:
    """A trained classifier's figures (:class:`~tckr.training.classifier.TrainResult`) under ``<role>.``, and the
    precision it trained in as an MLflow tag."""
    import mlflow

    mlflow.set_tag(f"{role}.precision", result.precision)
    return {f"{role}.test_accuracy": result.test_accuracy, f"{role}.val_accuracy": result.val_accuracy,
            f"{role}.best_epoch": float(result.best_epoch), f"{role}.images_per_second": result.images_per_second}


def classifier_metrics(role: str, result, model_dir: Path, info, image_size: int) -> Metrics:
    """:func:`training_metrics`, and the classifier's logged model (served form: float images in [0, 1] -> logits)
    whose URI goes to ``model_dir/logged_model.json`` for the register stage."""
    import mlflow
    import numpy as np

    from tckr.platform.tracking import log_classifier
    from tckr.training.classifier import load_classifier
    from tckr.training.models import NormalizedClassifier

    mlflow.log_artifact(str(model_dir / "model.json"))
    model = NormalizedClassifier(load_classifier(model_dir), info.mean, info.std).eval()
    # The input's shape and range, not a real image: every split is the user's private data, and MLflow keeps the
    # example beside the model for anyone who can open it. Batch >= 2 for pt2.
    example = np.full((2, info.channels, image_size, image_size), 0.5, np.float32)
    (model_dir / "logged_model.json").write_text(json.dumps({"model_uri": log_classifier(model, example)}))
    return training_metrics(role, result)


def log_shadow_runs(summaries: list[dict]) -> None:
    """One finished run per shadow, nested under the attack's: its half of the population, selection and fit (once:
    an attack task that is run again after a kill finds the shadows it logged)."""
    import mlflow
    from mlflow.entities import Metric, Param

    attack_run = mlflow.active_run().info
    experiment_id, attack_run_id = attack_run.experiment_id, attack_run.run_id
    client = mlflow.MlflowClient()
    logged = {run.info.run_name for run in client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{attack_run_id}'")}
    now = int(time.time() * 1000)
    for summary in summaries:
        if f"shadow-{summary['index']:03d}" in logged:
            continue
        run = client.create_run(experiment_id, run_name=f"shadow-{summary['index']:03d}",
                                tags={"mlflow.parentRunId": attack_run_id, "tckr.stage": "shadow"})
        history = [Metric("val_accuracy", r["val_accuracy"], now, r["epoch"]) for r in summary["history"]]
        final = [Metric(key, float(summary[key]), now, 0) for key in ("in_accuracy", "out_accuracy")]
        client.log_batch(run.info.run_id, metrics=history + final,
                         params=[Param("index", str(summary["index"])), Param("members", str(summary["members"])),
                                 Param("best_epoch", str(summary["best_epoch"]))])
        client.set_terminated(run.info.run_id)


def log_roc_figures(results: dict, targets: dict[str, Path]) -> None:
    """The ROC of every target and attack in the attack's run, and each logged model's own curves in the run that
    logged it, so the page a user reaches from the registry shows what the model leaks (the controls are never
    released, so they log no model)."""
    import matplotlib.pyplot as plt
    import mlflow

    from tckr.platform.tracking import log_figure_to_model_run
    from tckr.privacy.attack import curve_labels, roc_figure

    figures = {"roc.png": roc_figure(curve_labels(results))}
    mlflow.log_figure(figures["roc.png"], "roc.png")
    for name, model_dir in targets.items():
        if not (model_dir / "logged_model.json").is_file():
            continue
        figures[name] = roc_figure(curve_labels(results, name))
        model_uri = json.loads((model_dir / "logged_model.json").read_text())["model_uri"]
        log_figure_to_model_run(model_uri, figures[name], "mia/roc.png")
    for figure in figures.values():
        plt.close(figure)


def run_attack(image_size: int, recipe, attack: AttackConfig, runtime: RuntimeConfig, data: Path,
               targets: dict[str, Path], shadows: list[Path], results: Path, eval_batch_size: int,
               differences: dict[str, tuple[str, str]] | None = None) -> Metrics:
    """LiRA and RMIA against ``targets`` (and intervals for the ``differences`` between them): the fan-out's shadows
    (of ``recipe``) are used, missing ones trained here; each shadow becomes a nested MLflow run under the
    attack's."""
    import mlflow

    from tckr.privacy.attack import attack as membership_inference
    from tckr.privacy.attack import collect_shadows, load_population, shadow_recipe, train_shadows

    on = run_device(runtime)
    shadows_here = results / "shadows"
    population, validation, info = load_population(attack, image_size, data)
    trained_here = train_shadows(shadow_recipe(recipe, attack), attack, population, validation, info, shadows_here,
                                 on, done_elsewhere=shadows)
    logits, summaries = collect_shadows([shadows_here, *shadows], shadow_recipe(recipe, attack), attack, population)
    outcome = membership_inference(attack, population, info, logits, targets, results, on, eval_batch_size, differences)
    log_shadow_runs(summaries)
    for name in ("attack.json", "scores.csv", *(path.name for path in sorted(results.glob("roc-*.csv")))):
        mlflow.log_artifact(str(results / name))
    log_roc_figures(outcome.results, targets)
    return outcome.metrics() | {
        "attack.shadows": float(len(summaries)), "attack.shadows_trained_here": float(len(trained_here)),
        "attack.shadow_val_accuracy": sum(s["val_accuracy"] for s in summaries) / len(summaries),
        "attack.population": float(len(population)), "attack.rmia_references": float(len(population.references)),
        "stage.shadows.seconds": sum(s["seconds"] for s in summaries)}


def aop_metrics(role: str, metrics: Metrics) -> Metrics:
    """``<role>.aop`` from its test accuracy and AUC, with the interval its AUC's bootstrap interval gives."""
    from tckr.privacy.lira import aop, aop_interval

    accuracy = metrics[f"{role}.test_accuracy"]
    low, high = aop_interval(accuracy, (metrics[f"{role}.mia.auc_ci_low"], metrics[f"{role}.mia.auc_ci_high"]))
    return {f"{role}.aop": aop(accuracy, metrics[f"{role}.mia.auc"]), f"{role}.aop_ci_low": low,
            f"{role}.aop_ci_high": high}


def register_classifier(config: Any, role: str, model_dir: Path, metrics: Metrics, extra_tags: dict[str, str],
                        champion_metric: str | None, measured_as: str | None = None) -> Metrics:
    """Register ``role``'s logged classifier with what it is worth and what it leaks (``metrics`` under
    ``<measured_as or role>.``). With ``champion_metric`` it becomes ``champion`` only if it beats the current
    champion on that metric (``candidate`` either way). Returns ``<role>.registry_version`` (and ``.champion``).
    A model this task registered before (its pod retried, its run resumed) keeps that version: never two."""
    from tckr.platform.tracking import champion_score, register_model, registered_version

    name = config.registered_model_name(role)
    uri = json.loads((model_dir / "logged_model.json").read_text())["model_uri"]
    earlier = registered_version(uri, name)
    if earlier is not None:
        return {f"{role}.registry_version": float(earlier.version)} | (
            {f"{role}.champion": float("champion" in earlier.aliases)} if champion_metric is not None else {})
    key = measured_as or role
    card = json.loads((model_dir / "model.json").read_text())
    tags = {"recipe": config.recipe, "dataset": config.dataset, "profile": config.profile,
            "config_hash": config.fingerprint(), "dataset_fingerprint": card["dataset_fingerprint"],
            "classes": ",".join(card["classes"]),
            "input": f"float32 [N, {card['in_chans']}, {config.image_size}, {config.image_size}] in [0, 1]",
            "accuracy": f"{metrics[f'{key}.test_accuracy']:.4f}", "auc_mia": f"{metrics[f'{key}.mia.auc']:.4f}",
            "tpr_at_1pct_fpr": f"{metrics[f'{key}.mia.tpr_at_1pct_fpr']:.4f}",
            "aop": f"{metrics[f'{key}.aop']:.4f}"} | extra_tags
    registered: Metrics = {}
    aliases: tuple[str, ...] = ()
    if champion_metric is not None:
        current = champion_score(name, champion_metric)
        promoted = current is None or metrics[f"{key}.{champion_metric}"] > current
        registered[f"{role}.champion"] = float(promoted)
        aliases = ("candidate", "champion") if promoted else ("candidate",)
    description = (f"The {role} of the {config.recipe} recipe on {config.dataset} (profile {config.profile}; dataset "
                   f"fingerprint {card['dataset_fingerprint']}; input {tags['input']}): test accuracy "
                   f"{tags['accuracy']}, LiRA AUC {tags['auc_mia']} (0.5 is chance), TPR at 1% FPR "
                   f"{tags['tpr_at_1pct_fpr']}, AOP {tags['aop']}. The attack's ROC is in its run, mia/roc.png.")
    registered[f"{role}.registry_version"] = float(register_model(uri, name, tags, aliases, description))
    return registered


def publish_report(report_files: Path, summary: Path, page: Path, roc: Path, roc_csv: Path, points: int = 200) -> None:
    """The report's declared outputs beside ``report_files`` (report.md, metrics, figures): the Markdown summary, a
    self-contained HTML page (figures inline, so the KFP UI shows it whole) and the released model's ROC curve,
    thinned to at most ``points`` points, for the UI's ROC view."""
    import base64
    import csv
    import re
    import shutil

    from markdown_it import MarkdownIt

    from tckr.core.atomic import write_text

    markdown = (report_files / "report.md").read_text()
    shutil.copyfile(report_files / "report.md", summary)

    def inline(match: re.Match) -> str:
        figure = report_files / match.group(1)
        if not figure.is_file():
            return match.group(0)
        return f'src="data:image/png;base64,{base64.b64encode(figure.read_bytes()).decode()}"'

    body = re.sub(r'src="([^"/]+\.png)"', inline, MarkdownIt("commonmark").enable("table").render(markdown))
    write_text(page, "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>tckr report</title><style>"
                     "body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
                     "td,th{border:1px solid #ccc;padding:.2em .6em}img{max-width:100%}</style></head>\n"
                     f"<body>\n{body}</body></html>\n")
    with open(roc_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if math.isfinite(float(row["threshold"]))]
    keep = sorted({round(i * (len(rows) - 1) / max(1, points - 1)) for i in range(min(points, len(rows)))})
    write_text(roc, json.dumps({key: [float(rows[i][column]) for i in keep] for key, column in
                                (("fpr", "fpr"), ("tpr", "tpr"), ("thresholds", "threshold"))}) + "\n")


def close_pipeline_run(tracking: Tracking, parts: Iterable[Metrics], out_dir: Path,
                       write_report: Callable[[Metrics, Path, Any], list[Path]]) -> Metrics:
    """Merge the stages' metrics, add the run's wall time, write the report (``write_report(metrics, out_dir,
    parent run)`` returns the files it wrote), log all of it to the parent run and close that run."""
    import mlflow

    from tckr.platform.tracking import TrackingError, configure, finish_pipeline_run, pipeline_run_id

    configure(tracking.uri)
    parent_run_id = pipeline_run_id(tracking.experiment)
    if parent_run_id is None:
        raise TrackingError("the report closes the pipeline's parent run, and this process is not in a pipeline run")
    parent = mlflow.get_run(parent_run_id)
    metrics: Metrics = {}
    for part in parts:
        metrics.update(part)
    metrics["run.seconds"] = time.time() - parent.info.start_time / 1000.0
    paths = write_report(metrics, out_dir, parent)
    client = mlflow.MlflowClient()
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                             for k, v in metrics.items()])
    for path in paths:
        client.log_artifact(parent_run_id, str(path))
    finish_pipeline_run(parent_run_id)
    return metrics
