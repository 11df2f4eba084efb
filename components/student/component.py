from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def student(config_json: str, seed: int, tracking_uri: str, dataset: Input[Dataset],
            synthetic: Input[Dataset], teacher_model: Input[Model], model: Output[Model], metrics: Output[Metrics]):
    """Distil the teacher into the student on the synthetic set only (``tckr.stages.student_stage``), one
    process per GPU."""
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.distributed import run_stage
    from tckr.stages import student_stage
    from tckr.tracking import default_tracking_uri

    cfg = parse_config(config_json)
    values = run_stage(cfg, "student", student_stage, cfg, seed, Path(dataset.path), Path(synthetic.path),
                       Path(teacher_model.path), Path(model.path), tracking_uri or default_tracking_uri())
    for name, value in values.items():
        metrics.log_metric(name, value)
