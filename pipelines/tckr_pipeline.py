"""The TCKR recipe as a KFP v2 pipeline:
ingest -> {teacher, caption} -> generator -> LoRA fine-tune -> generate (ParallelFor over shards)
-> student (GKD) -> attack (LiRA, ParallelFor over shadow groups) -> register (AOP, champion) -> report.

Resources, GPUs and credentials are compile-time settings in KFP: ``build_pipeline`` bakes a
``kubernetes:`` config section into the graph (``tckr compile|submit --profile``). ``tckr_pipeline``
carries the default section (the paper profile on GPU nodes); it is the committed YAML and what
``tckr run`` executes through kfp.local, which ignores these settings.
"""

import functools

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from tckr.components.attack import attack
from tckr.components.caption import caption
from tckr.components.finetune import finetune
from tckr.components.generate import generate
from tckr.components.generate_shard import generate_shard
from tckr.components.generation_plan import generation_plan
from tckr.components.generator import generator
from tckr.components.ingest import ingest
from tckr.components.register import register
from tckr.components.report import report
from tckr.components.shadow_group import shadow_group
from tckr.components.shadow_plan import shadow_plan
from tckr.components.start_run import start_run
from tckr.components.student import student
from tckr.components.teacher import teacher
from tckr.config import KubernetesConfig
from tckr.pipelines.cluster import place_all_tasks


def tckr_graph(config_json: str, run_name: str, tracking_uri: str = "", ingest_seed: int = 0,
               teacher_seed: int = 0, generator_seed: int = 0, finetune_seed: int = 420,
               generate_seed: int = 0, student_seed: int = 0, attack_seed: int = 0) -> dsl.Markdown:
    """``config_json``: the resolved ``TckrConfig``; seeds are explicit so cluster caching keys on them.

    ``run_name`` (new every run) reaches only ``start_run``, which is never cached. The tasks that log to
    MLflow find its parent run by the KFP run id (``tckr.tracking.pipeline_run_id``), so they only run
    ``.after`` it: taking its id as an input would give them a new cache key every run."""
    common = {"config_json": config_json, "tracking_uri": tracking_uri}
    parent = start_run(run_name=run_name, **common)
    parent.set_caching_options(False)  # a new parent run per pipeline run
    data = ingest(seed=ingest_seed, **common).after(parent)
    trained = teacher(seed=teacher_seed, dataset=data.outputs["dataset"], **common).after(parent)
    captioned = caption(dataset=data.outputs["dataset"], **common).after(parent)
    base = generator(seed=generator_seed, dataset=data.outputs["dataset"], captions=captioned.outputs["captions"],
                     **common).after(parent)
    tuned = finetune(seed=finetune_seed, dataset=data.outputs["dataset"], captions=captioned.outputs["captions"],
                     base_model=base.outputs["base_model"], **common).after(parent)
    inputs = {"dataset": data.outputs["dataset"], "captions": captioned.outputs["captions"],
              "base_model": base.outputs["base_model"], "adapter": tuned.outputs["adapter"]}
    plan = generation_plan(config_json=config_json, seed=generate_seed, dataset=data.outputs["dataset"],
                           captions=captioned.outputs["captions"])
    with dsl.ParallelFor(plan.output, name="shards") as shard:  # one task (pod) per shard
        shard_task = generate_shard(config_json=config_json, seed=generate_seed, shard=shard, **inputs)
    synthetic = generate(seed=generate_seed, teacher_model=trained.outputs["model"],
                         shards=dsl.Collected(shard_task.outputs["images"]), **inputs, **common).after(parent)
    distilled = student(seed=student_seed, dataset=data.outputs["dataset"], synthetic=synthetic.outputs["synthetic"],
                        teacher_model=trained.outputs["model"], **common).after(parent)
    groups = shadow_plan(config_json=config_json)
    with dsl.ParallelFor(groups.output, name="shadow-groups") as group:  # one task (pod) per group of shadows
        shadow_task = shadow_group(config_json=config_json, seed=attack_seed, group=group,
                                   dataset=data.outputs["dataset"])
    attacked = attack(seed=attack_seed, dataset=data.outputs["dataset"], teacher_model=trained.outputs["model"],
                      student_model=distilled.outputs["model"], shadows=dsl.Collected(shadow_task.outputs["shadows"]),
                      **common).after(parent)
    registered = register(teacher_model=trained.outputs["model"], student_model=distilled.outputs["model"],
                          teacher_metrics=trained.outputs["metrics"], student_metrics=distilled.outputs["metrics"],
                          attack_metrics=attacked.outputs["metrics"], **common).after(parent)
    registered.set_caching_options(False)  # registering twice makes two versions: only on purpose
    summary = report(ingest_metrics=data.outputs["metrics"], teacher_metrics=trained.outputs["metrics"],
                     caption_metrics=captioned.outputs["metrics"], generator_metrics=base.outputs["metrics"],
                     finetune_metrics=tuned.outputs["metrics"], generate_metrics=synthetic.outputs["metrics"],
                     student_metrics=distilled.outputs["metrics"], attack_metrics=attacked.outputs["metrics"],
                     register_metrics=registered.outputs["metrics"], synthetic=synthetic.outputs["synthetic"],
                     attack_results=attacked.outputs["results"], **common).after(parent)
    summary.set_caching_options(False)
    return summary.outputs["summary"]


def build_pipeline(cluster: KubernetesConfig) -> GraphComponent:
    """The TCKR graph with every task placed by ``cluster`` (resources, GPU, image, secrets)."""

    @functools.wraps(tckr_graph)
    def placed(*args, **kwargs) -> dsl.Markdown:
        summary = tckr_graph(*args, **kwargs)
        place_all_tasks(cluster)
        return summary

    return dsl.pipeline(name="tckr", description="TCKR: private images -> synthetic data -> distilled student, "
                        "with utility and privacy measured")(placed)


tckr_pipeline = build_pipeline(KubernetesConfig())
