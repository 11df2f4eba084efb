"""DVC end to end on the smoke profile: `dvc repro` runs the stages, `dvc push` sends data and weights to
a real SeaweedFS remote, a wiped clone gets them back byte-identical with `dvc pull`, and only the
stages downstream of a change run again."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tckr.platform.objectstore import file_sha256, list_keys, s3_client
from tckr.platform.services import DVC_BUCKET
from tckr.recipes.config import load_config

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = ("ingest", "teacher", "caption", "generator", "finetune")
DOWNSTREAM = ("generate", "student", "attack", "register")
# What a teammate pulls instead of recomputing: the prepared data, captions, the base generator, the
# LoRA adapter, the synthetic set and the teacher/student weights.
WEIGHTS = ("outputs/data/dataset.json", "outputs/teacher/model.safetensors", "outputs/captions/captions.json",
           "outputs/generator", "outputs/adapter/pytorch_lora_weights.safetensors", "outputs/synthetic",
           "outputs/student/model.safetensors")


def _digests(root: Path) -> dict[str, str]:
    files = {}
    for entry in WEIGHTS:
        path = root / entry
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.is_file():
                files[str(file.relative_to(root))] = file_sha256(file)
    return files


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory, s3_store):
    """A git + DVC project with the repository's dvc.yaml, the smoke profile as params.yaml and the
    remote pointed at the test store (endpoint in config.local, keys only in the environment)."""
    root = tmp_path_factory.mktemp("dvc-project")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp", "config.local"))
    params = load_config("smoke").model_dump(mode="json") | {"profile": "params"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env |= s3_store.credentials.env() | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}",
                                         "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}

    def run(*command: str) -> str:
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    run("git", "init", "-q")
    run("dvc", "remote", "modify", "--local", "storage", "endpointurl", s3_store.url)
    return root, run


def test_repro_push_wipe_pull_is_byte_identical(dvc_project, s3_store):
    root, run = dvc_project
    log = run("dvc", "repro")
    for stage in (*UPSTREAM, *DOWNSTREAM):
        assert f"Running stage '{stage}'" in log
    shown = json.loads(run("dvc", "metrics", "show", "--json"))  # what DVC reads from the declared files
    metrics = {k: v for file in next(iter(shown.values()))["data"].values() for k, v in file["data"].items()}
    assert 0.0 <= metrics["student.mia.auc"] <= 1.0 and 0.0 <= metrics["teacher.mia.tpr_at_1pct_fpr"] <= 1.0
    assert metrics["student.aop"] > 0 and metrics["teacher.test_accuracy"] > 0.1
    assert metrics["student.registry_version"] == 1  # registered in this project's MLflow store
    before = _digests(root)
    assert len(before) > 10

    run("dvc", "push")
    assert any(key.startswith("store/files/md5/") for key in list_keys(s3_client(s3_store), DVC_BUCKET, "store/"))
    shutil.rmtree(root / "outputs")
    shutil.rmtree(root / ".dvc" / "cache")
    run("dvc", "pull")
    assert _digests(root) == before
    assert "up to date" in run("dvc", "status").lower()


def test_changed_generation_reruns_only_downstream(dvc_project):
    """A teammate who pulled the weights changes generation: pretraining and fine-tuning are skipped."""
    root, run = dvc_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"]["seed"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    teacher = file_sha256(root / "outputs/teacher/model.safetensors")
    log = run("dvc", "repro")
    for stage in UPSTREAM:
        assert f"Stage '{stage}' didn't change, skipping" in log
        assert f"Running stage '{stage}'" not in log
    for stage in ("generate", "student"):  # DVC goes on past the student only if its weights changed
        assert f"Running stage '{stage}'" in log
    assert file_sha256(root / "outputs/teacher/model.safetensors") == teacher
    assert "up to date" in run("dvc", "status").lower()
