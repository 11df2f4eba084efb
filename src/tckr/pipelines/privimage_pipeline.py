"""The PrivImage recipe as a KFP v2 pipeline:
ingest -> public pool -> DP semantic query -> pretrain (public) -> DP-SGD fine-tune -> sample (ParallelFor over
shards) -> {audit (DCR), FID, downstream classifier} -> attack (LiRA, ParallelFor over shadow groups) -> register
-> report.

Only the wiring is here: each task's sections, tracking parameters and caching come from its stage's
declaration (``tckr.recipes.privimage.stages``), resources and placement from the ``kubernetes:`` section.
"""

from __future__ import annotations

from kfp import dsl

from tckr.pipelines.build import Tasks


def privimage_graph(task: Tasks) -> None:
    """Tasks that log to MLflow run ``.after`` the parent run (see ``tckr_pipeline.tckr_graph``)."""
    parent = task("start_run")
    ingested = task("ingest").after(parent)
    data = ingested.outputs["data"]
    pool = task("public_pool", data=data).after(parent)
    public = pool.outputs["public"]
    queried = task("query", data=data, public=public).after(parent)
    selection = queried.outputs["selection"]
    base = task("pretrain", data=data, public=public, selection=selection).after(parent)
    tuned = task("finetune", data=data, selection=selection, base_model=base.outputs["base_model"]).after(parent)
    generator = tuned.outputs["generator"]
    plan = task("sample_plan", generator=generator)
    # One task (pod) per shard, at most kubernetes.parallelism at once; likewise one per group of shadows. A shard's
    # pod gets the fine-tuned generator, never the private dataset.
    with dsl.ParallelFor(plan.output, name="shards", parallelism=task.parallelism) as shard:
        shard_task = task("sample_shard", shard=shard, generator=generator)
    sampled = task("sample", generator=generator,
                   shards=dsl.Collected(shard_task.outputs["images"])).after(parent)
    synthetic = sampled.outputs["synthetic"]
    audited = task("audit", data=data, synthetic=synthetic).after(parent)
    scored = task("fid", data=data, synthetic=synthetic).after(parent)
    trained = task("classifier", data=data, synthetic=synthetic).after(parent)
    groups = task("shadow_plan")
    with dsl.ParallelFor(groups.output, name="shadow-groups", parallelism=task.parallelism) as group:
        shadow_task = task("shadow_group", group=group, data=data)
    attacked = task("attack", data=data, model=trained.outputs["model"],
                    shadows=dsl.Collected(shadow_task.outputs["shadows"])).after(parent)
    registered = task("register", model=trained.outputs["model"], classifier_metrics=trained.outputs["metrics"],
                      finetune_metrics=tuned.outputs["metrics"],
                      attack_metrics=attacked.outputs["metrics"]).after(parent)
    task("report", ingest_metrics=ingested.outputs["metrics"], pool_metrics=pool.outputs["metrics"],
         query_metrics=queried.outputs["metrics"], pretrain_metrics=base.outputs["metrics"],
         finetune_metrics=tuned.outputs["metrics"], sample_metrics=sampled.outputs["metrics"],
         audit_metrics=audited.outputs["metrics"], fid_metrics=scored.outputs["metrics"],
         classifier_metrics=trained.outputs["metrics"],
         attack_metrics=attacked.outputs["metrics"], register_metrics=registered.outputs["metrics"],
         synthetic=synthetic, selection=selection, audit_results=audited.outputs["results"],
         attack_results=attacked.outputs["results"]).after(parent)


DESCRIPTION = ("PrivImage: DP semantic query -> public-subset pretraining -> DP-SGD diffusion fine-tuning -> "
               "synthetic data and a classifier under one end-to-end (epsilon, delta)")
