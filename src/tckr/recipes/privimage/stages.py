"""PrivImage's stages, each declared once (:class:`tckr.core.stage.Stage`) beside its function.

ingest -> public_pool -> query (DP) -> pretrain (public, cached) -> finetune (DP-SGD) -> sample (fan-out over
shards) -> {audit, fid, classifier} -> attack (LiRA, fan-out over shadow groups) -> register -> report. The two private
steps (the query's histogram and DP-SGD) are composed in one accountant: ``finetune`` solves its noise so the
whole run spends ``privacy.target_epsilon``. The synthetic set and the downstream classifier (selected on synthetic
data) only post-process the DP generator, so the guarantee covers them; the measurements do not: FID and the
attack read real private images on purpose, to measure the release.
"""

from __future__ import annotations

from pathlib import Path

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
from tckr.data.public_pool import PublicPoolConfig
from tckr.generators.config import FidConfig, GenerateConfig
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
)
from tckr.recipes.privimage.config import (
    DownstreamConfig,
    FinetuneConfig,
    PretrainConfig,
    PrivImageRun,
    QueryConfig,
)
from tckr.recipes.synthetic import AUDIT_STAGE, audit, log_sample_grid, log_synthetic_set
from tckr.training.config import ClassifierConfig

STAGES = StageRegistry()
stage = STAGES.declare
declare_shared(STAGES, "start_run", "finish_run", "ingest")
ROLE = "privimage"  # the downstream classifier's metrics and registered model: privimage.test_accuracy, ...


@stage(sections=("pool", "query", "runtime"), inputs={"data": DATASET}, outputs={"public": DATASET},
       resources=resources("4", "8", "16Gi", "32Gi", gpus=1, scratch="20Gi"))  # the public hub dataset
def public_pool(*, pool: PublicPoolConfig, query: QueryConfig, runtime: RuntimeConfig, data: Path,
                public: Path) -> Metrics:
    """The public pool, every image with a public class (its own label, or the semantic classifier's top-1)."""
    import mlflow

    from tckr.recipes.privimage.pool import build_pool

    summary = build_pool(pool, query, data, public, run_device(runtime))
    mlflow.log_artifact(str(public / "pool.json"))
    return {"pool.images": float(summary["images"]), "pool.public_classes": float(summary["public_classes_present"]),
            "pool.in_domain_images": float(summary["in_domain_images"])}


@stage(sections=("query", "privacy", "runtime"), inputs={"data": DATASET, "public": DATASET},
       outputs={"selection": ARTIFACT}, resources=resources("4", "8", "16Gi", "32Gi", gpus=1))
def query(*, query: QueryConfig, privacy: FinetuneConfig, runtime: RuntimeConfig, data: Path, public: Path,
          selection: Path) -> Metrics:
    """The DP semantic query over the private train split: which public classes each sensitive class takes;
    the chosen public images relabelled with the sensitive class that chose them. Refuses, before any private
    image is read, a privacy budget that the query and DP-SGD together cannot meet."""
    import mlflow

    from tckr.recipes.privimage.selection import run_query

    summary = run_query(query, privacy, data, public, selection, run_device(runtime))
    mlflow.log_artifact(str(selection / "selection.json"))
    return summary


@stage(sections=("image_size", "pretrain", "runtime"), inputs={"data": DATASET, "public": DATASET,
                                                               "selection": ARTIFACT},
       outputs={"base_model": MODEL}, resources=resources("8", "16", "32Gi", "48Gi", gpus=1))
def pretrain(*, image_size: int, pretrain: PretrainConfig, runtime: RuntimeConfig, data: Path, public: Path,
             selection: Path, base_model: Path) -> Metrics:
    """The class-conditional generator pretrained (no privacy) on public data: the selected subset (PrivImage),
    the whole pool, or nothing (``pretrain.subset``); reused from the cache when one with the same key exists."""
    import mlflow

    from tckr.recipes.privimage.generator import pretrained_generator

    summary = pretrained_generator(pretrain, image_size, data, public, selection, base_model, run_device(runtime),
                                   on_step=lambda step, loss: log_every(step, 25, {"pretrain_loss": loss}))
    mlflow.set_tag("tckr.generator_cache_key", summary["cache_key"])
    mlflow.log_artifact(str(base_model / "generator.json"))
    return {"pretrain.cached": float(summary["cached"]), "pretrain.images": float(summary["images"])}


@stage(sections=("image_size", "privacy", "runtime"), inputs={"data": DATASET, "selection": ARTIFACT,
                                                              "base_model": MODEL},
       outputs={"generator": MODEL}, resources=resources("8", "16", "32Gi", "48Gi", gpus=1))
def finetune(*, image_size: int, privacy: FinetuneConfig, runtime: RuntimeConfig, data: Path, selection: Path,
             base_model: Path, generator: Path) -> Metrics:
    """DP-SGD fine-tuning on the private train split (Opacus), its noise solved so that the query and DP-SGD,
    composed in one accountant, spend ``privacy.target_epsilon``; epsilon spent is logged every epoch."""
    import mlflow

    from tckr.recipes.privimage.generator import finetune_privately

    plan, result = finetune_privately(privacy, image_size, data, selection, base_model, generator,
                                      run_device(runtime), on_epoch=log_epoch)
    mlflow.log_artifact(str(generator / "privacy.json"))
    mlflow.set_tags({"tckr.epsilon": f"{result.epsilon:.4f}", "tckr.delta": f"{plan.delta:.3g}"})
    return {f"{ROLE}.epsilon": result.epsilon, f"{ROLE}.delta": plan.delta, f"{ROLE}.target_epsilon":
            plan.target_epsilon, f"{ROLE}.query_epsilon": plan.query_epsilon,
            f"{ROLE}.noise_multiplier": plan.noise_multiplier, f"{ROLE}.sample_rate": plan.sample_rate,
            f"{ROLE}.dp_steps": float(plan.steps), "finetune.final_loss": result.losses[-1] if result.losses else 0.0}


def _sampling_plan(sample: GenerateConfig, generator: Path):
    """The plan from the fine-tuned generator's card alone (its classes, and the private set's size the ratio
    scales), so a shard's pod gets the generator and never the private dataset."""
    import json

    from tckr.generators.plan import plan_generation

    card = json.loads((generator / "generator.json").read_text())
    classes = card["classes"]
    # A class generator is prompted with class names: one "caption" per class.
    plan = plan_generation({name: [name] for name in classes}, classes, card["finetuning"]["private_images"], sample)
    return plan, classes


@stage(sections=("sample",), inputs={"generator": MODEL}, returns="fan-out", tracked=False,
       resources=resources("250m", "1", "1Gi", "2Gi"))
def sample_plan(*, sample: GenerateConfig, generator: Path) -> list[int]:
    """The shard numbers of the synthetic set, for the ParallelFor fan-out."""
    from tckr.generators.plan import shard_ranges

    plan, _ = _sampling_plan(sample, generator)
    return list(range(len(shard_ranges(len(plan), sample.shard_size))))


@stage(sections=("sample", "runtime"), params={"shard": int}, inputs={"generator": MODEL},
       outputs={"images": DATASET}, returns="nothing", tracked=False, multi_gpu=True,
       parallel_items=sampling_batches("sample"), resources=resources("4", "8", "16Gi", "24Gi", gpus=1))
def sample_shard(*, sample: GenerateConfig, runtime: RuntimeConfig, shard: int, generator: Path,
                 images: Path) -> None:
    """One shard of the synthetic set (one task of the fan-out), resumable like any shard."""
    from tckr.generators.conditional import ClassConditionalGenerator
    from tckr.generators.generate import generate_shards, sampler_key

    plan, _ = _sampling_plan(sample, generator)
    model = ClassConditionalGenerator.load(generator, run_device(runtime))
    generate_shards(model, plan, images, sample, sampler_key(sample, [generator]), shards=[int(shard)])


@stage(sections=("sample", "runtime"), inputs={"generator": MODEL, "shards": collected(DATASET)},
       outputs={"synthetic": DATASET}, multi_gpu=True, parallel_items=sampling_batches("sample"),
       resources=resources("4", "8", "16Gi", "24Gi", gpus=1))
def sample(*, sample: GenerateConfig, runtime: RuntimeConfig, generator: Path, shards: list[Path],
           synthetic: Path) -> Metrics:
    """The labelled synthetic set: the fan-out's shards gathered, any missing one sampled here, the whole
    checked against the plan."""
    import mlflow

    from tckr.core import distributed
    from tckr.generators.conditional import ClassConditionalGenerator
    from tckr.generators.generate import finalize, gather_shards, generate_shards, sampler_key

    plan, classes = _sampling_plan(sample, generator)
    gathered = gather_shards(shards, synthetic) if distributed.is_lead() else []
    distributed.barrier()
    made_here = generate_shards(ClassConditionalGenerator.load(generator, run_device(runtime)), plan, synthetic, sample,
                                sampler_key(sample, [generator]))
    if not distributed.is_lead():
        return {}
    summary = finalize(synthetic, plan, sample)
    log_sample_grid(synthetic, classes)
    mlflow.log_artifact(str(synthetic / "synthetic.json"))
    return {"synthetic.images": float(summary["images"]), "synthetic.shards_gathered": float(len(gathered)),
            "synthetic.shards_generated_here": float(len(made_here)),
            "synthetic.images_per_second": summary["images"] / summary["generation_seconds"],
            "stage.sample_shards.seconds": summary["generation_seconds"]}


stage(**AUDIT_STAGE)(audit)


@stage(sections=("image_size", "fid", "runtime"), inputs={"data": DATASET, "synthetic": DATASET},
       outputs={"scores": ARTIFACT}, resources=resources("4", "8", "16Gi", "24Gi", gpus=1))
def fid(*, image_size: int, fid: FidConfig, runtime: RuntimeConfig, data: Path, synthetic: Path,
        scores: Path) -> Metrics:
    """FID of the synthetic set against the private train split (Inception features; real statistics cached)."""
    import mlflow

    from tckr.generators.fid import synthetic_fid

    summary = synthetic_fid(fid, image_size, data, synthetic, scores, run_device(runtime))
    mlflow.log_artifact(str(scores / "fid.json"))
    return {f"{ROLE}.fid": summary["fid"], "fid.samples": float(summary["samples"]),
            "fid.real_images": float(summary["real_images"])}


@stage(sections=("image_size", "classifier", "downstream", "runtime"), inputs={"data": DATASET,
                                                                              "synthetic": DATASET},
       outputs={"model": MODEL}, multi_gpu=True, resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def classifier(*, image_size: int, classifier: ClassifierConfig, downstream: DownstreamConfig,
               runtime: RuntimeConfig, data: Path, synthetic: Path, model: Path) -> Metrics:
    """The downstream classifier: trained on the synthetic set, selected on a held-out synthetic split (or, outside
    the guarantee, on real validation data), tested on the real test split."""
    from tckr.data.ingest import load_prepared
    from tckr.recipes.privimage.evaluate import train_downstream

    splits, info = load_prepared(data)
    result, used = train_downstream(classifier, downstream, splits, info, image_size, synthetic, model,
                                    run_device(runtime), on_epoch=log_epoch)
    if result is None:  # not the lead rank
        return {}
    log_synthetic_set(info, synthetic, "privimage", "training", len(used["train"]))
    log_private_splits(info, data, {"validation": "validation", "test": "test"} if downstream.selection == "real"
                       else {"test": "test"})
    return classifier_metrics(ROLE, result, model, info, image_size) | {
        f"{ROLE}.synthetic_train_images": float(len(used["train"])),
        f"{ROLE}.selected_on_real": float(downstream.selection == "real")}


declare_shared(STAGES, "shadow_plan")


@stage(sections=("image_size", "classifier", "attack", "runtime"), params={"group": int}, inputs={"data": DATASET},
       outputs={"shadows": MODEL}, returns="nothing", tracked=False, multi_gpu=True, parallel_items=shadows_in_group,
       resources=resources("8", "16", "32Gi", "48Gi", gpus=1, shm="8Gi"))
def shadow_group(*, image_size: int, classifier: ClassifierConfig, attack: AttackConfig, runtime: RuntimeConfig,
                 group: int, data: Path, shadows: Path) -> None:
    """One group of LiRA shadow models of the downstream classifier's recipe on real data (one task of the
    fan-out), resumable."""
    from tckr.privacy.attack import load_population, shadow_recipe, train_shadows

    population, validation, info = load_population(attack, image_size, data)
    train_shadows(shadow_recipe(classifier, attack), attack, population, validation, info, shadows,
                  run_device(runtime), groups=[int(group)])


@stage(sections=("image_size", "classifier", "attack", "runtime"),
       inputs={"data": DATASET, "model": MODEL, "shadows": collected(MODEL)}, outputs={"results": ARTIFACT},
       resources=resources("8", "16", "32Gi", "48Gi", gpus=1))
def attack(*, image_size: int, classifier: ClassifierConfig, attack: AttackConfig, runtime: RuntimeConfig,
           data: Path, model: Path, shadows: list[Path], results: Path) -> Metrics:
    """LiRA against the downstream classifier, over the same population as TCKR's targets (private train members,
    holdout non-members); missing shadows are trained here."""
    return run_attack(image_size, classifier, attack, runtime, data, {ROLE: model}, shadows, results,
                      classifier.eval_batch_size)


@stage(sections=(ALL_SECTIONS,), inputs={"model": MODEL, "classifier_metrics": METRICS, "finetune_metrics": METRICS,
                                         "attack_metrics": METRICS},
       cache=False, resources=resources("1", "2", "4Gi", "8Gi"))
def register(*, config: PrivImageRun, model: Path, classifier_metrics: Metrics, finetune_metrics: Metrics,
             attack_metrics: Metrics) -> Metrics:
    """AOP of the downstream classifier, then the classifier registered with its (epsilon, delta) and what it
    leaks; ``champion`` only if its AOP beats the current champion's (``candidate`` either way)."""
    from tckr.recipes.common import aop_metrics, register_classifier

    merged = classifier_metrics | finetune_metrics | attack_metrics
    metrics: Metrics = aop_metrics(ROLE, merged)
    if config.tracking.register_models:
        tags = {"epsilon": f"{merged[f'{ROLE}.epsilon']:.4f}", "delta": f"{merged[f'{ROLE}.delta']:.3g}",
                "selected_on": config.downstream.selection}
        metrics |= register_classifier(config, "classifier", model, merged | metrics, tags, champion_metric="aop",
                                       measured_as=ROLE)
    return metrics


@stage(sections=(ALL_SECTIONS,),
       inputs={"ingest_metrics": METRICS, "pool_metrics": METRICS, "query_metrics": METRICS,
               "pretrain_metrics": METRICS, "finetune_metrics": METRICS, "sample_metrics": METRICS,
               "audit_metrics": METRICS, "fid_metrics": METRICS, "classifier_metrics": METRICS,
               "attack_metrics": METRICS, "register_metrics": METRICS, "synthetic": DATASET, "selection": ARTIFACT,
               "audit_results": ARTIFACT, "attack_results": ARTIFACT},
       outputs={"summary": MARKDOWN, "report_files": ARTIFACT, "report_page": HTML, "roc": ROC}, own_run=False,
       cache=False, resources=resources("500m", "2", "2Gi", "4Gi"))
def report(*, config: PrivImageRun, ingest_metrics: Metrics, pool_metrics: Metrics, query_metrics: Metrics,
           pretrain_metrics: Metrics, finetune_metrics: Metrics, sample_metrics: Metrics, audit_metrics: Metrics,
           fid_metrics: Metrics, classifier_metrics: Metrics, attack_metrics: Metrics, register_metrics: Metrics,
           synthetic: Path, selection: Path, audit_results: Path, attack_results: Path, summary: Path,
           report_files: Path, report_page: Path, roc: Path, tracking: Tracking) -> Metrics:
    """Merge the stages' metrics into the run report (``report_files``: report.md, metrics.json, config.yaml,
    selection.json and the figures), close the pipeline's parent run, and publish the report as declared outputs,
    the only files a cluster keeps: ``summary`` (Markdown), ``report_page`` (self-contained HTML) and ``roc`` (the
    released model's LiRA ROC)."""
    import functools
    import shutil

    from tckr.recipes.common import close_pipeline_run, publish_report
    from tckr.recipes.privimage.report import write_report
    from tckr.recipes.report import WORST_PAIRS

    out_dir = report_files
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(synthetic / "samples.png", out_dir / "samples.png")
    shutil.copyfile(attack_results / "roc.png", out_dir / "roc.png")
    shutil.copyfile(selection / "selection.json", out_dir / "selection.json")
    shutil.copyfile(audit_results / WORST_PAIRS, out_dir / WORST_PAIRS)
    metrics = close_pipeline_run(tracking, (ingest_metrics, pool_metrics, query_metrics, pretrain_metrics,
                                            finetune_metrics, sample_metrics, audit_metrics, fid_metrics,
                                            classifier_metrics, attack_metrics, register_metrics), out_dir,
                                 functools.partial(write_report, config))
    publish_report(out_dir, summary, report_page, roc, attack_results / "roc-privimage.csv")
    return metrics

