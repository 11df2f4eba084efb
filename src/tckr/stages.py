"""Stage entry points: one function per pipeline stage, shared by the KFP components, ``tckr stage``
and DVC. Each opens its nested MLflow run, times itself and returns flat, dotted metrics.
"""

from __future__ import annotations

import time
from pathlib import Path

from tckr.config import TckrConfig
from tckr.tracking import stage_run

Metrics = dict[str, float]


def ingest_stage(cfg: TckrConfig, seed: int, out_dir: Path, parent_run_id: str | None, tracking_uri: str) -> Metrics:
    """Prepare the private dataset (splits, statistics, fingerprint) into ``out_dir``."""
    import mlflow
    from tckr.ingest import prepare

    ingest_cfg = cfg.ingest.model_copy(update={"seed": seed})
    with stage_run("ingest", cfg, parent_run_id, tracking_uri, params=ingest_cfg.model_dump(mode="json")):
        started = time.perf_counter()
        info = prepare(ingest_cfg, Path(out_dir), cfg.dataset, min_train_images=cfg.teacher.batch_size)
        metrics = {f"data.{name}_images": float(split.count) for name, split in info.splits.items()}
        metrics |= {"data.num_classes": float(info.num_classes),
                    "stage.ingest.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "dataset.json"))
        mlflow.set_tag("tckr.dataset_fingerprint", info.fingerprint)
    return metrics


def teacher_stage(cfg: TckrConfig, seed: int, data_dir: Path, out_dir: Path, parent_run_id: str | None,
                  tracking_uri: str) -> Metrics:
    """Train the teacher on the private train split; register it as ``tckr-<dataset>-teacher``."""
    import torch

    import mlflow
    from tckr.classify import resolve_device, train_classifier
    from tckr.ingest import load_prepared

    teacher_cfg = cfg.teacher.model_copy(update={"seed": seed})
    with stage_run("teacher", cfg, parent_run_id, tracking_uri,
                   params=teacher_cfg.model_dump(mode="json") | {"image_size": cfg.image_size}):
        started = time.perf_counter()
        if cfg.runtime.torch_threads:
            torch.set_num_threads(cfg.runtime.torch_threads)
        device = resolve_device(cfg.runtime.device)
        splits, info = load_prepared(Path(data_dir))
        result = train_classifier(
            teacher_cfg, splits, info, cfg.image_size, Path(out_dir), device, name="teacher",
            on_epoch=lambda record: mlflow.log_metrics(
                {k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"]))
        metrics = {"teacher.test_accuracy": result.test_accuracy,
                   "teacher.val_accuracy": result.val_accuracy,
                   "teacher.best_epoch": float(result.best_epoch),
                   "teacher.images_per_second": result.images_per_second,
                   "stage.teacher.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "model.json"))
        if cfg.tracking.register_models:
            _register_classifier(Path(out_dir), splits, info, cfg, "teacher", metrics)
    return metrics


def _register_classifier(model_dir: Path, splits, info, cfg: TckrConfig, role: str, metrics: Metrics) -> None:
    """Register ``tckr-<dataset>-<role>``: takes float images in [0, 1], returns logits."""
    import torch

    from tckr.classify import ImageSplit, load_classifier
    from tckr.models import NormalizedClassifier
    from tckr.tracking import log_classifier

    model = NormalizedClassifier(load_classifier(model_dir), info.mean, info.std).eval()
    test = ImageSplit(splits["test"], cfg.image_size, info.channels)
    example = torch.stack([test[0][0], test[1][0]]).float().div(255).numpy()  # batch >= 2 for pt2
    tags = {"dataset": cfg.dataset, "profile": cfg.profile, "config_hash": cfg.fingerprint(),
            "dataset_fingerprint": info.fingerprint, "classes": ",".join(info.classes),
            "input": f"float32 [N, {info.channels}, {cfg.image_size}, {cfg.image_size}] in [0, 1]"}
    tags |= {key.split(".", 1)[1]: f"{value:.4f}" for key, value in metrics.items() if key.startswith(f"{role}.")}
    log_classifier(model, f"tckr-{cfg.dataset}-{role}", example, tags=tags)


def report_stage(cfg: TckrConfig, stage_metrics: list[Metrics], out_dir: Path, parent_run_id: str,
                 tracking_uri: str) -> Metrics:
    """Merge the stages' metrics, write ``metrics.json`` + ``report.md`` and close the parent run."""
    import mlflow
    from tckr.report import write_report
    from tckr.tracking import configure, finish_pipeline_run

    configure(tracking_uri)
    parent = mlflow.get_run(parent_run_id)
    metrics: Metrics = {}
    for part in stage_metrics:
        metrics.update(part)
    metrics["run.seconds"] = time.time() - parent.info.start_time / 1000.0
    paths = write_report(cfg, metrics, Path(out_dir), parent)
    client = mlflow.MlflowClient()
    client.log_batch(parent_run_id, metrics=[mlflow.entities.Metric(k, float(v), int(time.time() * 1000), 0)
                                             for k, v in metrics.items()])
    for path in paths:
        client.log_artifact(parent_run_id, str(path))
    finish_pipeline_run(parent_run_id)
    return metrics
