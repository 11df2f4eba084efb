"""Manifests and scripts, checked statically: shellcheck, the run-local dry run, kustomize renders, and the
rendered objects against the Kubernetes API schemas (kubernetes-validate, offline; kubeconform's check)."""

import copy
import os
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZATIONS = sorted(p.parent for p in REPO.rglob("kustomization.yaml")
                        if not {".venv", ".git", ".tckr"} & set(p.parts))  # .tckr: run-local.sh's overlay
# Every Kubernetes release the validator ships schemas for: the manifests must not depend on which one runs them.
SCHEMA_VERSIONS = sorted(set(all_versions()), key=Version)
USER_TOOLS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tckr" / "debian" / "usr" / "bin"


def _tool(name: str) -> str:
    """A checker `make setup` installs (scripts/install-tools.sh): on PATH, or in the user's cache."""
    found = shutil.which(name) or shutil.which(name, path=str(USER_TOOLS))
    if not found:
        pytest.skip(f"{name} is not installed (make setup installs it)")
    return found


@pytest.mark.parametrize("script", sorted(REPO.glob("scripts/*.sh")),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_passes(script):
    result = subprocess.run([_tool("shellcheck"), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _dry_run(bin_dir: Path, *arguments: str) -> list[str]:
    """The commands run-local.sh would run, on a PATH without kind (so its pinned fetch shows too)."""
    for tool in ("dirname", "sed"):
        if not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "run-local.sh"), "--dry-run", *arguments],
                            capture_output=True, text=True, check=True, env=os.environ | {"PATH": str(bin_dir)})
    return [line.removeprefix("+ ") for line in result.stdout.splitlines()]


def test_run_local_dry_run_prints_every_step_in_order(tmp_path):
    from tckr.components import default_images

    image, cuda_image = default_images()
    commands = _dry_run(tmp_path)
    expected_order = [
        "curl -fsSLo",  # kind, pinned, when it is not installed
        "kind create cluster --name tckr --config",
        "kubectl apply -k github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=2.17.3",
        "kubectl wait --for condition=established --timeout 120s crd/applications.app.k8s.io",
        "kubectl apply -k github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=2.17.3",
        "kubectl -n kubeflow wait --for condition=available",
        f"docker build --file {REPO}/docker/Dockerfile --target cpu --build-arg TCKR_IMAGE={image} "
        f"--build-arg TCKR_CUDA_IMAGE={cuda_image} --tag {image}",
        f"kind load docker-image {image} --name tckr",
        f"kubectl apply -k {REPO}/.tckr/mlflow-k8s",
        "kubectl -n kubeflow rollout status deployment/mlflow",
        "kubectl -n kubeflow port-forward svc/ml-pipeline 8888:8888 &",
        "submit --host http://127.0.0.1:8888 --profile demo --wait",
    ]
    positions = [next(i for i, c in enumerate(commands) if step in c) for step in expected_order]
    assert positions == sorted(positions), commands
    minikube = _dry_run(tmp_path, "--minikube", "--gpus")
    assert minikube[0] == "minikube start --profile tckr --cpus 4 --memory 8g --driver docker --gpus all"
    assert f"minikube --profile tckr image load {image}" in minikube
    assert _dry_run(tmp_path, "down")[-1] == "kind delete cluster --name tckr"


def _render(kustomization: Path) -> list[dict]:
    rendered = subprocess.run([_tool("kubectl"), "kustomize", str(kustomization)],
                              capture_output=True, text=True, check=True).stdout
    return list(yaml.safe_load_all(rendered))


def test_every_kustomization_is_found():
    assert KUSTOMIZATIONS == [REPO / "mlflow" / "k8s"] and len(SCHEMA_VERSIONS) >= 10


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(REPO)))
def test_rendered_manifests_match_the_kubernetes_schemas(kustomization):
    """Strict: an unknown field is an error, as with the API server's strict field validation; a kind
    without a schema (a CRD) fails too, rather than passing unchecked."""
    objects = _render(kustomization)
    assert objects
    for version in SCHEMA_VERSIONS:
        for manifest in objects:
            kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("spec", "replicas"), "one", "'one' is not of type 'integer'"),
    (("spec", "template", "spec", "containers", 0, "imagePullPolcy"), "Always", "'imagePullPolcy' was unexpected"),
    (("spec", "template", "spec", "containers", 0, "name"), None, "'name' is a required property"),
], ids=["wrong type", "misspelt field", "missing required field"])
def test_schema_validation_rejects_a_broken_deployment(path, value, complaint):
    """The validator does validate: the MLflow Deployment, broken in one place, is refused there."""
    deployment = copy.deepcopy(next(o for o in _render(REPO / "mlflow" / "k8s") if o["kind"] == "Deployment"))
    parent = deployment
    for key in path[:-1]:
        parent = parent[key]
    if value is None:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError, match=complaint):
        kubernetes_validate.validate(deployment, SCHEMA_VERSIONS[-1], strict=True)


def test_run_local_serves_mlflow_from_the_image_it_built():
    """mlflow/k8s names the repository only; run-local.sh's overlay gives it this code's tag."""
    from tckr.components import default_images

    result = subprocess.run([shutil.which("bash"), str(REPO / "scripts" / "run-local.sh"), "mlflow-manifests"],
                            capture_output=True, text=True, check=True,
                            env=os.environ | {"PATH": f"{Path(_tool('kubectl')).parent}:{os.environ['PATH']}"})
    objects = {o["kind"]: o for o in yaml.safe_load_all(result.stdout)}
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == default_images().cpu
    base = {o["kind"]: o for o in _render(REPO / "mlflow" / "k8s")}
    (untagged,) = base["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert untagged["image"] == "ghcr.io/tckr/tckr"  # applied without the overlay it would not pin an old tag


def test_mlflow_kustomization_renders_and_references_its_secrets():
    objects = {o["kind"]: o for o in _render(REPO / "mlflow" / "k8s")}
    assert set(objects) == {"Deployment", "Service", "PersistentVolumeClaim"}  # no Secret: referenced only
    assert all(o["metadata"]["namespace"] == "kubeflow" for o in objects.values())
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    args = " ".join(container["args"])
    assert "--artifacts-destination=s3://mlpipeline/mlflow" in args and "--backend-store-uri=sqlite:///" in args
    env = {e["name"]: e for e in container["env"]}
    for variable, key in (("AWS_ACCESS_KEY_ID", "accesskey"), ("AWS_SECRET_ACCESS_KEY", "secretkey")):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "mlpipeline-minio-artifact", "key": key}
        assert "value" not in env[variable]
    # The in-cluster URL the pipeline's tasks are given (kubernetes.tracking_uri) is this Service.
    from tckr.core.config import KubernetesConfig

    service = objects["Service"]
    port = service["spec"]["ports"][0]["port"]
    assert KubernetesConfig().tracking_uri == f"http://{service['metadata']['name']}.kubeflow:{port}"
    assert service["spec"]["selector"].items() <= objects["Deployment"]["spec"]["template"]["metadata"][
        "labels"].items()
