
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def generation_plan(config_json: str, seed: int, dataset: Input[Dataset], captions: Input[Artifact]) -> list[int]:
    """The shard numbers of the generation plan, for the ParallelFor fan-out."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import generation_shards

    return generation_shards(parse_config(config_json), seed, Path(dataset.path), Path(captions.path))
