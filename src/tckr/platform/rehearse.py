"""Rehearse a compiled pipeline as Kubeflow would run it, without a cluster.

``kfp.local`` runs the Python graph; a cluster runs the *compiled YAML*. This executes the YAML: every
task, in dependency order (fan-outs item by item, sub-DAGs and exit handlers included), becomes a fresh
process started with exactly the command, arguments and environment its container gets, and nothing of
the caller's environment:

- the executor input a KFP launcher would write (``{{$}}``), with each input artifact copied into the
  pod's own artifact mount (as the launcher downloads it) and, after the task, only its *declared*
  outputs kept (as the launcher uploads them); a file written anywhere else under the mount fails the
  rehearsal, since on a cluster it is lost with the pod;
- environment from the container spec, Kubernetes secrets (``secretAsEnv``) resolved from a local
  stand-in, the run-id pod label (``fieldPathAsEnv``), the image's own variables;
- the cluster's services reached by their in-cluster names (``mlflow.kubeflow:5000``,
  ``minio-service.kubeflow:9000``): a ``sitecustomize`` in the pod resolves those names to the local
  servers, keeps the port in the Host header, and resolves no other name (a pod has no internet here);
- volumes as directories: a PVC (``pvcMount``) one directory shared by every pod of the run, a generic
  ephemeral volume or an ``emptyDir`` a fresh one per pod; environment values under a volume's mount
  path point into its directory (a process here cannot mount anything at ``/scratch``);
- a container command that installs packages when the pod starts is refused before anything runs.

Not reproduced (the README lists them): caching, resources and GPUs, node selectors and tolerations,
volume sizes, storage classes and ``/dev/shm``, retries, parallelism limits, and the image itself (the
tasks run with this environment's interpreter, which must have the image's packages: ``make`` installs
the same lock).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tckr.core.config import KubernetesConfig
from tckr.core.errors import TckrError

RUN_ID_FIELD = "metadata.labels['pipeline/runid']"
# What the image sets (docker/Dockerfile, runtime stage), relative to the pod's home.
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "HF_HOME": "{home}/.cache/huggingface"}
INSTALL_AT_START = re.compile(r"\bpip3?\b[^\n]*\binstall\b")
ARTIFACT_MOUNT = "minio"  # where a pod sees its artifacts: /minio/<bucket>/<key> on a cluster
SITECUSTOMIZE = '''\
"""The rehearsal's cluster network: the services by their in-cluster names, nothing else by name."""
import json
import os
import socket

_SERVICES = {(host, int(port)): (local_host, int(local_port)) for host, port, local_host, local_port
             in json.loads(os.environ["TCKR_REHEARSAL_SERVICES"])}
_NAMES = {host for host, _ in _SERVICES}
_LOOPBACK = {"localhost", "127.0.0.1", "::1", None}
_getaddrinfo = socket.getaddrinfo


def _cluster_getaddrinfo(host, port, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    target = _SERVICES.get((name, int(port or 0)))
    if target is not None:
        return _getaddrinfo(target[0], target[1], *args, **kwargs)
    if name in _NAMES:
        raise socket.gaierror(socket.EAI_SERVICE, f"{name} has no port {port} in this cluster")
    if name in _LOOPBACK:
        return _getaddrinfo(host, port, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, f"{name}: not resolvable from a pod of the rehearsal (no internet)")


socket.getaddrinfo = _cluster_getaddrinfo
'''


class RehearsalError(TckrError, RuntimeError):
    """The compiled pipeline would fail on a cluster."""


@dataclass(frozen=True)
class ClusterStandIn:
    """What a cluster provides a pod: its services (in-cluster ``(host, port)`` -> local ``(host, port)``),
    its Kubernetes secrets (name -> key -> value) and the image's interpreter."""

    services: dict[tuple[str, int], tuple[str, int]]
    secrets: dict[str, dict[str, str]] = field(repr=False)
    python_bin: Path = Path(sys.executable).parent


@dataclass
class RuntimeArtifact:
    """One artifact as the launcher tracks it: its name, type and metadata, and where its files are kept."""

    name: str
    schema: str
    stored: Path
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskOutputs:
    parameters: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, list[RuntimeArtifact]] = field(default_factory=dict)


class TaskFailed(RehearsalError):
    """One task failed (its pod's error, or what a cluster would refuse it); the run goes on where it can."""

    def __init__(self, task: str, message: str) -> None:
        super().__init__(f"task '{task}' {message}")


def load_package(path: Path) -> tuple[dict, dict]:
    """The pipeline spec and its Kubernetes platform spec (empty when the pipeline sets none)."""
    documents = list(yaml.safe_load_all(Path(path).read_text()))
    platform = documents[1] if len(documents) > 1 else {}
    return documents[0], platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})


def packages_installed_at_start(spec: dict) -> list[str]:
    """Executors whose container command installs packages when the pod starts."""
    return sorted(label for label, executor in spec["deploymentSpec"]["executors"].items()
                  if INSTALL_AT_START.search(" ".join(executor.get("container", {}).get("command", []))))


class Rehearsal:
    """One run of a compiled pipeline package under ``workdir`` (pods' scratch, the artifact store, logs)."""

    def __init__(self, package: Path, cluster: ClusterStandIn, workdir: Path,
                 echo: Callable[[str], None] = print) -> None:
        self.spec, self.kubernetes = load_package(package)
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.echo = echo
        self.run_id = uuid.uuid4().hex
        self.store = self.workdir / "store" / "v2" / "artifacts" / self.spec["pipelineInfo"]["name"] / self.run_id
        self.logs = self.workdir / "logs"
        self.tasks_run: list[str] = []

    def run(self, arguments: dict[str, Any]) -> TaskOutputs:
        """Run the pipeline with ``arguments`` over its defaults; raises :class:`RehearsalError` on the first
        failure (after running any exit handler, as a cluster does)."""
        installing = packages_installed_at_start(self.spec)
        if installing:
            raise RehearsalError(
                f"{len(installing)} components install packages when their pod starts ({', '.join(installing[:3])}"
                f"{', ...' if len(installing) > 3 else ''}: `pip install kfp`): a cluster without internet fails "
                "there; compile with the packages baked into the image (install_kfp_package=False)")
        root = self.spec["root"]
        unknown = set(arguments) - set(root.get("inputDefinitions", {}).get("parameters", {}))
        if unknown:
            raise RehearsalError(f"the pipeline has no parameter {sorted(unknown)[0]!r}")
        parameters = {name: _typed(definition.get("defaultValue"), definition["parameterType"])
                      for name, definition in root.get("inputDefinitions", {}).get("parameters", {}).items()}
        parameters |= arguments
        return self._dag(root, parameters, {}, scope=())

    # -- graph ------------------------------------------------------------------------------------------

    def _dag(self, component: dict, parameters: dict[str, Any], artifacts: dict[str, list[RuntimeArtifact]],
             scope: tuple[str, ...]) -> TaskOutputs:
        tasks = component["dag"]["tasks"]
        done: dict[str, TaskOutputs] = {}
        failure: TaskFailed | None = None
        for name in _topological(tasks):
            task = tasks[name]
            upstream_failed = failure is not None and _waits_on_a_failure(tasks, name, done)
            runs_anyway = task.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"
            if upstream_failed and not runs_anyway:
                continue
            try:
                done[name] = self._task(name, task, parameters, artifacts, done, scope, failure)
            except TaskFailed as error:
                failure = failure or error
        if failure is not None:
            raise failure
        return self._dag_outputs(component, done)

    def _dag_outputs(self, component: dict, done: dict[str, TaskOutputs]) -> TaskOutputs:
        outputs = TaskOutputs()
        for key, selector in component["dag"].get("outputs", {}).get("artifacts", {}).items():
            outputs.artifacts[key] = [artifact for chosen in selector["artifactSelectors"]
                                      for artifact in done[chosen["producerSubtask"]].artifacts.get(
                                          chosen["outputArtifactKey"], [])]
        for key, selector in component["dag"].get("outputs", {}).get("parameters", {}).items():
            chosen = selector["valueFromParameter"]
            outputs.parameters[key] = done[chosen["producerSubtask"]].parameters[chosen["outputParameterKey"]]
        return outputs

    def _task(self, name: str, task: dict, parameters: dict[str, Any], artifacts: dict[str, list[RuntimeArtifact]],
              done: dict[str, TaskOutputs], scope: tuple[str, ...], failure: TaskFailed | None) -> TaskOutputs:
        component = self.spec["components"][task["componentRef"]["name"]]
        inputs, input_artifacts = self._resolve(name, task, parameters, artifacts, done, failure)
        if "dag" not in component:
            return self._execute(name, component, inputs, input_artifacts, scope)
        iterator = task.get("parameterIterator")
        if iterator is None:
            return self._dag(component, inputs, input_artifacts, scope + (name,))
        items = inputs[iterator["items"]["inputParameter"]]
        items = json.loads(items) if isinstance(items, str) else items
        per_item = [self._dag(component, inputs | {iterator["itemInput"]: item}, input_artifacts,
                              scope + (f"{name}-{index}",)) for index, item in enumerate(items)]
        collected = TaskOutputs()
        for key in component["dag"].get("outputs", {}).get("artifacts", {}):
            collected.artifacts[key] = [artifact for outputs in per_item for artifact in outputs.artifacts[key]]
        return collected

    def _resolve(self, name: str, task: dict, parameters: dict[str, Any],
                 artifacts: dict[str, list[RuntimeArtifact]], done: dict[str, TaskOutputs],
                 failure: TaskFailed | None) -> tuple[dict[str, Any], dict[str, list[RuntimeArtifact]]]:
        values: dict[str, Any] = {}
        for key, source in task.get("inputs", {}).get("parameters", {}).items():
            if "componentInputParameter" in source:
                values[key] = parameters[source["componentInputParameter"]]
            elif "taskOutputParameter" in source:
                producer = source["taskOutputParameter"]
                values[key] = done[producer["producerTask"]].parameters[producer["outputParameterKey"]]
            elif "runtimeValue" in source:
                values[key] = source["runtimeValue"]["constant"]
            elif "taskFinalStatus" in source:  # an exit handler's view of the tasks it guards
                values[key] = {"state": "FAILED" if failure else "SUCCEEDED",
                               "pipelineJobResourceName": self.run_id, "pipelineTaskName": name,
                               "error": {"code": 1, "message": str(failure)} if failure else {}}
            else:
                raise RehearsalError(f"task '{name}': input parameter {key!r} has a source the rehearsal does not "
                                     f"know ({sorted(source)})")
        inputs: dict[str, list[RuntimeArtifact]] = {}
        for key, source in task.get("inputs", {}).get("artifacts", {}).items():
            if "componentInputArtifact" in source:
                inputs[key] = artifacts[source["componentInputArtifact"]]
            else:
                producer = source["taskOutputArtifact"]
                inputs[key] = done[producer["producerTask"]].artifacts[producer["outputArtifactKey"]]
        return values, inputs

    # -- one pod ----------------------------------------------------------------------------------------

    def _execute(self, name: str, component: dict, parameters: dict[str, Any],
                 artifacts: dict[str, list[RuntimeArtifact]], scope: tuple[str, ...]) -> TaskOutputs:
        label = component["executorLabel"]
        container = self.spec["deploymentSpec"]["executors"][label]["container"]
        task_path = "/".join((*scope, name))
        pod = self.workdir / "pods" / task_path.replace("/", "_")
        shutil.rmtree(pod, ignore_errors=True)
        mount = pod / ARTIFACT_MOUNT
        definitions = component.get("inputDefinitions", {})
        executor_input = {"inputs": {
            "parameterValues": {key: _typed(value, definitions["parameters"][key]["parameterType"])
                                for key, value in parameters.items()},
            "artifacts": {key: {"artifacts": [self._download(artifact, mount) for artifact in given]}
                          for key, given in artifacts.items()}}}
        outputs_declared = component.get("outputDefinitions", {}).get("artifacts", {})
        output_paths = {key: mount / "outputs" / task_path / key for key in outputs_declared}
        output_file = pod / "tmp" / "kfp_outputs" / "output_metadata.json"
        executor_input["outputs"] = {
            "artifacts": {key: {"artifacts": [{"name": key, "uri": str(output_paths[key]), "metadata": {},
                                               "type": definition["artifactType"]}]}
                          for key, definition in outputs_declared.items()},
            "parameters": {key: {"outputFile": str(pod / "tmp" / "kfp_outputs" / key)}
                           for key in component.get("outputDefinitions", {}).get("parameters", {})},
            "outputFile": str(output_file)}
        for path in (pod / "home", output_file.parent):
            path.mkdir(parents=True)
        command = [*container["command"], *(_placeholder(argument, executor_input, name)
                                            for argument in container.get("args", []))]
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{task_path.replace('/', '_')}.log"
        self.echo(f"rehearse: {task_path}")
        started = time.perf_counter()
        with open(log_path, "w") as log:
            done = subprocess.run(command, env=self._pod_env(label, container, pod), cwd=pod / "home",
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.tasks_run.append(task_path)
        if done.returncode != 0:
            raise TaskFailed(task_path, f"exited with code {done.returncode}: {_last_error(log_path)} "
                                        f"(full log: {log_path})")
        stray = sorted(str(path.relative_to(mount)) for path in mount.rglob("*") if path.is_file()
                       and not any(path.is_relative_to(out) for out in output_paths.values())
                       and not path.is_relative_to(mount / "inputs"))
        if stray:
            raise TaskFailed(task_path, f"wrote {len(stray)} files outside its declared outputs (lost with the pod "
                                        f"on a cluster): {', '.join(stray[:4])}{', ...' if len(stray) > 4 else ''}")
        result = json.loads(output_file.read_text()) if output_file.exists() else {}
        outputs = TaskOutputs(parameters=result.get("parameterValues", {}))
        for key, definition in outputs_declared.items():
            written = result.get("artifacts", {}).get(key, {}).get("artifacts", [{}])[0]
            outputs.artifacts[key] = [self._upload(key, definition, output_paths[key], task_path,
                                                   written.get("metadata", {}))]
        self.echo(f"rehearse: {task_path} done in {time.perf_counter() - started:.1f} s")
        return outputs

    def _download(self, artifact: RuntimeArtifact, mount: Path) -> dict[str, Any]:
        """The input as the launcher hands it over: a local copy under the pod's mount."""
        local = mount / "inputs" / artifact.stored.relative_to(self.store)
        _copy(artifact.stored, local)
        return {"name": artifact.name, "uri": str(local), "metadata": artifact.metadata,
                "type": {"schemaTitle": artifact.schema}}

    def _upload(self, key: str, definition: dict, written: Path, task_path: str,
                metadata: dict[str, Any]) -> RuntimeArtifact:
        stored = self.store / task_path / key
        _copy(written, stored)
        return RuntimeArtifact(key, definition["artifactType"]["schemaTitle"], stored, metadata)

    def _volumes(self, settings: dict, pod: Path) -> dict[str, Path]:
        """A pod's volumes, mount path -> the directory standing in for it (``/dev/shm`` is the host's)."""
        volumes = {entry["mountPath"]: self.workdir / "pvcs" / entry["constant"]
                   for entry in settings.get("pvcMount", [])}
        for kind in ("genericEphemeralVolume", "emptyDirMounts"):
            volumes |= {entry["mountPath"]: pod / "volumes" / entry["volumeName"] for entry in settings.get(kind, [])
                        if entry["mountPath"] != "/dev/shm"}
        return volumes

    def _pod_env(self, label: str, container: dict, pod: Path) -> dict[str, str]:
        home = pod / "home"
        site = pod / "rehearsal-site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {"PATH": f"{self.cluster.python_bin}{os.pathsep}/usr/local/bin{os.pathsep}/usr/bin{os.pathsep}/bin",
               "HOME": str(home), "LANG": "C.UTF-8", "PYTHONPATH": str(site),
               "TCKR_REHEARSAL_SERVICES": json.dumps([[*name, *local] for name, local in
                                                      self.cluster.services.items()])}
        env |= {key: value.format(home=home) for key, value in IMAGE_ENV.items()}
        env |= {variable["name"]: str(variable["value"]) for variable in container.get("env", [])}
        settings = self.kubernetes.get("executors", {}).get(label, {})
        for mount_path, local in self._volumes(settings, pod).items():
            local.mkdir(parents=True, exist_ok=True)
            env |= {key: str(local) + value[len(mount_path):] for key, value in env.items()
                    if value == mount_path or value.startswith(mount_path + "/")}
        for entry in settings.get("secretAsEnv", []):
            secret = self.cluster.secrets.get(entry["secretName"])
            if secret is None:
                if entry.get("optional"):
                    continue
                raise TaskFailed(label, f"needs Kubernetes secret {entry['secretName']!r}, which does not exist "
                                        "(the pod would stay in CreateContainerConfigError)")
            env |= {mapping["envVar"]: secret[mapping["secretKey"]] for mapping in entry["keyToEnv"]}
        for entry in settings.get("fieldPathAsEnv", []):
            if entry["fieldPath"] != RUN_ID_FIELD:
                raise TaskFailed(label, f"reads pod field {entry['fieldPath']!r}, which the rehearsal does not set")
            env[entry["name"]] = self.run_id
        return env


def _copy(source: Path, target: Path) -> None:
    """An artifact's files (a directory or one file; nothing when the task wrote none) to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.exists():
        shutil.copyfile(source, target)


def _typed(value: Any, parameter_type: str) -> Any:
    """A parameter value as the backend passes it (YAML gives defaults of integer parameters as floats)."""
    if value is None:
        return None
    if parameter_type == "NUMBER_INTEGER":
        return int(value)
    if parameter_type == "NUMBER_DOUBLE":
        return float(value)
    return value


def _placeholder(argument: str, executor_input: dict, task: str) -> str:
    if argument == "{{$}}":
        return json.dumps(executor_input)
    if "{{$" in argument:
        raise RehearsalError(f"task '{task}': argument {argument!r} has a placeholder the rehearsal does not resolve")
    return argument


def _topological(tasks: dict[str, dict]) -> list[str]:
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(tasks):
        ready = sorted(name for name, task in tasks.items() if name not in placed
                       and set(task.get("dependentTasks", [])) <= placed)
        if not ready:
            raise RehearsalError(f"tasks {sorted(set(tasks) - placed)} depend on each other or on a missing task")
        order += ready
        placed |= set(ready)
    return order


def _waits_on_a_failure(tasks: dict[str, dict], name: str, done: dict[str, TaskOutputs]) -> bool:
    """Whether ``name`` waits on a task that failed or did not run (tasks come in dependency order)."""
    return any(upstream not in done for upstream in tasks[name].get("dependentTasks", []))


def _last_error(log_path: Path) -> str:
    """The task's own one-line error (tckr prints ``tckr: ...``), else the log's last line."""
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("tckr:")]
    return (ours or lines or ["no output"])[-1]


# -- the stand-in cluster -------------------------------------------------------------------------------

LOCAL_SERVER_OPTIONS = ("--host", "--port", "--workers", "--backend-store-uri", "--artifacts-destination",
                        "--serve-artifacts")
"""Deployment options the local server sets its own way (where it listens, where it keeps things)."""


@dataclass
class RehearsalOutcome:
    tasks: list[str]
    outputs: TaskOutputs
    parent_run_status: str
    seconds: float


def deployment_server_options(deployment: Path) -> tuple[str, ...]:
    """The MLflow server options of the cluster's deployment (``mlflow/k8s/deployment.yaml``) that decide how it
    answers requests (``--allowed-hosts``, ...): the stand-in server runs with them."""
    for document in yaml.safe_load_all(Path(deployment).read_text()):
        if (document or {}).get("kind") != "Deployment":
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            if container["name"] == "mlflow":
                return tuple(option for option in container.get("args", [])
                             if option.split("=", 1)[0] not in LOCAL_SERVER_OPTIONS)
    raise RehearsalError(f"{deployment} has no Deployment with an 'mlflow' container")


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def rehearse_package(package: Path, arguments: dict[str, Any], cluster: KubernetesConfig, workdir: Path,
                     deployment: Path, echo: Callable[[str], None] = print) -> RehearsalOutcome:
    """Rehearse ``package`` against a stand-in cluster under ``workdir``: SeaweedFS as its object store, an MLflow
    server started with the deployment's options, both reached by the names ``cluster`` gives the pods, and the
    object-store secret holding the store's keys. A run that succeeds must leave its MLflow parent run FINISHED;
    one that fails must not leave it RUNNING."""
    import mlflow

    from tckr.platform.services import start_mlflow, start_seaweedfs

    workdir = Path(workdir)
    started = time.perf_counter()
    s3_server, s3 = start_seaweedfs(workdir / "s3")
    try:
        mlflow_server, tracking_uri = start_mlflow(workdir / "mlflow", s3,
                                                   options=deployment_server_options(deployment))
        try:
            secrets = ({cluster.s3_secret: {"accesskey": s3.credentials.access_key,
                                            "secretkey": s3.credentials.secret_key}} if cluster.s3_secret else {})
            stand_in = ClusterStandIn({_host_port(cluster.tracking_uri): _host_port(tracking_uri),
                                       _host_port(cluster.s3_endpoint): _host_port(s3.url)}, secrets)
            rehearsal = Rehearsal(package, stand_in, workdir, echo)
            try:
                outputs = rehearsal.run(arguments)
                failure = None
            except TaskFailed as error:
                outputs, failure = TaskOutputs(), error
            client = mlflow.MlflowClient(tracking_uri)
            parents = [run for experiment in client.search_experiments()
                       for run in client.search_runs([experiment.experiment_id],
                                                     f"tags.`tckr.run_name` = '{arguments['run_name']}'")]
            status = parents[0].info.status if parents else "MISSING"
        finally:
            mlflow_server.stop()
    finally:
        s3_server.stop()
    if failure is not None:
        left = ", left RUNNING: nothing closed it" if status == "RUNNING" else ""
        raise RehearsalError(f"{failure}; MLflow parent run {status}{left}")
    if status != "FINISHED":
        raise RehearsalError(f"the pipeline succeeded but its MLflow parent run is {status}, not FINISHED")
    return RehearsalOutcome(rehearsal.tasks_run, outputs, status, time.perf_counter() - started)
