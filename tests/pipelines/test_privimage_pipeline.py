"""The PrivImage smoke profile end to end through the real kfp.local runner, the real MLflow server and S3 store:
one (epsilon, delta) for the whole run, logged live, carried into the registry, and refused when unreachable."""

import json
import math
import re

import mlflow
import pytest
import torch

from tckr.cli import main
from tckr.platform.tracking import configure
from tckr.recipes.privimage.stages import STAGES

HEADLINE_METRICS = ("privimage.epsilon", "privimage.delta", "privimage.fid", "privimage.test_accuracy",
                    "privimage.mia.auc", "privimage.aop", "privimage.selection_precision", "run.seconds")


def test_run_spends_exactly_its_target_end_to_end(privimage_smoke_run):
    cfg, outcome, _ = privimage_smoke_run
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    for key in HEADLINE_METRICS:
        assert key in metrics, key
    n = metrics["data.train_images"]
    assert metrics["privimage.delta"] == pytest.approx(1 / (n * math.log(n)))  # the stated default
    target = cfg.privacy.target_epsilon
    assert 0.99 * target <= metrics["privimage.epsilon"] <= target  # the composed epsilon, solved to the target
    assert 0 < metrics["privimage.query_epsilon"] < metrics["privimage.epsilon"]
    privacy = json.loads((outcome.artifacts / "finetune" / "generator" / "privacy.json").read_text())
    assert privacy["history"][0] == [cfg.query.sigma, 1.0, 1]  # the query is the first entry of one history
    assert privacy["history"][1][2] == metrics["privimage.dp_steps"]
    assert [row["epoch"] for row in privacy["epochs"]] == [1]
    assert privacy["epochs"][-1]["epsilon"] == pytest.approx(metrics["privimage.epsilon"])


def test_selection_is_saved_with_its_noisy_counts_and_relabels_the_public_subset(privimage_smoke_run):
    cfg, outcome, _ = privimage_smoke_run
    selection = json.loads((outcome.run_dir / "selection.json").read_text())
    classes = len(selection["chosen"])
    assert classes == 10 and all(len(chosen) == cfg.query.k for chosen in selection["chosen"])
    taken = [public for chosen in selection["chosen"] for public in chosen]
    assert len(set(taken)) == len(taken)  # a public class goes to one sensitive class only
    assert len(selection["noisy_counts"]) == classes
    assert sum(selection["per_class_images"]) == selection["selected_images"] > 0
    metrics = json.loads((outcome.run_dir / "metrics.json").read_text())
    assert metrics["privimage.selection_precision"] > metrics["privimage.selection_chance"]


def test_report_shows_privacy_and_utility_and_every_stage(privimage_smoke_run):
    _, outcome, _ = privimage_smoke_run
    report = (outcome.run_dir / "report.md").read_text()
    assert "end to end" in report and "epsilon spent" in report and "FID" in report and "AUC_MIA" in report
    assert "![LiRA ROC, log-log](roc.png)" in report and (outcome.run_dir / "roc.png").is_file()
    metrics = outcome.metrics
    assert metrics["privimage.mia.auc_ci_low"] <= metrics["privimage.mia.auc"] <= metrics["privimage.mia.auc_ci_high"]
    assert metrics["privimage.aop_ci_low"] <= metrics["privimage.aop"] <= metrics["privimage.aop_ci_high"]
    interval = r"\[\d+\.\d\d, \d+\.\d\d\]"
    assert re.search(rf"\| AUC_MIA \(%\) +\| \d+\.\d\d {interval} +\| {interval}", report)  # value, interval, null band
    for stage in ("query", "pretrain", "finetune", "audit", "fid", "classifier", "attack"):
        assert f"| {stage} " in report, stage
    # The synthetic set's audit, in both spaces, with the worst pairs beside the report.
    assert metrics["audit.synthetic_images"] == metrics["synthetic.images"]
    assert 0 <= metrics["audit.dcr_pvalue"] <= 1 and 0 <= metrics["audit.features.near_copy_pvalue"] <= 1
    assert "copy members?" in report and (outcome.run_dir / "worst-pairs.png").is_file()


def test_mlflow_runs_epsilon_per_epoch_and_registered_classifier(privimage_smoke_run):
    cfg, outcome, uri = privimage_smoke_run
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("privimage-fashion-mnist")
    runs = client.search_runs([experiment.experiment_id])
    parent, = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["tckr.recipe"] == "privimage"
    assert parent.data.metrics["privimage.epsilon"] == pytest.approx(outcome.metrics["privimage.epsilon"])
    stages = {r.data.tags["tckr.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == {stage.name for stage in STAGES if stage.tracked and stage.own_run} - {"start_run"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    finetune = stages["finetune"]
    assert finetune.data.tags["tckr.epsilon"] == f"{outcome.metrics['privimage.epsilon']:.4f}"
    assert [m.step for m in client.get_metric_history(finetune.info.run_id, "epsilon")] == [1]  # live, per epoch
    assert "selection.json" in {a.path for a in client.list_artifacts(stages["query"].info.run_id)}

    name = "privimage-fashion-mnist-classifier"
    version, = client.search_model_versions(f"name = '{name}'")
    assert float(version.tags["epsilon"]) == pytest.approx(outcome.metrics["privimage.epsilon"], abs=1e-4)
    assert float(version.tags["delta"]) == pytest.approx(outcome.metrics["privimage.delta"], rel=1e-2)
    assert version.tags["selected_on"] == "synthetic"
    configure(uri)
    from tckr.data.images import ImageSplit
    from tckr.data.ingest import load_prepared

    splits, info = load_prepared(outcome.artifacts / "ingest" / "data")
    test = ImageSplit(splits["test"], cfg.image_size, info.channels)
    images = torch.stack([test[i][0] for i in range(len(test))]).float() / 255
    model = mlflow.pytorch.load_model(f"models:/{name}@champion")
    accuracy = (model(images).argmax(1) == test.labels).float().mean().item()
    assert accuracy == pytest.approx(outcome.metrics["privimage.test_accuracy"], abs=1e-4)


def test_report_puts_both_recipes_side_by_side(smoke_run, privimage_smoke_run, tmp_path, capsys):
    _, tckr_outcome, _ = smoke_run
    _, privimage_outcome, _ = privimage_smoke_run
    out = tmp_path / "comparison.md"
    assert main(["report", str(tckr_outcome.run_dir), str(privimage_outcome.run_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == out.read_text().strip()
    for row in ("TCKR teacher (real data)", "TCKR student", "PrivImage classifier"):
        assert row in printed, row
    assert "inf (no DP)" in printed and f"{privimage_outcome.metrics['privimage.epsilon']:.2f}" in printed
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a finished tckr run" in capsys.readouterr().err


def test_a_budget_the_run_cannot_meet_is_refused_before_the_query_reads_private_data(privimage_smoke_run, tmp_path,
                                                                                     capsys):
    """Too many DP-SGD steps for the target: `tckr stage query` exits 2 naming the problem, writing nothing."""
    _, outcome, _ = privimage_smoke_run
    kfp_dir = outcome.artifacts
    selection = tmp_path / "selection"
    budget = ["privacy.target_epsilon=0.5", "query.sigma=1000", "privacy.max_noise_multiplier=2"]
    code = main(["stage", "query", "--profile", "smoke-privimage", *(f"--set={item}" for item in budget),
                 "--data", str(kfp_dir / "ingest" / "data"), "--public", str(kfp_dir / "public-pool" / "public"),
                 "--selection", str(selection)])
    assert code == 2
    error = capsys.readouterr().err
    assert "target epsilon 0.5" in error and "noise multiplier above 2" in error and "train fewer epochs" in error
    assert not (selection / "selection.json").exists()
