"""The TCKR recipe as a KFP v2 pipeline:
ingest -> {teacher, caption} -> generator -> LoRA fine-tune -> generate (ParallelFor over shards)
-> {audit (DCR), fid, student (GKD)}; {negative control (public data), positive control (GKD on the members)}
-> attack (LiRA and RMIA, ParallelFor over shadow groups) -> register (AOP, champion) -> report.

Only the wiring is here: each task's sections, tracking parameters and caching come from its stage's
declaration (``tckr.recipes.tckr.stages``), resources and placement from the ``kubernetes:`` section.
"""

from __future__ import annotations

from kfp import dsl

from tckr.pipelines.build import Tasks


def tckr_graph(task: Tasks) -> None:
    """The tasks that log to MLflow find the parent run by the KFP run id (``tckr.platform.tracking``), so
    they only run ``.after`` it: taking its id as an input would give them a new cache key every run."""
    parent = task("start_run")
    ingested = task("ingest").after(parent)
    data = ingested.outputs["data"]
    trained = task("teacher", data=data).after(parent)
    captioned = task("caption", data=data).after(parent)
    captions = captioned.outputs["captions"]
    base = task("generator", data=data, captions=captions).after(parent)
    tuned = task("finetune", data=data, captions=captions, base_model=base.outputs["base_model"]).after(parent)
    # A shard's pod gets the caption text and the two models, never the private dataset.
    model_inputs = {"captions": captions, "base_model": base.outputs["base_model"], "adapter": tuned.outputs["adapter"]}
    plan = task("generation_plan", captions=captions)
    # One task (pod) per shard, at most kubernetes.parallelism at once; likewise one per group of shadows.
    with dsl.ParallelFor(plan.output, name="shards", parallelism=task.parallelism) as shard:
        shard_task = task("generate_shard", shard=shard, **model_inputs)
    synthetic = task("generate", data=data, teacher_model=trained.outputs["model"],
                     shards=dsl.Collected(shard_task.outputs["images"]), **model_inputs).after(parent)
    audited = task("audit", data=data, synthetic=synthetic.outputs["synthetic"]).after(parent)
    scored = task("fid", data=data, synthetic=synthetic.outputs["synthetic"]).after(parent)
    distilled = task("student", data=data, synthetic=synthetic.outputs["synthetic"],
                     teacher_model=trained.outputs["model"]).after(parent)
    negative = task("negative_control", data=data).after(parent)
    positive = task("positive_control", data=data, teacher_model=trained.outputs["model"]).after(parent)
    groups = task("shadow_plan")
    with dsl.ParallelFor(groups.output, name="shadow-groups", parallelism=task.parallelism) as group:
        shadow_task = task("shadow_group", group=group, data=data)
    attacked = task("attack", data=data, teacher_model=trained.outputs["model"],
                    student_model=distilled.outputs["model"], negative_control_model=negative.outputs["model"],
                    positive_control_model=positive.outputs["model"],
                    shadows=dsl.Collected(shadow_task.outputs["shadows"])).after(parent)
    registered = task("register", teacher_model=trained.outputs["model"], student_model=distilled.outputs["model"],
                      teacher_metrics=trained.outputs["metrics"], student_metrics=distilled.outputs["metrics"],
                      attack_metrics=attacked.outputs["metrics"]).after(parent)
    task("report", ingest_metrics=ingested.outputs["metrics"], teacher_metrics=trained.outputs["metrics"],
         caption_metrics=captioned.outputs["metrics"], generator_metrics=base.outputs["metrics"],
         finetune_metrics=tuned.outputs["metrics"], generate_metrics=synthetic.outputs["metrics"],
         audit_metrics=audited.outputs["metrics"], fid_metrics=scored.outputs["metrics"],
         student_metrics=distilled.outputs["metrics"], negative_control_metrics=negative.outputs["metrics"],
         positive_control_metrics=positive.outputs["metrics"], attack_metrics=attacked.outputs["metrics"],
         register_metrics=registered.outputs["metrics"], synthetic=synthetic.outputs["synthetic"],
         audit_results=audited.outputs["results"], attack_results=attacked.outputs["results"]).after(parent)


DESCRIPTION = "TCKR: private images -> synthetic data -> distilled student, with utility and privacy measured"
