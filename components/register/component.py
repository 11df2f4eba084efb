from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def register(config_json: str, tracking_uri: str, teacher_model: Input[Model],
             student_model: Input[Model], teacher_metrics: Input[Metrics], student_metrics: Input[Metrics],
             attack_metrics: Input[Metrics], metrics: Output[Metrics]):
    """AOP of teacher and student, then both into the MLflow registry (``tckr.stages.register_stage``)."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import register_stage
    from tckr.tracking import default_tracking_uri

    values = register_stage(parse_config(config_json),
                            {"teacher": Path(teacher_model.path), "student": Path(student_model.path)},
                            [teacher_metrics.metadata, student_metrics.metadata, attack_metrics.metadata],
                            tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
