from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def attack(config_json: str, seed: int, tracking_uri: str, dataset: Input[Dataset], teacher_model: Input[Model],
           student_model: Input[Model], shadows: Input[list[Model]], results: Output[Artifact],
           metrics: Output[Metrics]):
    """LiRA against teacher and student with the fan-out's shadows (``tckr.stages.attack_stage``)."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import attack_stage
    from tckr.tracking import default_tracking_uri

    values = attack_stage(parse_config(config_json), seed, Path(dataset.path), Path(teacher_model.path),
                          Path(student_model.path), Path(results.path), tracking_uri or default_tracking_uri(),
                          shadow_dirs=[Path(s.path) for s in shadows])
    for name, value in values.items():
        metrics.log_metric(name, value)
