"""The cluster rehearsal: the compiled YAML executed pod by pod against a stand-in cluster. It passes on the smoke
pipeline, and it fails, as a cluster would, on each failure that static checks missed: a Host header the MLflow
server refuses, packages installed when a pod starts, files written outside a task's declared outputs, and an
MLflow parent run left RUNNING after a failure."""

import json
import linecache
import re
from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl
from mlflow.server.security_utils import is_allowed_host_header

from tckr.components.factory import component_source
from tckr.pipelines.build import pipeline_arguments
from tckr.pipelines.compile import compile_pipeline
from tckr.platform.rehearse import (
    ClusterStandIn,
    Rehearsal,
    RehearsalError,
    deployment_server_options,
    packages_installed_at_start,
    rehearse_package,
)
from tckr.recipes.config import RECIPES, load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = REPO / "mlflow" / "k8s" / "deployment.yaml"
COMMITTED = sorted((REPO / "src" / "tckr" / "pipelines").glob("*_pipeline.yaml"))


@pytest.mark.unit
@pytest.mark.parametrize("package", COMMITTED, ids=lambda path: path.name)
def test_no_compiled_component_installs_packages_when_its_pod_starts(package):
    spec = next(yaml.safe_load_all(package.read_text()))
    assert packages_installed_at_start(spec) == []
    assert not any(re.search(r"\bpip3?\b", " ".join(executor["container"]["command"]))
                   for executor in spec["deploymentSpec"]["executors"].values())


@pytest.mark.unit
def test_kfps_default_component_is_refused_before_anything_runs(tmp_path):
    """The old factory (kfp's default, `pip install kfp` at pod start): refused, naming the fix."""
    source = component_source("tckr", RECIPES["tckr"].stages["shadow_plan"])
    linecache.cache["<old factory>"] = (len(source), None, source.splitlines(keepends=True), "<old factory>")
    namespace: dict = {}
    exec(compile(source, "<old factory>", "exec", dont_inherit=True), namespace)  # noqa: S102
    old = dsl.component(namespace["shadow_plan"])

    @dsl.pipeline(name="old")
    def pipeline(attack: str = "{}"):
        old(attack=attack)

    compiler.Compiler().compile(pipeline, str(tmp_path / "old.yaml"))
    rehearsal = Rehearsal(tmp_path / "old.yaml", ClusterStandIn({}, {}), tmp_path / "run")
    with pytest.raises(RehearsalError, match="install packages when their pod starts .*install_kfp_package=False"):
        rehearsal.run({})
    assert rehearsal.tasks_run == []


@pytest.mark.unit
def test_the_deployed_server_accepts_the_pods_host_header_and_port_forwarding():
    """MLflow's own Host check, fed the deployment's --allowed-hosts: the in-cluster name with its port (what every
    pod sends), kubectl port-forward, in-cluster IPs; not an arbitrary outside name."""
    (option,) = [option for option in deployment_server_options(DEPLOYMENT) if option.startswith("--allowed-hosts=")]
    allowed = option.split("=", 1)[1].split(",")
    tracking = load_config("paper-cifar10").kubernetes.tracking_uri.removeprefix("http://")
    for host in (tracking, "mlflow.kubeflow.svc.cluster.local:5000", "localhost:5000", "10.244.0.7:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")


def test_a_task_writing_beside_its_declared_output_fails(tmp_path):
    """On a cluster only declared outputs are uploaded: a file written next to one is lost with the pod."""

    @dsl.component(install_kfp_package=False)
    def writes_beside(summary: dsl.Output[dsl.Markdown]):
        from pathlib import Path

        Path(summary.path).write_text("kept")
        (Path(summary.path).parent / "figure.png").write_text("lost")

    @dsl.pipeline(name="beside")
    def pipeline():
        writes_beside()

    compiler.Compiler().compile(pipeline, str(tmp_path / "beside.yaml"))
    with pytest.raises(RehearsalError, match=r"task 'writes-beside' wrote 1 files outside its declared outputs .*"
                                             r"outputs/writes-beside/figure\.png"):
        Rehearsal(tmp_path / "beside.yaml", ClusterStandIn({}, {}), tmp_path / "run").run({})


def test_volumes_are_directories_a_pvc_shared_by_the_run_scratch_fresh_in_each_pod(tmp_path):
    """A PVC keeps what one pod wrote for the next; a pod's scratch volume starts empty; environment values under
    a mount path lead into the volume's directory."""
    from kfp import kubernetes

    @dsl.component(install_kfp_package=False)
    def step(name: str) -> str:
        import os
        from pathlib import Path

        shared, scratch = Path(os.environ["SHARED"]), Path(os.environ["TMPDIR"])
        shared.mkdir(exist_ok=True)
        seen = [f"{volume}:{earlier}" for volume, folder in (("pvc", shared), ("scratch", scratch))
                for earlier in ("first", "second") if (folder / earlier).exists()]
        (shared / name).write_text(name)
        (scratch / name).write_text(name)
        return ",".join(seen)

    @dsl.pipeline(name="volumes")
    def pipeline() -> str:
        tasks = []
        for name in ("first", "second"):
            task = step(name=name).set_env_variable("SHARED", "/mnt/work/shared").set_env_variable("TMPDIR", "/scratch")
            kubernetes.mount_pvc(task, pvc_name="work", mount_path="/mnt/work")
            kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path="/scratch",
                                            access_modes=["ReadWriteOnce"], size="1Gi")
            if tasks:
                task.after(tasks[-1])
            tasks.append(task)
        return tasks[-1].output

    compiler.Compiler().compile(pipeline, str(tmp_path / "volumes.yaml"))
    outputs = Rehearsal(tmp_path / "volumes.yaml", ClusterStandIn({}, {}), tmp_path / "run").run({})
    assert outputs.parameters["Output"] == "pvc:first"  # the first pod's file on the PVC, not in the second's scratch
    assert not Path("/scratch").exists() and not Path("/mnt/work").exists()


def _rehearse(profile: str, tmp_path: Path, overrides: tuple[str, ...] = (), deployment: Path = DEPLOYMENT):
    cfg = load_config(profile, overrides)
    package = compile_pipeline(cfg, tmp_path)
    arguments = pipeline_arguments(cfg, f"rehearsal-{tmp_path.name}", cfg.kubernetes.tracking_uri)
    return rehearse_package(package, arguments, cfg.kubernetes, tmp_path / "cluster", deployment, echo=lambda _: None)


def test_a_server_without_allowed_hosts_refuses_every_pod(tmp_path):
    """The deployment as it was (no --allowed-hosts): MLflow >= 3.5 answers the pods' Host header with 403."""
    manifest = yaml.safe_load(DEPLOYMENT.read_text())
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [option for option in container["args"] if not option.startswith("--allowed-hosts")]
    old = tmp_path / "deployment.yaml"
    old.write_text(yaml.safe_dump(manifest))
    with pytest.raises(RehearsalError, match="task 'exit-handler-1/start-run' exited with code 1: .*403.*Invalid Host"):
        _rehearse("smoke", tmp_path, deployment=old)


def test_a_failed_task_leaves_the_parent_run_failed_not_running(tmp_path):
    """The exit handler closes the MLflow parent run of a run that failed (a missing dataset, found by ingest)."""
    with pytest.raises(RehearsalError, match=r"task 'exit-handler-1/ingest' exited with code 1: .*DatasetError: no "
                                             r"dataset saved at .*missing.*; MLflow parent run FAILED$"):
        _rehearse("smoke", tmp_path, ("ingest.source=disk", f"ingest.name={tmp_path / 'missing'}"))


def test_the_smoke_pipeline_runs_from_its_compiled_yaml(tmp_path):
    outcome = _rehearse("smoke", tmp_path)
    assert outcome.parent_run_status == "FINISHED"
    spec = next(yaml.safe_load_all((tmp_path / "tckr_pipeline.yaml").read_text()))
    executors = {label.removeprefix("exec-") for label in spec["deploymentSpec"]["executors"]}
    assert {path.rsplit("/", 1)[-1] for path in outcome.tasks} == executors  # every component ran in a pod
    cfg = load_config("smoke")
    assert sum(path.endswith("/shadow-group") for path in outcome.tasks) == cfg.attack.shadows // \
        cfg.attack.shadows_per_group
    report = next((tmp_path / "cluster" / "store").rglob("exit-handler-1/report"))
    page = (report / "report_page").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert 'src="roc.png"' not in page and "<table>" in page  # self-contained: the figures are inline
    assert (report / "summary").read_text() == (report / "report_files" / "report.md").read_text()
    curve = json.loads((report / "roc").read_text())
    assert len(curve["fpr"]) == len(curve["tpr"]) == len(curve["thresholds"]) <= 200
    assert curve["fpr"] == sorted(curve["fpr"]) and curve["thresholds"] == sorted(curve["thresholds"], reverse=True)
