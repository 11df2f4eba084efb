"""The smoke profile end to end through the real kfp.local runner and a real MLflow sqlite store."""

import json

import mlflow
import pytest
import torch
import yaml

from tckr.cli import main
from tckr.config import load_config
from tckr.pipelines.compile import compile_all
from tckr.runner import run_local
from tckr.tracking import configure


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    cfg = load_config("smoke")
    return cfg, run_local(cfg, root / "runs", tracking_uri=uri), uri


def test_run_directory(smoke_run):
    cfg, outcome, _ = smoke_run
    run_dir = outcome.run_dir
    assert (run_dir.parent / "latest").resolve() == run_dir
    assert {"config.yaml", "report.md", "metrics.json", "samples.png"} <= {p.name for p in run_dir.iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("teacher.test_accuracy", "teacher.val_accuracy", "stage.ingest.seconds",
                "stage.teacher.seconds", "run.seconds", "data.train_images", "caption.train_distinct",
                "generator.cached", "finetune.final_loss", "synthetic.images", "synthetic.teacher_agreement",
                "stage.generate.seconds"):
        assert key in metrics, key
    assert 0.0 <= metrics["teacher.test_accuracy"] <= 1.0
    assert metrics["data.test_images"] == cfg.ingest.test_limit
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["profile"] == "smoke"
    report = (run_dir / "report.md").read_text()
    assert "| teacher" in report and "test_accuracy=" in report and cfg.fingerprint() in report
    assert "![synthetic samples per class](samples.png)" in report
    # ratio 0.1 x 420 private images = 42 -> 4 per class
    assert metrics["synthetic.images"] == 40 and 0.0 <= metrics["synthetic.teacher_agreement"] <= 1.0
    # 40 images in shards of 16: three ParallelFor tasks made them, the gathering stage none.
    assert metrics["synthetic.shards"] == metrics["synthetic.shards_gathered"] == 3
    assert metrics["synthetic.shards_generated_here"] == 0
    assert metrics["stage.generate_shards.seconds"] > 0 and "| generate_shards" in report
    assert metrics["caption.train_images"] == metrics["data.train_images"]


def test_base_generator_is_cached(smoke_run, tmp_path):
    """A second run with the same generator settings and public data reuses the pretrained weights."""
    from tckr.stages import generator_stage

    cfg, outcome, _ = smoke_run
    assert outcome.metrics["generator.cached"] == 0
    kfp_dir = next(outcome.run_dir.glob("kfp/*"))
    metrics = generator_stage(cfg, cfg.generator.seed, kfp_dir / "ingest" / "dataset", kfp_dir / "caption" / "captions",
                              tmp_path / "again", None, f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert metrics["generator.cached"] == 1
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "again" / weights).read_bytes() == (kfp_dir / "generator" / "base_model" / weights).read_bytes()


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
    assert set(stages) == {"ingest", "teacher", "caption", "generator", "finetune", "generate"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    teacher = stages["teacher"]
    assert teacher.data.params["epochs"] == str(cfg.teacher.epochs)
    history = client.get_metric_history(teacher.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, cfg.teacher.epochs + 1))


def test_teacher_registered_and_loadable(smoke_run):
    cfg, outcome, uri = smoke_run
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'tckr-fashion-mnist-teacher'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert tags["profile"] == "smoke" and tags["config_hash"] == cfg.fingerprint()
    assert float(tags["test_accuracy"]) == pytest.approx(outcome.metrics["teacher.test_accuracy"], abs=1e-4)
    configure(uri)
    model = mlflow.pytorch.load_model("models:/tckr-fashion-mnist-teacher/1")
    # The registered model normalises by itself and accepts any batch size: score the real test split.
    from tckr.classify import ImageSplit
    from tckr.ingest import load_prepared

    splits, info = load_prepared(next(outcome.run_dir.glob("kfp/*/ingest/dataset")))
    test = ImageSplit(splits["test"], cfg.image_size, info.channels)
    images = torch.stack([test[i][0] for i in range(len(test))]).float() / 255
    accuracy = (model(images).argmax(1) == test.labels).float().mean().item()
    assert accuracy == pytest.approx(outcome.metrics["teacher.test_accuracy"], abs=1e-4)
    assert model(images[:3]).shape == (3, 10)


def test_unreachable_tracking_server_fails_fast(tmp_path):
    from tckr.tracking import TrackingError

    with pytest.raises(TrackingError, match="unreachable after 2 attempts"):
        from tckr.tracking import configure

        configure("http://127.0.0.1:9", attempts=2, delay=0.01)


def test_cli_reports_config_errors(capsys):
    assert main(["config", "--profile", "smoke", "--set", "teacher.epochs=-2"]) == 2
    assert "teacher.epochs: Input should be greater than 0" in capsys.readouterr().err
    assert main(["config", "--profile", "smoke", "--set", "teacher.epochs=5"]) == 0
    assert "epochs: 5" in capsys.readouterr().out


def test_compiled_pipeline_matches_committed_snapshot(tmp_path):
    from pathlib import Path

    import tckr.pipelines

    committed = Path(tckr.pipelines.__file__).parent
    for fresh in compile_all(tmp_path):
        assert fresh.read_text() == (committed / fresh.name).read_text(), (
            f"{fresh.name} is stale: run `make compile` and commit the result")
        spec = yaml.safe_load(fresh.read_text())
        images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
        assert len(images) == 1 and images.pop().startswith("ghcr.io/tckr/tckr:")
        tasks = spec["root"]["dag"]["tasks"]
        assert tasks["ingest"]["componentRef"] and "teacher" in tasks and "report" in tasks
        assert {"ingest_seed", "teacher_seed", "generate_seed"} <= set(spec["root"]["inputDefinitions"]["parameters"])
        fan_out = [t for t in tasks.values() if "parameterIterator" in t]
        assert len(fan_out) == 1 and "generation-plan" in str(fan_out[0]["parameterIterator"])


def test_failed_stage_is_reported_and_marked_failed(tmp_path):
    from tckr.runner import PipelineFailed

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    cfg = load_config("smoke", ["ingest.source=disk", f"ingest.name={tmp_path / 'missing'}"])
    with pytest.raises(PipelineFailed, match="failed at stage 'ingest'.*marked FAILED"):
        run_local(cfg, tmp_path / "runs", tracking_uri=uri)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("tckr-fashion-mnist").experiment_id])
    statuses = {r.data.tags.get("tckr.stage", "parent"): r.info.status for r in runs}
    assert statuses == {"parent": "FAILED", "ingest": "FAILED"}
    assert not (tmp_path / "runs" / "latest").exists()


def test_stage_command_runs_one_stage_at_a_time(tmp_path, monkeypatch):
    """The DVC entry point: each stage on its own, metrics.json beside its outputs."""
    monkeypatch.chdir(tmp_path)
    overrides = ["--set", "ingest.train_limit=400", "--set", "ingest.test_limit=100"]
    assert main(["stage", "ingest", "--profile", "smoke", *overrides, "--out", "data"]) == 0
    assert json.loads((tmp_path / "data" / "metrics.json").read_text())["data.test_images"] == 100
    assert main(["stage", "teacher", "--profile", "smoke", *overrides, "--out", "teacher"]) == 2
    assert main(["stage", "teacher", "--profile", "smoke", *overrides, "--data", "data", "--out", "teacher"]) == 0
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    assert "teacher.test_accuracy" in json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tckr-fashion-mnist").experiment_id])
    assert sorted(r.data.tags["tckr.stage"] for r in runs) == ["ingest", "teacher"]


def test_dvc_params_are_the_demo_profile():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    params = load_config(str(repo / "params.yaml"))
    assert params.model_dump(exclude={"profile"}) == load_config("demo").model_dump(exclude={"profile"})
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert all("--profile params.yaml" in stage["cmd"] for stage in stages.values())
    from tckr.cli import STAGE_INPUTS

    assert set(stages) == set(STAGE_INPUTS)


def test_mlflow_server_serves_the_local_store(smoke_run, tmp_path):
    """`make mlflow-ui` (mlflow/server.sh) shows the runs `tckr run` wrote to sqlite."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    _, _, uri = smoke_run
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).resolve().parents[1] / "mlflow" / "server.sh"
    env = os.environ | {"MLFLOW_BACKEND_STORE_URI": uri, "MLFLOW_PORT": str(port),
                        "MLFLOW_BIN": shutil.which("mlflow", path=str(Path(sys.executable).parent))}
    server = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise AssertionError("mlflow server did not become healthy") from None
                time.sleep(1)
        query = f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tckr-fashion-mnist"
        with urllib.request.urlopen(query, timeout=10) as response:
            experiment = json.loads(response.read())["experiment"]
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode())
        with urllib.request.urlopen(request, timeout=10) as response:
            names = {run["info"]["run_name"] for run in json.loads(response.read())["runs"]}
        assert {"ingest", "teacher"} <= names
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
