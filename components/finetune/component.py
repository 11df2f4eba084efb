from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def finetune(config_json: str, seed: int, tracking_uri: str, dataset: Input[Dataset],
             captions: Input[Artifact], base_model: Input[Model], adapter: Output[Model], metrics: Output[Metrics]):
    """LoRA fine-tuning on the private (image, caption) pairs; saves the adapter only."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import finetune_stage
    from tckr.tracking import default_tracking_uri

    values = finetune_stage(parse_config(config_json), seed, Path(dataset.path), Path(captions.path),
                            Path(base_model.path), Path(adapter.path), tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
