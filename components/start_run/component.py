from kfp import dsl

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def start_run(config_json: str, run_name: str, tracking_uri: str):
    """Open the pipeline's parent MLflow run (config logged as params and config.yaml), tagged with the KFP
    run id by which every later task finds it: no task takes the parent's id, so cache keys stay stable."""
    from tckr.config import parse_config
    from tckr.tracking import default_tracking_uri, start_pipeline_run

    start_pipeline_run(parse_config(config_json), tracking_uri or default_tracking_uri(), run_name)
