"""Stage entry points: one function per pipeline stage, shared by the KFP components, ``tckr stage``
and DVC. Each opens its nested MLflow run, times itself and returns flat, dotted metrics.

The stages that divide their work across GPUs (``config.MULTI_GPU_STAGES``) run in every rank of a
multi-process launch (:mod:`tckr.distributed`); rank 0 alone tracks, writes the outputs that exist once
and returns metrics, the other ranks return ``{}`` once their share is done.
"""

from __future__ import annotations

import time
from pathlib import Path

from tckr import distributed
from tckr.config import GeneratorConfig, TckrConfig
from tckr.tracking import stage_run

Metrics = dict[str, float]


def ingest_stage(cfg: TckrConfig, seed: int, out_dir: Path, tracking_uri: str) -> Metrics:
    """Prepare the private dataset (splits, statistics, fingerprint) into ``out_dir``."""
    import mlflow

    from tckr.ingest import prepare

    ingest_cfg = cfg.ingest.model_copy(update={"seed": seed})
    with stage_run("ingest", cfg, tracking_uri, params=ingest_cfg.model_dump(mode="json")):
        started = time.perf_counter()
        info = prepare(ingest_cfg, Path(out_dir), cfg.dataset, min_train_images=cfg.teacher.batch_size)
        metrics = {f"data.{name}_images": float(split.count) for name, split in info.splits.items()}
        metrics |= {"data.num_classes": float(info.num_classes),
                    "stage.ingest.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "dataset.json"))
        mlflow.set_tag("tckr.dataset_fingerprint", info.fingerprint)
    return metrics


def teacher_stage(cfg: TckrConfig, seed: int, data_dir: Path, out_dir: Path, tracking_uri: str) -> Metrics:
    """Train the teacher on the private train split and log it (registered after the attack)."""
    import mlflow

    from tckr.classify import train_classifier
    from tckr.ingest import load_prepared

    teacher_cfg = cfg.teacher.model_copy(update={"seed": seed})
    params = teacher_cfg.model_dump(mode="json") | {"image_size": cfg.image_size}
    with stage_run("teacher", cfg, tracking_uri, params=params):
        started = time.perf_counter()
        device = _device(cfg)
        splits, info = load_prepared(Path(data_dir))
        result = train_classifier(
            teacher_cfg, splits, info, cfg.image_size, Path(out_dir), device, name="teacher",
            on_epoch=lambda record: mlflow.log_metrics(
                {k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"]))
        if result is None:  # not the lead rank
            return {}
        metrics = {"teacher.test_accuracy": result.test_accuracy,
                   "teacher.val_accuracy": result.val_accuracy,
                   "teacher.best_epoch": float(result.best_epoch),
                   "teacher.images_per_second": result.images_per_second,
                   "stage.teacher.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "model.json"))
        _log_classifier(Path(out_dir), splits, info, cfg)
    return metrics


def caption_stage(cfg: TckrConfig, data_dir: Path, out_dir: Path, tracking_uri: str) -> Metrics:
    """Caption the private train split (and the public split) into ``out_dir/<split>/``."""
    import mlflow

    from tckr.caption import caption_dataset

    with stage_run("caption", cfg, tracking_uri, params=cfg.caption.model_dump(mode="json")):
        started = time.perf_counter()
        summary = caption_dataset(cfg.caption, Path(data_dir), Path(out_dir), _device(cfg))
        metrics: Metrics = {}
        for split, part in summary["splits"].items():
            metrics |= {f"caption.{split}_images": float(part["images"]),
                        f"caption.{split}_distinct": float(part["distinct_captions"]),
                        f"caption.{split}_empty": float(part["empty_captions"])}
        metrics["stage.caption.seconds"] = time.perf_counter() - started
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "captions.json"))
        mlflow.log_artifact(str(Path(out_dir) / "train" / "captions_by_class.json"))
    return metrics


def generator_stage(cfg: TckrConfig, seed: int, data_dir: Path, captions_dir: Path, out_dir: Path,
                    tracking_uri: str) -> Metrics:
    """The base generator. Pixel: reused from the cache when one with the same key exists, else
    pretrained on the public split (never on private data) and cached. Stable Diffusion: nothing to
    pretrain (SD2 was pretrained on public data); the pipeline is loaded once to check it is reachable
    and matches the configuration, and a card naming it is written for the later stages."""
    import mlflow

    from tckr import stable_diffusion

    generator_cfg = cfg.generator.model_copy(update={"seed": seed})
    with stage_run("generator", cfg, tracking_uri, params=generator_cfg.model_dump(mode="json")):
        started = time.perf_counter()
        if generator_cfg.kind == stable_diffusion.KIND:
            card = stable_diffusion.save_card(generator_cfg, cfg.image_size, Path(out_dir))
            mlflow.set_tag("tckr.generator_model", card["model"])
            metrics: Metrics = {}
        else:
            metrics = _pixel_base_generator(cfg, generator_cfg, Path(data_dir), Path(captions_dir), Path(out_dir))
        metrics["stage.generator.seconds"] = time.perf_counter() - started
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "generator.json"))
    return metrics


def _pixel_base_generator(cfg: TckrConfig, generator_cfg: GeneratorConfig, data_dir: Path, captions_dir: Path,
                          out_dir: Path) -> Metrics:
    import mlflow

    from tckr.atomic import copy_tree
    from tckr.generator import (
        cache_key,
        decode_split,
        digest_files,
        generator_cache_dir,
        pretrain_pixel_generator,
        read_texts,
    )
    from tckr.ingest import load_prepared

    splits, info = load_prepared(data_dir)
    if "public" not in splits:
        raise ValueError("the pixel generator is pretrained on the public split, and the prepared dataset "
                         "has none: set ingest.public_fraction > 0")
    public_captions = captions_dir / "public" / "captions.jsonl"
    # Keyed on the public split only: a new private set reuses the same pretrained generator.
    key = cache_key(generator_cfg, cfg.image_size, info.split_fingerprints["public"], digest_files([public_captions]))
    cached = generator_cache_dir() / key
    hit = (cached / "generator.json").is_file()
    if hit:
        copy_tree(cached, out_dir)
    else:
        images = decode_split(splits["public"], cfg.image_size, info.channels)
        pretrain_pixel_generator(generator_cfg, images, read_texts(public_captions), out_dir, _device(cfg),
                                 on_step=lambda step, loss: _log_every(step, 25, {"pretrain_loss": loss}))
        copy_tree(out_dir, cached)
    mlflow.set_tag("tckr.generator_cache_key", key)
    return {"generator.cached": float(hit)}


def finetune_stage(cfg: TckrConfig, seed: int, data_dir: Path, captions_dir: Path, generator_dir: Path,
                   out_dir: Path, tracking_uri: str) -> Metrics:
    """LoRA on the private train split's (image, caption) pairs; logs the loss curve."""
    import mlflow

    from tckr.finetune import finetune_generator
    from tckr.generator import decode_split, read_card, read_texts
    from tckr.ingest import load_prepared

    finetune_cfg = cfg.finetune.model_copy(update={"seed": seed})
    with stage_run("finetune", cfg, tracking_uri, params=finetune_cfg.model_dump(mode="json")):
        started = time.perf_counter()
        splits, _ = load_prepared(Path(data_dir))
        device = _device(cfg)
        # The channels the generator models: the dataset's for the pixel UNet, RGB for Stable Diffusion's VAE.
        images = decode_split(splits["train"], cfg.image_size, read_card(Path(generator_dir))["channels"])
        texts = read_texts(Path(captions_dir) / "train" / "captions.jsonl")
        summary = finetune_generator(Path(generator_dir), images, texts, finetune_cfg, Path(out_dir), device,
                                     on_step=lambda step, loss: _log_every(step, 10, {"lora_loss": loss}))
        metrics = {"finetune.final_loss": summary["final_loss"], "finetune.steps": float(summary["steps"]),
                   "stage.finetune.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "loss.csv"))
        mlflow.log_artifact(str(Path(out_dir) / "adapter.json"))
    return metrics


def _generation_plan(cfg: TckrConfig, seed: int, data_dir: Path, captions_dir: Path):
    import json

    from tckr.generate import plan_generation
    from tckr.ingest import DatasetInfo

    info = DatasetInfo.load(Path(data_dir) / "dataset.json")
    by_class = json.loads((Path(captions_dir) / "train" / "captions_by_class.json").read_text())
    generate_cfg = cfg.generate.model_copy(update={"seed": seed})
    return plan_generation(by_class, info.classes, info.splits["train"].count, generate_cfg), generate_cfg, info


def generation_shards(cfg: TckrConfig, seed: int, data_dir: Path, captions_dir: Path) -> list[int]:
    """The shard numbers of the generation plan: what the pipeline fans out over."""
    from tckr.generate import shard_ranges

    plan, generate_cfg, _ = _generation_plan(cfg, seed, data_dir, captions_dir)
    return list(range(len(shard_ranges(len(plan), generate_cfg.shard_size))))


def generate_shard_stage(cfg: TckrConfig, seed: int, shard: int, data_dir: Path, captions_dir: Path,
                         generator_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """One shard of the plan into ``out_dir`` (one pod of the fan-out); resumable like any shard."""
    from tckr.finetune import load_finetuned
    from tckr.generate import generate_shards

    plan, generate_cfg, _ = _generation_plan(cfg, seed, data_dir, captions_dir)
    device = _device(cfg)
    generator = load_finetuned(Path(generator_dir), Path(adapter_dir), device)
    generate_shards(generator, plan, Path(out_dir), generate_cfg, shards=[int(shard)])
    return Path(out_dir)


def generate_stage(cfg: TckrConfig, seed: int, data_dir: Path, captions_dir: Path, generator_dir: Path,
                   adapter_dir: Path, teacher_dir: Path, out_dir: Path, tracking_uri: str,
                   shard_dirs: list[Path] = ()) -> Metrics:
    """The synthetic set: shards made elsewhere (``shard_dirs``, the fan-out) are gathered, any missing
    shard is generated here, the whole is checked against the plan and scored by the teacher's
    agreement with the prompts' classes."""
    import mlflow

    from tckr.classify import BatchAugment, ImageSplit, accuracy, load_classifier, predict_logits
    from tckr.finetune import load_finetuned
    from tckr.generate import finalize, gather_shards, generate_shards, load_synthetic, sample_grid

    with stage_run("generate", cfg, tracking_uri, params=cfg.generate.model_dump(mode="json") | {"seed": seed}):
        started = time.perf_counter()
        plan, generate_cfg, info = _generation_plan(cfg, seed, data_dir, captions_dir)
        device = _device(cfg)
        gathered = gather_shards([Path(d) for d in shard_dirs], Path(out_dir)) if distributed.is_lead() else []
        distributed.barrier()  # the gathered shards are in place before any rank looks for missing ones
        generator = load_finetuned(Path(generator_dir), Path(adapter_dir), device)
        made_here = generate_shards(generator, plan, Path(out_dir), generate_cfg)
        if not distributed.is_lead():
            return {}
        summary = finalize(Path(out_dir), plan, generate_cfg)
        synthetic = ImageSplit(load_synthetic(Path(out_dir), info.classes), cfg.image_size, info.channels)
        teacher = load_classifier(Path(teacher_dir), device)
        logits = predict_logits(teacher, BatchAugment(info.mean, info.std).to(device), synthetic, 512, device,
                                "teacher on synthetic")
        grid = sample_grid(Path(out_dir), info.classes, per_class=10)
        metrics = {"synthetic.images": float(summary["images"]), "synthetic.shards": float(summary["shards"]),
                   "synthetic.shards_gathered": float(len(gathered)),
                   "synthetic.shards_generated_here": float(len(made_here)),
                   "synthetic.teacher_agreement": accuracy(logits, synthetic.labels),
                   "synthetic.images_per_second": summary["images"] / summary["generation_seconds"],
                   "stage.generate_shards.seconds": summary["generation_seconds"],
                   "stage.generate.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(grid))
        mlflow.log_artifact(str(Path(out_dir) / "synthetic.json"))
    return metrics


def _device(cfg: TckrConfig):
    """The stage's torch device (refusing a requested but absent GPU; this rank's own among several) and
    thread count."""
    import torch

    from tckr.classify import resolve_device

    if cfg.runtime.torch_threads:
        torch.set_num_threads(cfg.runtime.torch_threads)
    return distributed.rank_device(resolve_device(cfg.runtime.device))


def _log_every(step: int, every: int, values: dict[str, float]) -> None:
    import mlflow

    if step % every == 0:
        mlflow.log_metrics(values, step=step)


def _log_classifier(model_dir: Path, splits, info, cfg: TckrConfig) -> None:
    """Log the classifier in ``model_dir`` to the active run in its served form (float images in
    [0, 1] -> logits) and note its URI in ``model_dir/logged_model.json`` for the register stage."""
    import json

    import torch

    from tckr.classify import ImageSplit, load_classifier
    from tckr.models import NormalizedClassifier
    from tckr.tracking import log_classifier

    if not cfg.tracking.register_models:
        return
    model = NormalizedClassifier(load_classifier(model_dir), info.mean, info.std).eval()
    test = ImageSplit(splits["test"], cfg.image_size, info.channels)
    example = torch.stack([test[0][0], test[1][0]]).float().div(255).numpy()  # batch >= 2 for pt2
    (Path(model_dir) / "logged_model.json").write_text(json.dumps({"model_uri": log_classifier(model, example)}))


def student_stage(cfg: TckrConfig, seed: int, data_dir: Path, synthetic_dir: Path, teacher_dir: Path,
                  out_dir: Path, tracking_uri: str) -> Metrics:
    """Distil the teacher into the student on the synthetic set only (GKD); select and test on real data."""
    import mlflow

    from tckr.distill import train_student
    from tckr.generate import load_synthetic
    from tckr.generator import digest_files
    from tckr.ingest import load_prepared

    student_cfg = cfg.student_recipe.model_copy(update={"seed": seed})
    params = student_cfg.model_dump(mode="json") | {f"distill.{k}": v for k, v in cfg.distill.model_dump().items()}
    with stage_run("student", cfg, tracking_uri, params=params):
        started = time.perf_counter()
        device = _device(cfg)
        splits, info = load_prepared(Path(data_dir))
        synthetic = load_synthetic(Path(synthetic_dir), info.classes)
        sources = digest_files([Path(synthetic_dir) / "manifest.jsonl", Path(teacher_dir) / "model.safetensors"])
        result = train_student(
            student_cfg, cfg.distill, synthetic, splits, info, cfg.image_size, Path(teacher_dir), Path(out_dir), device,
            sources_key=sources, on_epoch=lambda record: mlflow.log_metrics(
                {k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"]))
        if result is None:  # not the lead rank
            return {}
        metrics = {"student.test_accuracy": result.test_accuracy, "student.val_accuracy": result.val_accuracy,
                   "student.best_epoch": float(result.best_epoch),
                   "student.images_per_second": result.images_per_second,
                   "student.synthetic_images": float(len(synthetic)),
                   "stage.student.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(Path(out_dir) / "model.json"))
        _log_classifier(Path(out_dir), splits, info, cfg)
    return metrics


def shadow_group_numbers(cfg: TckrConfig) -> list[int]:
    """The shadow groups: what the pipeline fans out over."""
    from tckr.shadows import shadow_groups

    return list(range(len(shadow_groups(cfg.attack))))


def shadow_group_stage(cfg: TckrConfig, seed: int, group: int, data_dir: Path, out_dir: Path) -> Path:
    """Train one group of shadow models into ``out_dir`` (one pod of the fan-out); resumable."""
    from tckr.attack import load_population, train_shadows

    attack_cfg = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"seed": seed})})
    population, validation, info = load_population(attack_cfg, Path(data_dir))
    train_shadows(attack_cfg, population, validation, info, Path(out_dir), _device(cfg), groups=[int(group)])
    return Path(out_dir)


def attack_stage(cfg: TckrConfig, seed: int, data_dir: Path, teacher_dir: Path, student_dir: Path, out_dir: Path,
                 tracking_uri: str, shadow_dirs: list[Path] = ()) -> Metrics:
    """LiRA on teacher and student: shadows made elsewhere (the fan-out) are used, missing ones are
    trained here; each shadow becomes a nested MLflow run under the attack's."""
    import mlflow

    from tckr.attack import attack, collect_shadows, load_population, train_shadows

    attack_cfg = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"seed": seed})})
    with stage_run("attack", cfg, tracking_uri, params=attack_cfg.attack.model_dump(mode="json")) as run:
        started = time.perf_counter()
        device = _device(cfg)
        shadows_dir = Path(out_dir) / "shadows"
        population, validation, info = load_population(attack_cfg, Path(data_dir))
        trained_here = train_shadows(attack_cfg, population, validation, info, shadows_dir, device,
                                     done_elsewhere=[Path(d) for d in shadow_dirs])
        logits, summaries = collect_shadows([shadows_dir, *map(Path, shadow_dirs)], cfg.attack.shadows)
        results = attack(attack_cfg, population, info, logits, {"teacher": Path(teacher_dir),
                                                                "student": Path(student_dir)}, Path(out_dir), device)
        _log_shadow_runs(run.info.experiment_id, run.info.run_id, summaries)
        metrics: Metrics = {}
        for name, result in results.items():
            metrics |= result.metrics(f"{name}.mia")
        metrics |= {"attack.shadows": float(len(summaries)), "attack.shadows_trained_here": float(len(trained_here)),
                    "attack.shadow_val_accuracy": sum(s["val_accuracy"] for s in summaries) / len(summaries),
                    "attack.population": float(len(population)),
                    "stage.shadows.seconds": sum(s["seconds"] for s in summaries),
                    "stage.attack.seconds": time.perf_counter() - started}
        mlflow.log_metrics(metrics)
        for name in ("attack.json", "roc.png", "roc-teacher.csv", "roc-student.csv", "scores.csv"):
            mlflow.log_artifact(str(Path(out_dir) / name))
    return metrics


def _log_shadow_runs(experiment_id: str, attack_run_id: str, summaries: list[dict]) -> None:
    """One finished nested run per shadow: its half of the population, selection and fit."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    for summary in summaries:
        run = client.create_run(experiment_id, run_name=f"shadow-{summary['index']:03d}",
                                tags={"mlflow.parentRunId": attack_run_id, "tckr.stage": "shadow"})
        history = [Metric("val_accuracy", r["val_accuracy"], now, r["epoch"]) for r in summary["history"]]
        final = [Metric(key, float(summary[key]), now, 0) for key in ("in_accuracy", "out_accuracy")]
        client.log_batch(run.info.run_id, metrics=history + final,
                         params=[Param("index", str(summary["index"])), Param("members", str(summary["members"])),
                                 Param("best_epoch", str(summary["best_epoch"]))])
        client.set_terminated(run.info.run_id)


def register_stage(cfg: TckrConfig, model_dirs: dict[str, Path], stage_metrics: list[Metrics],
                   tracking_uri: str) -> Metrics:
    """AOP for teacher and student, then both registered with what they leak; the student becomes
    ``champion`` only if its AOP beats the current champion's (and ``candidate`` either way)."""
    import json

    import mlflow

    from tckr.lira import aop
    from tckr.tracking import champion_score, register_model

    merged: Metrics = {}
    for part in stage_metrics:
        merged.update(part)
    with stage_run("register", cfg, tracking_uri):
        metrics: Metrics = {}
        for role in model_dirs:
            metrics[f"{role}.aop"] = aop(merged[f"{role}.test_accuracy"], merged[f"{role}.mia.auc"])
        if "student.aop" in metrics and "teacher.aop" in metrics:
            metrics["student.accuracy_ratio"] = merged["student.test_accuracy"] / merged["teacher.test_accuracy"]
        if cfg.tracking.register_models:
            for role, model_dir in model_dirs.items():
                name = f"tckr-{cfg.dataset}-{role}"
                card = json.loads((Path(model_dir) / "model.json").read_text())
                tags = {"dataset": cfg.dataset, "profile": cfg.profile, "config_hash": cfg.fingerprint(),
                        "dataset_fingerprint": card["dataset_fingerprint"], "classes": ",".join(card["classes"]),
                        "input": f"float32 [N, {card['in_chans']}, {cfg.image_size}, {cfg.image_size}] in [0, 1]",
                        "accuracy": f"{merged[f'{role}.test_accuracy']:.4f}",
                        "auc_mia": f"{merged[f'{role}.mia.auc']:.4f}",
                        "tpr_at_1pct_fpr": f"{merged[f'{role}.mia.tpr_at_1pct_fpr']:.4f}",
                        "aop": f"{metrics[f'{role}.aop']:.4f}"}
                aliases: tuple[str, ...] = ()
                if role == "student":
                    current = champion_score(name, "aop")
                    promoted = current is None or metrics["student.aop"] > current
                    metrics["student.champion"] = float(promoted)
                    aliases = ("candidate", "champion") if promoted else ("candidate",)
                uri = json.loads((Path(model_dir) / "logged_model.json").read_text())["model_uri"]
                metrics[f"{role}.registry_version"] = float(register_model(uri, name, tags, aliases))
        mlflow.log_metrics(metrics)
    return metrics


def report_stage(cfg: TckrConfig, stage_metrics: list[Metrics], out_dir: Path, tracking_uri: str) -> Metrics:
    """Merge the stages' metrics, write ``metrics.json`` + ``report.md`` and close the pipeline's parent run."""
    import mlflow

    from tckr.report import write_report
    from tckr.tracking import TrackingError, configure, finish_pipeline_run, pipeline_run_id

    configure(tracking_uri)
    parent_run_id = pipeline_run_id(cfg)
    if parent_run_id is None:
        raise TrackingError("the report closes the pipeline's parent run, and this process is not in a pipeline run")
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
