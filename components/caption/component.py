from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def caption(config_json: str, tracking_uri: str, dataset: Input[Dataset], captions: Output[Artifact],
            metrics: Output[Metrics]):
    """Caption the private train and public splits (``tckr.stages.caption_stage``)."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import caption_stage
    from tckr.tracking import default_tracking_uri

    values = caption_stage(parse_config(config_json), Path(dataset.path), Path(captions.path),
                           tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
