from kfp import dsl

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def start_run(config_json: str, run_name: str, tracking_uri: str) -> str:
    """Open the pipeline's parent MLflow run (config logged as params and config.yaml); return its id."""
    from tckr.config import parse_config
    from tckr.tracking import default_tracking_uri, start_pipeline_run

    return start_pipeline_run(parse_config(config_json), tracking_uri or default_tracking_uri(), run_name)
