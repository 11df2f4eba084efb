
from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def generate(config_json: str, seed: int, tracking_uri: str, dataset: Input[Dataset],
             captions: Input[Artifact], base_model: Input[Model], adapter: Input[Model], teacher_model: Input[Model],
             shards: Input[list[Dataset]], synthetic: Output[Dataset], metrics: Output[Metrics]):
    """Gather the fan-out's shards into the synthetic set (making any missing one, one process per GPU) and
    score it by the teacher's agreement."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.distributed import run_stage
    from tckr.stages import generate_stage
    from tckr.tracking import default_tracking_uri

    cfg = parse_config(config_json)
    values = run_stage(cfg, "generate", generate_stage, cfg, seed, Path(dataset.path), Path(captions.path),
                       Path(base_model.path), Path(adapter.path), Path(teacher_model.path), Path(synthetic.path),
                       tracking_uri or default_tracking_uri(), shard_dirs=[Path(shard.path) for shard in shards])
    for name, value in values.items():
        metrics.log_metric(name, value)
