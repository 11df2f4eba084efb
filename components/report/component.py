from kfp import dsl
from kfp.dsl import Input, Markdown, Metrics, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def report(config_json: str, parent_run_id: str, tracking_uri: str, ingest_metrics: Input[Metrics],
           teacher_metrics: Input[Metrics], summary: Output[Markdown], metrics: Output[Metrics]):
    """Merge stage metrics into the run report and close the parent MLflow run."""
    import shutil
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import report_stage
    from tckr.tracking import default_tracking_uri

    out_dir = Path(summary.path).parent / "report"
    values = report_stage(parse_config(config_json), [ingest_metrics.metadata, teacher_metrics.metadata],
                          out_dir, parent_run_id, tracking_uri or default_tracking_uri())
    shutil.copyfile(out_dir / "report.md", summary.path)
    for name, value in values.items():
        metrics.log_metric(name, value)
