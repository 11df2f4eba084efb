from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def teacher(config_json: str, seed: int, tracking_uri: str, dataset: Input[Dataset],
            model: Output[Model], metrics: Output[Metrics]):
    """Train the teacher on the private train split (``tckr.stages.teacher_stage``), one process per GPU."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.distributed import run_stage
    from tckr.stages import teacher_stage
    from tckr.tracking import default_tracking_uri

    cfg = parse_config(config_json)
    values = run_stage(cfg, "teacher", teacher_stage, cfg, seed, Path(dataset.path), Path(model.path),
                       tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
