from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Output

from tckr.components import IMAGE


@dsl.component(base_image=IMAGE)
def report(config_json: str, tracking_uri: str, ingest_metrics: Input[Metrics],
           teacher_metrics: Input[Metrics], caption_metrics: Input[Metrics], generator_metrics: Input[Metrics],
           finetune_metrics: Input[Metrics], generate_metrics: Input[Metrics], student_metrics: Input[Metrics],
           attack_metrics: Input[Metrics], register_metrics: Input[Metrics], synthetic: Input[Dataset],
           attack_results: Input[Artifact], summary: Output[Markdown], metrics: Output[Metrics]):
    """Merge stage metrics into the run report and close the parent MLflow run."""
    import shutil
    from pathlib import Path

    from tckr.config import parse_config
    from tckr.stages import report_stage
    from tckr.tracking import default_tracking_uri

    out_dir = Path(summary.path).parent / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(synthetic.path) / "samples.png", out_dir / "samples.png")
    shutil.copyfile(Path(attack_results.path) / "roc.png", out_dir / "roc.png")
    parts = [ingest_metrics, teacher_metrics, caption_metrics, generator_metrics, finetune_metrics, generate_metrics,
             student_metrics, attack_metrics, register_metrics]
    values = report_stage(parse_config(config_json), [part.metadata for part in parts], out_dir,
                          tracking_uri or default_tracking_uri())
    shutil.copyfile(out_dir / "report.md", summary.path)
    for name, value in values.items():
        metrics.log_metric(name, value)
