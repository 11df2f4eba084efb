from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def shadow_group(config_json: str, seed: int, group: int, dataset: Input[Dataset], shadows: Output[Model]):
    """One group of LiRA shadow models, trained together (one task of the fan-out), split over its GPUs."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.distributed import run_stage
    from tckr.stages import shadow_group_stage

    cfg = parse_config(config_json)
    run_stage(cfg, "shadow_group", shadow_group_stage, cfg, seed, int(group), Path(dataset.path),
              Path(shadows.path))
