"""The smoke profile end to end through the real kfp.local runner, a real MLflow server (sqlite backend)
and its artifacts in a real SeaweedFS S3 store."""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from tckr.cli import main
from tckr.core.seeds import section_seed
from tckr.pipelines.compile import compile_committed, local_pipeline
from tckr.platform.runner import run_local
from tckr.platform.tracking import configure
from tckr.recipes.config import load_config
from tests.faults.processes import kill_after, start, wait_for


def test_run_directory(smoke_run):
    cfg, outcome, _ = smoke_run
    run_dir = outcome.run_dir
    assert (run_dir.parent / "latest").resolve() == run_dir
    assert {"config.yaml", "report.md", "metrics.json", "samples.png", "roc.png"} <= {p.name for p in run_dir.iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("teacher.test_accuracy", "teacher.val_accuracy", "stage.ingest.seconds",
                "stage.teacher.seconds", "run.seconds", "data.train_images", "caption.train_distinct",
                "generator.cached", "finetune.final_loss", "synthetic.images", "synthetic.teacher_agreement",
                "stage.generate.seconds", "synthetic.fid", "student.test_accuracy", "teacher.mia.auc",
                "student.mia.auc", "teacher.mia.tpr_at_1pct_fpr", "student.mia.tpr_at_0.1pct_fpr", "teacher.aop",
                "student.aop", "stage.student.seconds", "stage.attack.seconds"):
        assert key in metrics, key
    assert 0.0 <= metrics["teacher.test_accuracy"] <= 1.0
    assert metrics["data.test_images"] == cfg.ingest.test_limit
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["profile"] == "smoke"
    # The report's ROC is a ClassificationMetrics artifact (drawn by the KFP UI), its page an HTML artifact.
    (report_task,) = outcome.artifacts.rglob("report/executor_output.json")
    outputs = json.loads(report_task.read_text())["artifacts"]
    assert outputs["roc"]["artifacts"][0]["metadata"]["confidenceMetrics"][-1]["falsePositiveRate"] <= 1.0
    assert (report_task.parent / "report_page").read_text().startswith("<!doctype html>")
    report = (run_dir / "report.md").read_text()
    assert "| teacher" in report and "test_accuracy=" in report and cfg.fingerprint() in report
    assert "![synthetic samples per class](samples.png)" in report and "![LiRA ROC, log-log](roc.png)" in report
    assert re.search(r"\| model +\| Accuracy +\| AUC_MIA +\| TPR@0.1%FPR +\| TPR@1%FPR +\| AOP", report)
    assert re.search(r"\| null band \(no leak\) +\| - +\| \[4\d\.\d\d, 5\d\.\d\d\]", report)
    assert "indistinguishable from chance" in report or "above chance" in report
    # ratio 0.1 x 300 private images = 30 -> 3 per class
    assert metrics["synthetic.images"] == 30 and 0.0 <= metrics["synthetic.teacher_agreement"] <= 1.0
    # 30 images in shards of 16: two ParallelFor tasks made them, the gathering stage none.
    assert metrics["synthetic.shards"] == metrics["synthetic.shards_gathered"] == 2
    assert metrics["synthetic.shards_generated_here"] == 0
    assert metrics["stage.generate_shards.seconds"] > 0 and "| generate_shards" in report
    assert metrics["caption.train_images"] == metrics["data.train_images"]
    # 4 shadows in groups of 2: the two ParallelFor tasks trained them all, the attack none.
    assert metrics["attack.shadows"] == 4 and metrics["attack.shadows_trained_here"] == 0
    assert metrics["attack.population"] == 2 * min(metrics["data.train_images"], metrics["data.holdout_images"])
    for role in ("teacher", "student"):
        auc = metrics[f"{role}.mia.auc"]
        expected_aop = metrics[f"{role}.test_accuracy"] * (0.5 / max(auc, 1 - auc)) ** 2
        assert metrics[f"{role}.aop"] == pytest.approx(expected_aop)
        for figure in ("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr", "balanced_accuracy"):
            key = f"{role}.mia.{figure}"
            assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
        assert metrics[f"{role}.aop_ci_low"] <= metrics[f"{role}.aop"] <= metrics[f"{role}.aop_ci_high"]
    assert metrics["delta.mia.auc_ci_low"] <= metrics["student.mia.auc"] - metrics["teacher.mia.auc"] \
        <= metrics["delta.mia.auc_ci_high"]
    assert metrics["attack.null.auc_low"] < 0.5 < metrics["attack.null.auc_high"]
    assert metrics["student.rmia.auc_ci_low"] <= metrics["student.rmia.auc"] <= metrics["student.rmia.auc_ci_high"]
    assert "delta.rmia.auc_ci_low" in metrics and "| student (RMIA)" in report
    assert metrics["attack.sigma_shared"] > 0


def test_the_attack_is_calibrated_by_its_controls(smoke_run):
    """Both controls are trained and attacked like the targets, with intervals, and explained in the report; the
    negative control (public data only) trained on no member, the positive one on the members themselves."""
    _, outcome, _ = smoke_run
    metrics, report = outcome.metrics, (outcome.run_dir / "report.md").read_text()
    for role, name in (("negative_control", "negative control"), ("positive_control", "positive control")):
        assert 0.0 < metrics[f"{role}.test_accuracy"] <= 1.0 and metrics[f"stage.{role}.seconds"] > 0
        for attack in ("mia", "rmia"):
            key = f"{role}.{attack}.auc"
            assert metrics[f"{key}_ci_low"] <= metrics[key] <= metrics[f"{key}_ci_high"], key
        assert f"| {name} (LiRA)" in report and f"| {name} (RMIA)" in report and f"| {role}" in report
    assert "Controls: the negative control" in report


def test_attack_outputs(smoke_run):
    _, outcome, _ = smoke_run
    attack_dir = outcome.artifacts / "attack" / "results"
    summary = json.loads((attack_dir / "attack.json").read_text())
    assert summary["variant"] == "online" and summary["members"] == summary["non_members"]
    assert summary["targets"]["student.mia"]["auc"] == pytest.approx(outcome.metrics["student.mia.auc"])
    rows = (attack_dir / "scores.csv").read_text().splitlines()
    assert rows[0] == ("split,row,label,member,teacher,teacher-rmia,student,student-rmia,negative_control,"
                       "negative_control-rmia,positive_control,positive_control-rmia")
    assert len(rows) == 1 + summary["members"] * 2
    assert summary["targets"]["student.rmia"]["auc"] == pytest.approx(outcome.metrics["student.rmia.auc"])
    assert 0 < summary["rmia_references"] == outcome.metrics["attack.rmia_references"]
    assert (attack_dir / "roc-student-rmia.csv").is_file()
    roc = (attack_dir / "roc-teacher.csv").read_text().splitlines()
    assert roc[0] == "fpr,tpr,threshold" and roc[1] == "0.0,0.0,inf" and roc[-1].startswith("1.0,1.0,")


def test_synthetic_set_is_audited(smoke_run):
    """Every synthetic image against as many members as holdout images, in pixels and ImageNet features."""
    cfg, outcome, _ = smoke_run
    metrics = outcome.metrics
    audit_dir = outcome.artifacts / "audit" / "results"
    assert metrics["audit.synthetic_images"] == metrics["synthetic.images"]
    assert metrics["audit.references"] == min(metrics["data.train_images"], metrics["data.holdout_images"])
    for prefix in ("audit.", "audit.features."):
        assert 0 <= metrics[prefix + "closer_to_train_share"] <= 1 and 0 < metrics[prefix + "dcr_pvalue"] <= 1
        assert metrics[prefix + "near_copy_threshold"] > 0 and metrics[prefix + "flagged"] in (0.0, 1.0)
        assert min(metrics[prefix + "dcr_train_median"], metrics[prefix + "dcr_holdout_median"]) > 0
    rows = (audit_dir / "dcr.csv").read_text().splitlines()
    assert rows[0].startswith("synthetic_row,dcr_train_pixels,dcr_holdout_pixels,train_row_pixels,holdout_row_pixels,")
    assert len(rows) == 1 + metrics["synthetic.images"]
    report = (outcome.run_dir / "report.md").read_text()
    assert re.search(r"\| pixels \(RMS difference\) +\| \d\.\d{4} +\| \d\.\d{4} +\|", report)
    assert "](worst-pairs.png)" in report and (outcome.run_dir / "worst-pairs.png").is_file()
    assert json.loads((audit_dir / "audit.json").read_text())["config"] == cfg.audit.model_dump(mode="json")


def test_base_generator_is_cached(smoke_run, tmp_path):
    """A second run with the same generator settings and public data reuses the pretrained weights."""
    from tckr.platform.tracking import Tracking
    from tckr.recipes.invoke import invoke, sections_of
    from tckr.recipes.tckr.stages import STAGES

    cfg, outcome, _ = smoke_run  # (the generator may come from the cache already: the DVC test runs first)
    kfp_dir = outcome.artifacts
    metrics = invoke(STAGES["generator"], sections_of(cfg, STAGES["generator"]),
                     {"data": kfp_dir / "ingest" / "data", "captions": kfp_dir / "caption" / "captions",
                      "base_model": tmp_path / "again"}, {},
                     Tracking(f"sqlite:///{tmp_path / 'mlruns.db'}", cfg.experiment_name))
    assert metrics["generator.cached"] == 1
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (kfp_dir / "generator" / "base_model" / weights).read_bytes()


STAGE_RUNS = ("ingest", "teacher", "caption", "generator", "finetune", "generate", "audit", "fid", "student",
              "negative_control", "positive_control", "attack", "register")  # a run's stage runs, one each


def test_mlflow_parent_and_stage_runs(smoke_run):
    cfg, outcome, uri = smoke_run
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("tckr-fashion-mnist")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tckr.config_hash"] == cfg.fingerprint()
    assert parent.data.params["teacher.model"] == cfg.teacher.model
    assert parent.data.metrics["teacher.test_accuracy"] == pytest.approx(outcome.metrics["teacher.test_accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "report.md", "metrics.json"} <= artifacts

    stages = {r.data.tags["tckr.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(stages) == sorted(STAGE_RUNS)
    assert all(r.info.status == "FINISHED" for r in stages.values())
    teacher = stages["teacher"]
    assert teacher.data.params["teacher.epochs"] == str(cfg.teacher.epochs)  # its sections, by dotted name
    assert teacher.data.params["image_size"] == str(cfg.image_size) and "attack.shadows" not in teacher.data.params
    history = client.get_metric_history(teacher.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, cfg.teacher.epochs + 1))
    shadows = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stages["attack"].info.run_id]
    assert sorted(r.info.run_name for r in shadows) == [f"shadow-{i:03d}" for i in range(cfg.attack.shadows)]
    assert all(r.info.status == "FINISHED" and "out_accuracy" in r.data.metrics for r in shadows)


def test_mlflow_shows_each_models_data_figures_and_description(smoke_run):
    """What a user browsing MLflow comes for: which data each model saw (name, content digest, size, what for),
    the synthetic samples and the attack's ROC as images, and a registry description that says what the model is
    worth and leaks."""
    cfg, outcome, uri = smoke_run
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    info = json.loads((outcome.artifacts / "ingest" / "data" / "dataset.json").read_text())
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    runs = {r.data.tags.get("tckr.stage"): r for r in client.search_runs([experiment.experiment_id])}

    def inputs(stage: str) -> dict[str, tuple[str, str, str]]:
        """Dataset name -> (digest, context, images) of a stage run's inputs."""
        found = {}
        for used in runs[stage].inputs.dataset_inputs:
            tags = {tag.key: tag.value for tag in used.tags}
            found[used.dataset.name] = (used.dataset.digest, tags["mlflow.data.context"], tags["images"])
        return found

    split = {name: (info["split_fingerprints"][name], info["splits"][name]["count"]) for name in info["splits"]}
    assert inputs("teacher") == {f"fashion-mnist/{name}": (split[name][0], context, str(split[name][1]))
                                 for name, context in (("train", "training"), ("validation", "validation"),
                                                       ("test", "test"))}
    # The controls: the negative one trained on public images only (no split the attack's population comes from),
    # the positive one on the members.
    members = split["train"][1]
    assert inputs("negative_control") == {
        f"fashion-mnist/public[:{members}]": (split["public"][0], "training", str(members)),
        **{f"fashion-mnist/{name}": (split[name][0], name, str(split[name][1])) for name in ("validation", "test")}}
    assert inputs("positive_control")["fashion-mnist/train"] == (split["train"][0], "training", str(members))
    synthetic = outcome.artifacts / "generate" / "synthetic"
    manifest_digest = hashlib.sha256((synthetic / "manifest.jsonl").read_bytes()).hexdigest()[:16]
    assert inputs("student")["fashion-mnist/synthetic-tckr"] == (manifest_digest, "training",
                                                                 str(int(outcome.metrics["synthetic.images"])))
    assert set(inputs("ingest")) == {f"fashion-mnist/{name}" for name in info["splits"]}

    def artifacts(stage: str, path: str = "") -> set[str]:
        return {a.path for a in client.list_artifacts(runs[stage].info.run_id, path)}

    assert "roc.png" in artifacts("attack")
    for role in ("teacher", "student"):  # each target's own curve beside the model, on the page the registry links
        assert "mia/roc.png" in artifacts(role, "mia")
    assert any(path.startswith("images/synthetic_samples") for path in artifacts("generate", "images"))

    champion = client.get_model_version_by_alias("tckr-fashion-mnist-student", "champion")
    assert champion.run_id == runs["student"].info.run_id
    for figure in (f"test accuracy {champion.tags['accuracy']}", f"LiRA AUC {champion.tags['auc_mia']}",
                   f"AOP {champion.tags['aop']}", "fashion-mnist", "tckr recipe"):
        assert figure in champion.description


def test_registered_student_serves_from_its_signature_in_a_fresh_process(smoke_run):
    """A teammate's process, not this one: load the champion by alias through pyfunc, check its signature and
    predict the real test split (float images in [0, 1], the signature's input): the accuracy logged."""
    cfg, outcome, uri = smoke_run
    data = outcome.artifacts / "ingest" / "data"
    script = f"""
import json, sys
import mlflow, numpy as np
from tckr.data.images import ImageSplit
from tckr.data.ingest import load_prepared

mlflow.set_tracking_uri({uri!r})
model = mlflow.pyfunc.load_model("models:/tckr-fashion-mnist-student@champion")
signature = model.metadata.signature
splits, info = load_prepared({str(data)!r})
test = ImageSplit(splits["test"], {cfg.image_size}, info.channels)
batch = np.stack([test[i][0].numpy() for i in range(len(test))]).astype(np.float32) / 255
logits = np.asarray(model.predict(batch))
accuracy = float((logits.argmax(1) == np.asarray(test.labels)).mean())
print(json.dumps({{"inputs": signature.inputs.to_dict(), "shape": list(logits.shape), "accuracy": accuracy}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")})
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    (tensor,) = served["inputs"]
    assert tensor["type"] == "tensor" and tensor["tensor-spec"]["dtype"] == "float32"
    assert tensor["tensor-spec"]["shape"] == [-1, 1, cfg.image_size, cfg.image_size]
    assert served["shape"] == [int(outcome.metrics["data.test_images"]), 10]
    assert served["accuracy"] == pytest.approx(outcome.metrics["student.test_accuracy"], abs=1e-4)


def test_teacher_and_student_registered_and_loadable(smoke_run):
    cfg, outcome, uri = smoke_run
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    configure(uri)
    from tckr.data.images import ImageSplit
    from tckr.data.ingest import load_prepared

    splits, info = load_prepared(outcome.artifacts / "ingest" / "data")
    test = ImageSplit(splits["test"], cfg.image_size, info.channels)
    images = torch.stack([test[i][0] for i in range(len(test))]).float() / 255
    for role in ("teacher", "student"):
        versions = client.search_model_versions(f"name = 'tckr-fashion-mnist-{role}'")
        assert len(versions) == 1
        tags = versions[0].tags
        assert tags["profile"] == "smoke" and tags["config_hash"] == cfg.fingerprint()
        for tag, metric in (("accuracy", "test_accuracy"), ("auc_mia", "mia.auc"), ("aop", "aop"),
                            ("tpr_at_1pct_fpr", "mia.tpr_at_1pct_fpr")):
            assert float(tags[tag]) == pytest.approx(outcome.metrics[f"{role}.{metric}"], abs=1e-4)
        # The registered model normalises by itself and accepts any batch size: score the real test split.
        model = mlflow.pytorch.load_model(f"models:/tckr-fashion-mnist-{role}/1" if role == "teacher"
                                          else "models:/tckr-fashion-mnist-student@champion")
        accuracy = (model(images).argmax(1) == test.labels).float().mean().item()
        assert accuracy == pytest.approx(outcome.metrics[f"{role}.test_accuracy"], abs=1e-4)
        assert model(images[:3]).shape == (3, 10)
    # The first student is the champion (there was none); it is also the candidate.
    assert outcome.metrics["student.champion"] == 1
    assert str(client.get_model_version_by_alias("tckr-fashion-mnist-student", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tckr-fashion-mnist-student", "candidate").version) == "1"


def test_champion_moves_only_to_a_better_student(smoke_run):
    from tckr.platform.tracking import Tracking
    from tckr.recipes.invoke import invoke
    from tckr.recipes.tckr.stages import STAGES

    cfg, outcome, uri = smoke_run
    kfp_dir = outcome.artifacts
    name = "tckr-fashion-mnist-student"
    client = mlflow.MlflowClient(uri, registry_uri=uri)

    def holder(alias: str) -> int:
        return int(client.get_model_version_by_alias(name, alias).version)

    champion_aop = float(client.get_model_version_by_alias(name, "champion").tags["aop"])

    def register(accuracy: float) -> dict:
        return invoke(STAGES["register"], {"config": cfg}, {
            "teacher_model": kfp_dir / "teacher" / "model", "student_model": kfp_dir / "student" / "model",
            "teacher_metrics": {"teacher.test_accuracy": 0.9, "teacher.mia.auc": 0.6},
            "student_metrics": {"student.test_accuracy": accuracy},
            "attack_metrics": {"student.mia.auc": 0.5, "student.mia.tpr_at_1pct_fpr": 0.01,
                               "teacher.mia.tpr_at_1pct_fpr": 0.02, "student.mia.auc_ci_low": 0.49,
                               "student.mia.auc_ci_high": 0.51, "teacher.mia.auc_ci_low": 0.58,
                               "teacher.mia.auc_ci_high": 0.62}}, {}, Tracking(uri, cfg.experiment_name))

    worse = register(champion_aop / 2)
    assert worse["student.champion"] == 0
    assert holder("champion") == 1 and holder("candidate") == worse["student.registry_version"]
    better = register(min(1.0, champion_aop + 0.05))
    assert better["student.champion"] == 1
    assert holder("champion") == better["student.registry_version"]


@pytest.mark.unit
def test_unreachable_tracking_server_fails_fast(tmp_path):
    from tckr.platform.tracking import TrackingError

    with pytest.raises(TrackingError, match="unreachable after 2 attempts"):
        from tckr.platform.tracking import configure

        configure("http://127.0.0.1:9", attempts=2, delay=0.01)


@pytest.mark.unit
def test_cli_reports_config_errors(capsys):
    assert main(["config", "--profile", "smoke", "--set", "teacher.epochs=-2"]) == 2
    assert "teacher.epochs: Input should be greater than 0" in capsys.readouterr().err
    assert main(["config", "--profile", "smoke", "--set", "teacher.epochs=5"]) == 0
    assert "epochs: 5" in capsys.readouterr().out


@pytest.mark.unit
def test_compiled_pipeline_matches_committed_snapshot(tmp_path):
    from pathlib import Path

    import tckr.pipelines

    committed = Path(tckr.pipelines.__file__).parent
    compiled = compile_committed(tmp_path)
    assert [path.name for path in compiled] == ["tckr_pipeline.yaml", "privimage_pipeline.yaml"]
    for fresh in compiled:
        assert fresh.read_text() == (committed / fresh.name).read_text(), (
            f"{fresh.name} is stale: run `make compile` and commit the result")
        spec, _ = yaml.safe_load_all(fresh.read_text())  # the pipeline, then its Kubernetes settings
        root, parameters = spec["root"]["dag"]["tasks"], spec["root"]["inputDefinitions"]["parameters"]
        # Every stage runs inside an exit handler whose finish_run task runs however they end.
        assert set(root) == {"exit-handler-1", "finish-run"}
        assert root["finish-run"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
        assert root["finish-run"]["inputs"]["parameters"]["status"] == {"taskFinalStatus":
                                                                        {"producerTask": "exit-handler-1"}}
        tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
        assert tasks["ingest"]["componentRef"] and "report" in tasks
        assert {"ingest", "attack", "run_name", "tracking_uri", "experiment"} <= set(parameters)
        assert parameters["seed"]["defaultValue"] == 420  # the paper profile's settings
        assert json.loads(parameters["attack"]["defaultValue"])["seed"] == section_seed(420, "attack")
        fan_out = sorted(str(t["parameterIterator"]) for t in tasks.values() if "parameterIterator" in t)
        plan = {"tckr_pipeline.yaml": "generation-plan", "privimage_pipeline.yaml": "sample-plan"}[fresh.name]
        assert len(fan_out) == 2 and plan in fan_out[0] and "shadow-plan" in fan_out[1]
        assert {"attack", "register"} <= set(tasks)
        assert tasks["register"]["cachingOptions"] == {}  # never cached: each run registers its own versions


def test_failed_stage_is_reported_and_marked_failed(tmp_path):
    from tckr.platform.runner import PipelineFailed

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config("smoke", ["ingest.source=disk", f"ingest.name={tmp_path / 'missing'}"])
    missing = re.escape(f"no dataset saved at '{tmp_path / 'missing'}' (source: disk)")
    with pytest.raises(PipelineFailed, match=f"failed at stage 'ingest': {missing}; MLflow run .* is marked FAILED"):
        run_local(cfg, local_pipeline(cfg), tmp_path / "runs", tracking_uri=uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tckr-fashion-mnist").experiment_id])
    statuses = {r.data.tags.get("tckr.stage", "parent"): r.info.status for r in runs}
    assert statuses == {"parent": "FAILED", "ingest": "FAILED"}
    assert not (tmp_path / "runs" / "latest").exists()


@pytest.mark.unit
def test_resume_takes_the_newest_unfinished_run_and_refuses_what_it_cannot_resume(tmp_path, capsys):
    from tckr.platform.runner import latest_unfinished

    runs = tmp_path / "runs"
    for name, state in (("20261201-100000-smoke", "failed"), ("20261202-100000-smoke", "interrupted"),
                        ("20261203-100000-smoke", "finished")):
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps({"run_name": name, "kfp_run_id": "x", "state": state}))
    assert latest_unfinished(runs) == (runs / "20261202-100000-smoke").resolve()
    for argv, says in (
            (["--resume", str(runs / "20261203-100000-smoke")], "has finished already: nothing to resume"),
            (["--resume", str(tmp_path)], f"{tmp_path} is not a tckr run directory (no run.json)"),
            (["--resume", "--profile", "smoke"], "--resume finishes a run with the configuration it started with"),
            (["--resume", "--runs-dir", str(tmp_path / "none")], f"no unfinished run under {tmp_path / 'none'}/")):
        assert main(["run", *argv]) in (1, 2)
        assert says in capsys.readouterr().err, argv


def test_stage_command_runs_one_stage_at_a_time(tmp_path, monkeypatch):
    """The DVC entry point: each stage on its own, metrics.json beside its outputs."""
    monkeypatch.chdir(tmp_path)
    overrides = ["--set", "ingest.train_limit=400", "--set", "ingest.test_limit=100"]
    assert main(["stage", "ingest", "--profile", "smoke", *overrides, "--data", "data"]) == 0
    assert json.loads((tmp_path / "data" / "metrics.json").read_text())["data.test_images"] == 100
    assert main(["stage", "teacher", "--profile", "smoke", *overrides, "--model", "teacher"]) == 2
    assert main(["stage", "teachr", "--profile", "smoke"]) == 2
    assert main(["stage", "teacher", "--profile", "smoke", *overrides, "--data", "data", "--model", "teacher"]) == 0
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    assert "teacher.test_accuracy" in json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tckr-fashion-mnist").experiment_id])
    assert sorted(r.data.tags["tckr.stage"] for r in runs) == ["ingest", "teacher"]


def test_artifacts_live_in_the_s3_bucket(smoke_run, s3_store, tmp_path):
    """The server proxies artifacts to S3: the report and both models are objects in the bucket, and
    come back byte-identical."""
    from tckr.platform.objectstore import download_file, list_keys, s3_client
    from tckr.platform.services import MLFLOW_BUCKET

    _, outcome, uri = smoke_run
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tckr-fashion-mnist")
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "tckr.run_name" in r.data.tags)
    s3 = s3_client(s3_store)
    keys = list_keys(s3, MLFLOW_BUCKET, f"artifacts/{experiment.experiment_id}/")
    report_key = next(k for k in keys if parent.info.run_id in k and k.endswith("/report.md"))
    download_file(s3, MLFLOW_BUCKET, report_key, tmp_path / "report.md")
    assert (tmp_path / "report.md").read_bytes() == (outcome.run_dir / "report.md").read_bytes()
    model_files = [k for k in keys if "/models/" in k and k.endswith("MLmodel")]
    assert len(model_files) == 2  # teacher and student


# An AWS-style key id, a PEM private key, or a secret-sounding name assigned a token: 16+ characters mixing letters
# and digits (a reference such as `s3_secret: mlpipeline-minio-artifact`, a Kubernetes secret's name, is no key).
KEY_LIKE = re.compile(r"AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|(?i:(?:secret|password|passwd|token|"
                      r"api_?key)\w*[\"']?\s*[:=]\s*[\"']?(?=[\w/+\-]*\d)(?=[\w/+\-]*[a-z])[\w/+\-]{16,})")
TEXT_FILES = {".json", ".jsonl", ".csv", ".md", ".yaml", ".yml", ".txt", ".html", ".log", ".toml", ".lock", ".py",
              ".cfg", ""}


def test_no_secret_reaches_the_yaml_the_image_the_run_its_logs_or_mlflow(smoke_run, s3_store, tmp_path_factory):
    """The S3 keys this session generated, and anything shaped like a credential, appear nowhere a user or a
    cluster sees: the compiled pipelines, the image's build inputs, the run directory, the servers' logs, and every
    MLflow param, tag and artifact name of the smoke run."""
    from tckr.components import IMAGE_INPUTS

    _, outcome, uri = smoke_run
    repo = Path(__file__).resolve().parents[2]
    files = [*repo.glob("src/tckr/pipelines/*.yaml"), repo / "README.md",
             *(path for name in IMAGE_INPUTS for path in ((repo / name).rglob("*") if (repo / name).is_dir()
                                                           else [repo / name])),
             *outcome.run_dir.rglob("*"), *tmp_path_factory.getbasetemp().glob("*/*.log")]
    texts = {str(path): path.read_text(errors="replace") for path in files
             if path.is_file() and path.suffix in TEXT_FILES and "__pycache__" not in path.parts}
    assert any(where.endswith("mlflow.log") for where in texts) and any(where.endswith("seaweedfs.log")
                                                                        for where in texts)
    client = mlflow.MlflowClient(uri)
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            texts[f"MLflow run {run.info.run_name}"] = json.dumps(
                [run.data.params, run.data.tags, _artifact_names(client, run.info.run_id)])
        for model in client.search_logged_models([experiment.experiment_id]):
            texts[f"MLflow model {model.model_id}"] = json.dumps([model.params, model.tags])
    credentials = s3_store.credentials
    for where, text in texts.items():
        assert credentials.access_key not in text and credentials.secret_key not in text, where
        assert not KEY_LIKE.search(text), f"{where}: {KEY_LIKE.search(text).group(0)}"


def test_no_real_image_leaves_the_pipeline_by_default(smoke_run):
    """The smoke profile keeps ``tracking.log_real_images: false``, the default for private data: the audit's figure
    shows synthetic images alone, the report says why, and each logged model's input example is a constant image
    (its shape, no user's pixels)."""
    from PIL import Image

    _, outcome, uri = smoke_run
    assert outcome.metrics["audit.real_images_shown"] == 0
    assert "(the real images are shown only with tracking.log_real_images: true)" in (
        outcome.run_dir / "report.md").read_text()
    with Image.open(outcome.run_dir / "worst-pairs.png") as figure:
        assert figure.height < 300  # one row of images (synthetic), not three (with members and holdout images)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tckr-fashion-mnist")
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 2
    for model in models:
        example = json.loads(Path(mlflow.artifacts.download_artifacts(
            f"{model.artifact_location}/input_example.json", tracking_uri=uri)).read_text())
        assert set(np.asarray(example["inputs"] if isinstance(example, dict) else example).ravel()) == {0.5}


def _artifact_names(client, run_id: str, path: str | None = None) -> list[str]:
    names = []
    for entry in client.list_artifacts(run_id, path):
        names += _artifact_names(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return names


def test_mlflow_ui_serves_the_local_store(tmp_path):
    """`make mlflow-ui` (tckr services ui) shows what `tckr run` writes to ./mlruns.db without a server."""
    import os
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    from tckr.platform.services import Server, free_port
    from tckr.platform.tracking import Tracking, default_tracking_uri, stage_run

    uri = default_tracking_uri(tmp_path)
    with stage_run("ingest", Tracking(uri, "tckr-fashion-mnist")):
        mlflow.log_metric("ingest.train_images", 300)
    port = free_port()
    tckr = str(Path(sys.executable).with_name("tckr"))
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(tmp_path / "ui.log", "wb") as log:
        process = subprocess.Popen([tckr, "services", "ui", "--mlflow-port", str(port)], cwd=tmp_path, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server("MLflow UI", process, f"http://127.0.0.1:{port}/health", tmp_path / "ui.log")
    try:
        server.wait_healthy(timeout=90)
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
        with urllib.request.urlopen(f"{base}/experiments/get-by-name?experiment_name=tckr-fashion-mnist") as response:
            experiment = json.loads(response.read())["experiment"]
        request = urllib.request.Request(f"{base}/runs/search", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode())
        with urllib.request.urlopen(request) as response:
            runs = json.loads(response.read())["runs"]
        assert [run["info"]["run_name"] for run in runs] == ["ingest"]
    finally:
        server.stop()


# What differs between two runs of the same configuration: timings, the cache, the registry's counters.
RESUMED = "tckr-resumed"
RUN_TO_RUN = re.compile(r"seconds|images_per_second|registry_version|\.champion$|generator\.cached")
LONG_TASKS = ("caption", "generator", "finetune", "generate-shard", "teacher", "student", "shadow-group", "attack")


def _kill_when_started(command: list[str], env: dict[str, str], runs: Path, seed: int) -> str:
    """Run ``command`` (``tckr run``) and SIGKILL its whole process group at a point chosen from ``seed``: a few
    seconds (0-4) into one of the long tasks. Returns the task's name."""
    chooser = random.Random(seed)
    task, delay = chooser.choice(LONG_TASKS), chooser.uniform(0.0, 4.0)
    process = start(command, env)
    started = wait_for(process, lambda: any(runs.glob(f"*/kfp/**/{task}")), f"task {task}'s start")
    assert started, f"the run ended before task {task} started"
    assert kill_after(process, delay), f"the run ended within {delay:.1f} s of task {task}'s start"
    return task


@pytest.mark.faults
def test_a_killed_run_resumes_to_the_results_of_an_unbroken_one(smoke_run, tmp_path):
    """``tckr run`` killed (SIGKILL: no handler runs) inside a long task at a seeded point, then ``tckr run --resume``:
    the finished tasks are not run again, and the run ends with the unbroken run's metrics, one parent run, each
    stage's MLflow run and each shadow's once, and each model registered once."""
    _, unbroken, uri = smoke_run
    runs = tmp_path / "runs"
    env = os.environ | {"MLFLOW_TRACKING_URI": uri}
    tckr = str(Path(sys.executable).with_name("tckr"))
    # Its own experiment, so that the smoke run's tests see only theirs (the registry is shared: one name per model).
    command = [tckr, "run", "--profile", "smoke", "--set", f"tracking.experiment={RESUMED}", "--runs-dir", str(runs)]
    task = _kill_when_started(command, env, runs, seed=int(os.environ.get("TCKR_KILL_SEED", "3")))
    (run_dir,) = [path.parent for path in runs.glob("*/run.json")]
    assert json.loads((run_dir / "run.json").read_text())["state"] == "running"  # killed: nothing recorded the end
    resumed = subprocess.run([tckr, "run", "--resume", "--runs-dir", str(runs)], env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, f"killed in {task}: {resumed.stderr[-3000:]}"
    assert f"resuming {run_dir} (running)" in resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["state"] == "finished"
    assert (runs / "latest").resolve() == run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    same = {key: value for key, value in unbroken.metrics.items() if not RUN_TO_RUN.search(key)}
    assert {key: metrics.get(key) for key in same} == same, f"killed in {task}"

    client = mlflow.MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(RESUMED).experiment_id

    def runs(tag: str, value: str) -> list:
        return client.search_runs([experiment], filter_string=f"tags.`{tag}` = '{value}'")

    (parent,) = client.search_runs([experiment], filter_string="tags.`tckr.run_name` != ''")
    assert parent.info.status == "FINISHED" and parent.info.run_name == run_dir.name
    stages = runs("mlflow.parentRunId", parent.info.run_id)
    assert sorted(r.data.tags["tckr.stage"] for r in stages) == sorted(STAGE_RUNS)
    assert all(r.info.status == "FINISHED" for r in stages)
    (attack,) = [r for r in stages if r.data.tags["tckr.stage"] == "attack"]
    assert sorted(r.info.run_name for r in runs("mlflow.parentRunId", attack.info.run_id)) == [
        f"shadow-{i:03d}" for i in range(int(unbroken.metrics["attack.shadows"]))]
    stage_run_ids = {r.info.run_id for r in stages}
    for role in ("teacher", "student"):
        versions = client.search_model_versions(f"name = 'tckr-fashion-mnist-{role}'")
        assert [int(v.version) for v in versions if v.run_id in stage_run_ids] == [metrics[f"{role}.registry_version"]]
