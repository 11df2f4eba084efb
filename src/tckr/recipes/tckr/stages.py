"""The TCKR recipe's stages, each declared once (:class:`tckr.core.stage.Stage`) beside its function.

A stage receives its own config sections and its input and output directories, and returns flat, dotted
metrics; a tracked stage is called inside its own MLflow run (nested under the pipeline's), which the
launcher opens, times and closes (:func:`tckr.recipes.invoke.call`), so a stage logs only its artifacts and
curves. The same functions serve the KFP components, ``tckr stage`` and DVC. Stages declared ``multi_gpu``
run in every rank of a multi-process launch (:mod:`tckr.core.distributed`): rank 0 alone tracks, writes the
outputs that exist once and returns metrics; the other ranks return ``{}`` once their share is done.
"""

from __future__ import annotations

from pathlib import Path

from tckr.core import distributed
from tckr.core.config import RuntimeConfig
from tckr.core.stage import (
    ALL_SECTIONS,
    ARTIFACT,
    DATASET,
    HTML,
    MARKDOWN,
    METRICS,
    MODEL,
    ROC,
    StageRegistry,
    collected,
    resources,
)
from tckr.generators.config import CaptionConfig, FidConfig, FinetuneConfig, GenerateConfig, GeneratorConfig
from tckr.platform.tracking import Tracking
from tckr.privacy.config import AttackConfig
from tckr.recipes.common import (
    Metrics,
    classifier_metrics,
    declare_shared,
    log_epoch,
    log_every,
    log_private_splits,
    run_attack,
    run_device,
    sampling_batches,
    shadows_in_group,
    training_metrics,
)
from tckr.recipes.synthetic import AUDIT_STAGE, audit, log_sample_grid, log_synthetic_set
from tckr.recipes.tckr.config import ControlsConfig, DistillConfig, TckrRun
from tckr.training.config import ClassifierConfig

STAGES = StageRegistry()
stage = STAGES.declare
declare_shared(STAGES, "start_run", "finish_run", "ingest")

# Default resources are the paper profile's on a cluster of GPU nodes (one 24-80 GB NVIDIA GPU per GPU task):
# every stage that resolves a torch device gets a GPU, since `runtime.device: cuda` refuses to run without one.


@stage(sections=("image_size", "teacher", "runtime"), inputs={"data": DATASET}, outputs={"model": MODEL},
       multi_gpu=True, resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def teacher(*, image_size: int, teacher: ClassifierConfig, runtime: RuntimeConfig, data: Path, model: Path) -> Metrics:
    """Train the teacher on the private train split and log it (registered after the attack)."""
    from tckr.data.ingest import load_prepared
    from tckr.training.classifier import train_classifier

    splits, info = load_prepared(data)
    result = train_classifier(teacher, splits, info, image_size, model, run_device(runtime), name="teacher",
                              on_epoch=log_epoch)
    if result is None:  # not the lead rank
        return {}
    log_private_splits(info, data, {"train": "training", "validation": "validation", "test": "test"})
    return classifier_metrics("teacher", result, model, info, image_size)


@stage(sections=("caption", "runtime"), inputs={"data": DATASET}, outputs={"captions": ARTIFACT},
       resources=resources("4", "8", "32Gi", "48Gi", gpus=1, scratch="40Gi"))  # BLIP-2 2.7B: 15 GB, loaded on the host
def caption(*, caption: CaptionConfig, runtime: RuntimeConfig, data: Path, captions: Path) -> Metrics:
    """Caption the private train split (and the public split) into ``captions/<split>/``."""
    import mlflow

    from tckr.generators.caption import caption_dataset

    summary = caption_dataset(caption, data, captions, run_device(runtime))
    mlflow.log_artifact(str(captions / "captions.json"))
    mlflow.log_artifact(str(captions / "train" / "captions_by_class.json"))
    metrics: Metrics = {}
    for split, part in summary["splits"].items():
        metrics |= {f"caption.{split}_images": float(part["images"]),
                    f"caption.{split}_distinct": float(part["distinct_captions"]),
                    f"caption.{split}_empty": float(part["empty_captions"])}
    return metrics


@stage(sections=("image_size", "generator", "runtime"), inputs={"data": DATASET, "captions": ARTIFACT},
       outputs={"base_model": MODEL},
       resources=resources("2", "4", "16Gi", "24Gi", scratch="20Gi"))  # SD2 (5 GB): checks it loads; trains nothing
def generator(*, image_size: int, generator: GeneratorConfig, runtime: RuntimeConfig, data: Path, captions: Path,
              base_model: Path) -> Metrics:
    """The base generator. Pixel: reused from the cache when one with the same key exists, else
    pretrained on the public split (never on private data) and cached. Stable Diffusion: nothing to
    pretrain (SD2 was pretrained on public data); the pipeline is loaded once to check it is reachable
    and matches the configuration, and a card naming it is written for the later stages."""
    import mlflow

    from tckr.generators import stable_diffusion

    if generator.kind == stable_diffusion.KIND:
        card = stable_diffusion.save_card(generator, image_size, base_model)
        mlflow.set_tag("tckr.generator_model", card["model"])
        metrics: Metrics = {}
    else:
        metrics = _pixel_base_generator(generator, image_size, runtime, data, captions, base_model)
    mlflow.log_artifact(str(base_model / "generator.json"))
    return metrics


def _pixel_base_generator(cfg: GeneratorConfig, image_size: int, runtime: RuntimeConfig, data: Path, captions: Path,
                          out_dir: Path) -> Metrics:
    import mlflow

    from tckr.core.atomic import copy_tree
    from tckr.core.errors import ConfigError
    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared
    from tckr.generators.caption import read_captions
    from tckr.generators.pixel import (
        cache_key,
        digest_files,
        generator_cache_dir,
        pretrain_pixel_generator,
        training_precision,
    )

    splits, info = load_prepared(data)
    if "public" not in splits:
        raise ConfigError("the pixel generator is pretrained on the public split, and the prepared dataset "
                          "has none: set ingest.public_fraction > 0")
    public_captions = captions / "public" / "captions.jsonl"
    texts = read_captions(captions / "public", splits["public"]["label"], info.classes)
    # Keyed on the public split only: a new private set reuses the same pretrained generator.
    device = run_device(runtime)
    key = cache_key(cfg, image_size, info.split_fingerprints["public"], digest_files([public_captions]),
                    training_precision(cfg, device))
    cached = generator_cache_dir() / key
    hit = (cached / "generator.json").is_file()
    if hit:
        copy_tree(cached, out_dir)
    else:
        images = decode_split(splits["public"], image_size, info.channels)
        pretrain_pixel_generator(cfg, images, texts, out_dir, device,
                                 on_step=lambda step, loss: log_every(step, 25, {"pretrain_loss": loss}))
        copy_tree(out_dir, cached)
    mlflow.set_tag("tckr.generator_cache_key", key)
    return {"generator.cached": float(hit)}


@stage(sections=("image_size", "finetune", "runtime"),
       inputs={"data": DATASET, "captions": ARTIFACT, "base_model": MODEL}, outputs={"adapter": MODEL},
       resources=resources("8", "16", "32Gi", "48Gi", gpus=1, scratch="20Gi"))
def finetune(*, image_size: int, finetune: FinetuneConfig, runtime: RuntimeConfig, data: Path, captions: Path,
             base_model: Path, adapter: Path) -> Metrics:
    """LoRA fine-tuning on the private train split's (image, caption) pairs; saves the adapter only."""
    import mlflow

    from tckr.data.images import decode_split
    from tckr.data.ingest import load_prepared
    from tckr.generators.caption import read_captions
    from tckr.generators.lora import finetune_generator
    from tckr.generators.pixel import read_card

    splits, info = load_prepared(data)
    texts = read_captions(captions / "train", splits["train"]["label"], info.classes)  # before any model loads
    # The channels the generator models: the dataset's for the pixel UNet, RGB for Stable Diffusion's VAE.
    images = decode_split(splits["train"], image_size, read_card(base_model)["channels"])
    summary = finetune_generator(base_model, images, texts, finetune, adapter, run_device(runtime),
                                 on_step=lambda step, loss: log_every(step, 10, {"lora_loss": loss}))
    mlflow.log_artifact(str(adapter / "loss.csv"))
    mlflow.log_artifact(str(adapter / "adapter.json"))
    return {"finetune.final_loss": summary["final_loss"], "finetune.steps": float(summary["steps"])}


def _generation_plan(cfg: GenerateConfig, captions: Path):
    """The plan from the captions alone (their run card names the classes and counts the private images), so a
    shard's pod gets the caption text and never the private dataset."""
    import json

    from tckr.generators.plan import plan_generation

    card = json.loads((captions / "train" / "run.json").read_text())
    by_class = json.loads((captions / "train" / "captions_by_class.json").read_text())
    return plan_generation(by_class, card["classes"], card["images"], cfg)


@stage(sections=("generate",), inputs={"captions": ARTIFACT}, returns="fan-out", tracked=False,
       resources=resources("500m", "2", "4Gi", "8Gi"))
def generation_plan(*, generate: GenerateConfig, captions: Path) -> list[int]:
    """The shard numbers of the generation plan, for the ParallelFor fan-out."""
    from tckr.generators.plan import shard_ranges

    plan = _generation_plan(generate, captions)
    return list(range(len(shard_ranges(len(plan), generate.shard_size))))


@stage(sections=("generate", "runtime"), params={"shard": int},
       inputs={"captions": ARTIFACT, "base_model": MODEL, "adapter": MODEL},
       outputs={"images": DATASET}, returns="nothing", tracked=False, multi_gpu=True,
       parallel_items=sampling_batches("generate"),
       resources=resources("4", "8", "24Gi", "32Gi", gpus=1, scratch="20Gi"))
def generate_shard(*, generate: GenerateConfig, runtime: RuntimeConfig, shard: int, captions: Path,
                   base_model: Path, adapter: Path, images: Path) -> None:
    """One shard of the synthetic set (one task of the fan-out), resumable like any shard."""
    from tckr.generators.generate import generate_shards, sampler_key
    from tckr.generators.lora import load_finetuned

    plan = _generation_plan(generate, captions)
    generator = load_finetuned(base_model, adapter, run_device(runtime))
    generate_shards(generator, plan, images, generate, sampler_key(generate, [base_model, adapter]),
                    shards=[int(shard)])


@stage(sections=("image_size", "generate", "runtime"),
       inputs={"data": DATASET, "captions": ARTIFACT, "base_model": MODEL, "adapter": MODEL, "teacher_model": MODEL,
               "shards": collected(DATASET)},
       outputs={"synthetic": DATASET}, multi_gpu=True, parallel_items=sampling_batches("generate"),
       resources=resources("8", "16", "32Gi", "48Gi", gpus=1, scratch="20Gi"))  # missing shards + the teacher
def generate(*, image_size: int, generate: GenerateConfig, runtime: RuntimeConfig, data: Path, captions: Path,
             base_model: Path, adapter: Path, teacher_model: Path, shards: list[Path], synthetic: Path) -> Metrics:
    """The synthetic set: shards made by the fan-out are gathered, any missing shard is generated here, the
    whole is checked against the plan and scored by the teacher's agreement with the prompts' classes."""
    import mlflow

    from tckr.data.images import BatchAugment, ImageSplit
    from tckr.data.ingest import DatasetInfo
    from tckr.generators.generate import finalize, gather_shards, generate_shards, load_synthetic, sampler_key
    from tckr.generators.lora import load_finetuned
    from tckr.training.classifier import accuracy, load_classifier, predict_logits

    plan, info = _generation_plan(generate, captions), DatasetInfo.load(data / "dataset.json")
    device = run_device(runtime)
    gathered = gather_shards(shards, synthetic) if distributed.is_lead() else []
    distributed.barrier()  # the gathered shards are in place before any rank looks for missing ones
    made_here = generate_shards(load_finetuned(base_model, adapter, device), plan, synthetic, generate,
                                sampler_key(generate, [base_model, adapter]))
    if not distributed.is_lead():
        return {}
    summary = finalize(synthetic, plan, generate)
    images = ImageSplit(load_synthetic(synthetic, info.classes), image_size, info.channels)
    logits = predict_logits(load_classifier(teacher_model, device), BatchAugment(info.mean, info.std).to(device),
                            images, 512, device, "teacher on synthetic")
    log_sample_grid(synthetic, info.classes)
    mlflow.log_artifact(str(synthetic / "synthetic.json"))
    return {"synthetic.images": float(summary["images"]), "synthetic.shards": float(summary["shards"]),
            "synthetic.shards_gathered": float(len(gathered)), "synthetic.shards_generated_here": float(len(made_here)),
            "synthetic.teacher_agreement": accuracy(logits, images.labels),
            "synthetic.images_per_second": summary["images"] / summary["generation_seconds"],
            "stage.generate_shards.seconds": summary["generation_seconds"]}


stage(**AUDIT_STAGE)(audit)


@stage(sections=("image_size", "fid", "runtime"), inputs={"data": DATASET, "synthetic": DATASET},
       outputs={"scores": ARTIFACT}, resources=resources("4", "8", "16Gi", "24Gi", gpus=1))
def fid(*, image_size: int, fid: FidConfig, runtime: RuntimeConfig, data: Path, synthetic: Path,
        scores: Path) -> Metrics:
    """FID of the synthetic set against the private train split, on PrivImage's scale (same features, sample
    counts from the config, real statistics cached)."""
    import mlflow

    from tckr.generators.fid import synthetic_fid

    summary = synthetic_fid(fid, image_size, data, synthetic, scores, run_device(runtime))
    mlflow.log_artifact(str(scores / "fid.json"))
    return {"synthetic.fid": summary["fid"], "fid.samples": float(summary["samples"]),
            "fid.real_images": float(summary["real_images"])}


@stage(sections=("image_size", "student", "distill", "runtime"),
       inputs={"data": DATASET, "synthetic": DATASET, "teacher_model": MODEL}, outputs={"model": MODEL},
       multi_gpu=True, resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def student(*, image_size: int, student: ClassifierConfig, distill: DistillConfig, runtime: RuntimeConfig,
            data: Path, synthetic: Path, teacher_model: Path, model: Path) -> Metrics:
    """Distil the teacher into the student on the synthetic set only (GKD); select and test on real data."""
    from tckr.data.ingest import load_prepared
    from tckr.generators.generate import load_synthetic
    from tckr.generators.pixel import digest_files
    from tckr.recipes.tckr.distill import train_student

    splits, info = load_prepared(data)
    images = load_synthetic(synthetic, info.classes)
    sources = digest_files([synthetic / "manifest.jsonl", teacher_model / "model.safetensors"])
    result = train_student(student, distill, images, splits, info, image_size, teacher_model, model,
                           run_device(runtime), sources_key=sources, on_epoch=log_epoch)
    if result is None:  # not the lead rank
        return {}
    log_synthetic_set(info, synthetic, "tckr", "training", len(images))
    log_private_splits(info, data, {"validation": "validation", "test": "test"})
    return classifier_metrics("student", result, model, info, image_size) | {
        "student.synthetic_images": float(len(images))}


# The attack's controls: two more targets whose answer is known in advance. Each stage is a no-op (no model, no
# metrics) when its control is switched off; the attack then leaves it out.
@stage(sections=("image_size", "teacher", "controls", "runtime"), inputs={"data": DATASET},
       outputs={"model": MODEL}, multi_gpu=True, resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def negative_control(*, image_size: int, teacher: ClassifierConfig, controls: ControlsConfig, runtime: RuntimeConfig,
                     data: Path, model: Path) -> Metrics:
    """The teacher's recipe on as many public images as the teacher has members (the first ones of the public
    split, which ingest shuffled). It saw no member and no holdout image: an attack that scores it outside the
    null band is broken, whatever it says of the real targets."""
    from tckr.core.errors import ConfigError
    from tckr.data.ingest import load_prepared
    from tckr.platform.tracking import log_dataset
    from tckr.training.classifier import train_classifier

    if not controls.negative:
        model.mkdir(parents=True, exist_ok=True)  # an empty output: no control to attack
        return {}
    splits, info = load_prepared(data)
    members = len(splits["train"])
    if len(splits.get("public", ())) < members:
        raise ConfigError(f"controls.negative needs as many public images as the {members} members, and the "
                          f"public split has {len(splits.get('public', ()))}: raise ingest.public_fraction")
    trained_on = {"train": splits["public"].select(range(members)), "validation": splits["validation"],
                  "test": splits["test"]}
    result = train_classifier(teacher, trained_on, info, image_size, model, run_device(runtime),
                              name="negative_control", on_epoch=log_epoch)
    if result is None:  # not the lead rank
        return {}
    log_dataset(f"{info.name}/public[:{members}]", info.split_fingerprints["public"], str(data), "training", members)
    log_private_splits(info, data, {"validation": "validation", "test": "test"})
    return training_metrics("negative_control", result)


@stage(sections=("image_size", "teacher", "student", "distill", "controls", "runtime"),
       inputs={"data": DATASET, "teacher_model": MODEL}, outputs={"model": MODEL},
       multi_gpu=True, resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def positive_control(*, image_size: int, teacher: ClassifierConfig, student: ClassifierConfig,
                     distill: DistillConfig, controls: ControlsConfig, runtime: RuntimeConfig, data: Path,
                     teacher_model: Path, model: Path) -> Metrics:
    """The student's recipe distilled from the teacher on the real members instead of synthetic images, for the
    teacher's epochs (:func:`~tckr.recipes.tckr.distill.positive_control_recipe`). Its leak, beside the teacher's,
    is what distillation alone hides; beside the student's, what the synthetic data adds."""
    from tckr.data.ingest import load_prepared
    from tckr.generators.pixel import digest_files
    from tckr.recipes.tckr.distill import positive_control_recipe, train_student

    if not controls.positive:
        model.mkdir(parents=True, exist_ok=True)  # an empty output: no control to attack
        return {}
    splits, info = load_prepared(data)
    sources = digest_files([teacher_model / "model.safetensors"]) + info.split_fingerprints["train"]
    result = train_student(positive_control_recipe(student, teacher), distill, splits["train"], splits, info,
                           image_size, teacher_model, model, run_device(runtime), sources_key=sources,
                           on_epoch=log_epoch, name="positive_control")
    if result is None:  # not the lead rank
        return {}
    log_private_splits(info, data, {"train": "training", "validation": "validation", "test": "test"})
    return training_metrics("positive_control", result)


declare_shared(STAGES, "shadow_plan")


@stage(sections=("image_size", "teacher", "attack", "runtime"), params={"group": int}, inputs={"data": DATASET},
       outputs={"shadows": MODEL}, returns="nothing", tracked=False, multi_gpu=True, parallel_items=shadows_in_group,
       resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def shadow_group(*, image_size: int, teacher: ClassifierConfig, attack: AttackConfig, runtime: RuntimeConfig,
                 group: int, data: Path, shadows: Path) -> None:
    """One group of LiRA shadow models of the teacher's recipe, trained together (one task of the fan-out),
    split over its GPUs; resumable."""
    from tckr.privacy.attack import load_population, shadow_recipe, train_shadows

    population, validation, info = load_population(attack, image_size, data)
    train_shadows(shadow_recipe(teacher, attack), attack, population, validation, info, shadows, run_device(runtime),
                  groups=[int(group)])


@stage(sections=("image_size", "teacher", "attack", "runtime"),
       inputs={"data": DATASET, "teacher_model": MODEL, "student_model": MODEL, "negative_control_model": MODEL,
               "positive_control_model": MODEL, "shadows": collected(MODEL)},
       outputs={"results": ARTIFACT},
       resources=resources("8", "16", "32Gi", "48Gi", gpus=1))  # every target over the population, every query
def attack(*, image_size: int, teacher: ClassifierConfig, attack: AttackConfig, runtime: RuntimeConfig, data: Path,
           teacher_model: Path, student_model: Path, negative_control_model: Path, positive_control_model: Path,
           shadows: list[Path], results: Path) -> Metrics:
    """LiRA and RMIA against teacher and student, and the controls that were trained: the fan-out's shadows are
    used, missing ones are trained here; each shadow becomes a nested MLflow run under the attack's."""
    controls = {"negative_control": negative_control_model, "positive_control": positive_control_model}
    targets = {"teacher": teacher_model, "student": student_model} | {
        name: path for name, path in controls.items() if (path / "model.safetensors").is_file()}
    return run_attack(image_size, teacher, attack, runtime, data, targets, shadows, results, teacher.eval_batch_size,
                      differences={"delta": ("student", "teacher")})


# TCKR's champion: the student with the best accuracy over privacy (AOP), compared within this recipe's own
# registered models only (their names carry the recipe).
CHAMPION_ROLE, CHAMPION_METRIC = "student", "aop"


@stage(sections=(ALL_SECTIONS,),
       inputs={"teacher_model": MODEL, "student_model": MODEL, "teacher_metrics": METRICS,
               "student_metrics": METRICS, "attack_metrics": METRICS},
       cache=False,  # registering twice makes two versions: only on purpose
       resources=resources("1", "2", "4Gi", "8Gi"))
def register(*, config: TckrRun, teacher_model: Path, student_model: Path, teacher_metrics: Metrics,
             student_metrics: Metrics, attack_metrics: Metrics) -> Metrics:
    """AOP of teacher and student, then both registered with what they leak; the student becomes
    ``champion`` only if its AOP beats the current champion's (and ``candidate`` either way)."""
    from tckr.recipes.common import aop_metrics, register_classifier

    merged = teacher_metrics | student_metrics | attack_metrics
    model_dirs = {"teacher": teacher_model, "student": student_model}
    metrics: Metrics = aop_metrics("teacher", merged) | aop_metrics("student", merged)
    metrics["student.accuracy_ratio"] = merged["student.test_accuracy"] / merged["teacher.test_accuracy"]
    if config.tracking.register_models:
        for role, model_dir in model_dirs.items():
            metrics |= register_classifier(config, role, model_dir, merged | metrics, {},
                                           CHAMPION_METRIC if role == CHAMPION_ROLE else None)
    return metrics


@stage(sections=(ALL_SECTIONS,),
       inputs={"ingest_metrics": METRICS, "teacher_metrics": METRICS, "caption_metrics": METRICS,
               "generator_metrics": METRICS, "finetune_metrics": METRICS, "generate_metrics": METRICS,
               "audit_metrics": METRICS, "fid_metrics": METRICS, "student_metrics": METRICS,
               "negative_control_metrics": METRICS, "positive_control_metrics": METRICS,
               "attack_metrics": METRICS, "register_metrics": METRICS, "synthetic": DATASET,
               "audit_results": ARTIFACT, "attack_results": ARTIFACT},
       outputs={"summary": MARKDOWN, "report_files": ARTIFACT, "report_page": HTML, "roc": ROC}, own_run=False,
       cache=False, resources=resources("500m", "2", "2Gi", "4Gi"))
def report(*, config: TckrRun, ingest_metrics: Metrics, teacher_metrics: Metrics, caption_metrics: Metrics,
           generator_metrics: Metrics, finetune_metrics: Metrics, generate_metrics: Metrics, audit_metrics: Metrics,
           fid_metrics: Metrics, student_metrics: Metrics, negative_control_metrics: Metrics,
           positive_control_metrics: Metrics, attack_metrics: Metrics, register_metrics: Metrics, synthetic: Path,
           audit_results: Path, attack_results: Path, summary: Path, report_files: Path, report_page: Path, roc: Path,
           tracking: Tracking) -> Metrics:
    """Merge the stages' metrics into the run report (``report_files``: report.md, metrics.json, config.yaml and
    the figures), close the pipeline's parent run, and publish the report as declared outputs, the only files a
    cluster keeps: ``summary`` (Markdown), ``report_page`` (self-contained HTML) and ``roc`` (the released model's
    LiRA ROC)."""
    import functools
    import shutil

    from tckr.recipes.common import close_pipeline_run, publish_report
    from tckr.recipes.report import WORST_PAIRS
    from tckr.recipes.tckr.report import write_report

    out_dir = report_files
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synthetic / "samples.png", out_dir / "samples.png")
    shutil.copyfile(attack_results / "roc.png", out_dir / "roc.png")
    shutil.copyfile(audit_results / WORST_PAIRS, out_dir / WORST_PAIRS)
    metrics = close_pipeline_run(tracking, (ingest_metrics, teacher_metrics, caption_metrics, generator_metrics,
                                            finetune_metrics, generate_metrics, audit_metrics, fid_metrics,
                                            student_metrics, negative_control_metrics, positive_control_metrics,
                                            attack_metrics, register_metrics), out_dir,
                                 functools.partial(write_report, config))
    publish_report(out_dir, summary, report_page, roc, attack_results / "roc-student.csv")
    return metrics
