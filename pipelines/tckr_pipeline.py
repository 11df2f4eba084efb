"""The TCKR recipe as a KFP v2 pipeline. Stages land here as they are built:
ingest -> teacher -> report (caption, LoRA, generation, student and attack follow)."""

from kfp import dsl

from tckr.components.ingest import ingest
from tckr.components.report import report
from tckr.components.start_run import start_run
from tckr.components.teacher import teacher


@dsl.pipeline(name="tckr", description="TCKR: private images -> synthetic data -> distilled student, "
              "with utility and privacy measured")
def tckr_pipeline(config_json: str, run_name: str, tracking_uri: str = "", ingest_seed: int = 0,
                  teacher_seed: int = 0) -> dsl.Markdown:
    """``config_json``: the resolved ``TckrConfig``; seeds are explicit so cluster caching keys on them."""
    parent = start_run(config_json=config_json, run_name=run_name, tracking_uri=tracking_uri)
    parent.set_caching_options(False)  # a new parent run per pipeline run
    data = ingest(config_json=config_json, seed=ingest_seed, parent_run_id=parent.output,
                  tracking_uri=tracking_uri)
    trained = teacher(config_json=config_json, seed=teacher_seed, parent_run_id=parent.output,
                      tracking_uri=tracking_uri, dataset=data.outputs["dataset"])
    summary = report(config_json=config_json, parent_run_id=parent.output, tracking_uri=tracking_uri,
                     ingest_metrics=data.outputs["metrics"], teacher_metrics=trained.outputs["metrics"])
    summary.set_caching_options(False)
    return summary.outputs["summary"]
