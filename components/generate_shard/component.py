from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def generate_shard(config_json: str, seed: int, shard: int, dataset: Input[Dataset], captions: Input[Artifact],
                   base_model: Input[Model], adapter: Input[Model], images: Output[Dataset]):
    """One shard of the synthetic set (one task of the fan-out), one process per GPU."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.distributed import run_stage
    from tckr.stages import generate_shard_stage

    cfg = parse_config(config_json)
    run_stage(cfg, "generate_shard", generate_shard_stage, cfg, seed, int(shard), Path(dataset.path),
              Path(captions.path), Path(base_model.path), Path(adapter.path), Path(images.path))
