from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def generator(config_json: str, seed: int, tracking_uri: str, dataset: Input[Dataset],
              captions: Input[Artifact], base_model: Output[Model], metrics: Output[Metrics]):
    """The base text-to-image generator, from the cache or pretrained on public data."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import generator_stage
    from tckr.tracking import default_tracking_uri

    values = generator_stage(parse_config(config_json), seed, Path(dataset.path), Path(captions.path),
                             Path(base_model.path), tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
