from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def ingest(config_json: str, seed: int, tracking_uri: str, dataset: Output[Dataset], metrics: Output[Metrics]):
    """Load, validate and split the private dataset (``tckr.stages.ingest_stage``)."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import ingest_stage
    from tckr.tracking import default_tracking_uri

    values = ingest_stage(parse_config(config_json), seed, Path(dataset.path), tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
