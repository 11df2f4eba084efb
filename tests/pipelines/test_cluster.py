"""The compiled pipeline as a cluster sees it: resources, GPUs, placement, images, secrets, caching.

Static: compiles the pipeline and reads the YAML; no cluster, no Docker.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import tckr.pipelines
from tckr.components import default_images
from tckr.core.distributed import PROCESSES_ENV
from tckr.core.errors import ConfigError
from tckr.pipelines.cluster import KFP_RUN_ID_FIELD
from tckr.pipelines.compile import COMMITTED, compile_pipeline, pipeline_for
from tckr.platform.tracking import KFP_RUN_ID_ENV
from tckr.recipes.config import RECIPES, load_config
from tckr.recipes.tckr.stages import STAGES

pytestmark = pytest.mark.unit  # starts no server, trains nothing beyond a few steps

IMAGE, CUDA_IMAGE = default_images()  # this code's, tagged by content (tests/test_images.py)

GPU_STAGES = {stage.name for stage in STAGES if stage.resources["gpus"]}
TRACKED_STAGES = {"start_run", "finish_run", "ingest", "teacher", "caption", "generator", "finetune", "generate",
                  "audit", "fid", "student", "negative_control", "positive_control", "attack", "register",
                  "report"}  # the components that take tracking_uri
PER_RUN_PARAMETERS = {"run_name"}  # tckr.platform.runner.new_run_name: new every run
CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME",
                        "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"}
PLACEMENT_VARIABLES = {PROCESSES_ENV, "TMPDIR", "HF_HOME", "TCKR_CACHE"}  # processes per pod, the scratch volume


def _read(path: Path) -> tuple[dict, dict, str]:
    """The pipeline spec, the Kubernetes settings per executor, and the raw text of a compiled pipeline."""
    text = path.read_text()
    spec, platform = yaml.safe_load_all(text)
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"], text


def _compile(tmp_path: Path, overrides: list[str] = (), profile: str = "paper-cifar10") -> tuple[dict, dict, str]:
    return _read(compile_pipeline(load_config(profile, overrides), tmp_path))


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("paper"))


def _executors(spec: dict) -> dict[str, dict]:
    """Stage name (``generate_shard``) -> its container."""
    return {name.removeprefix("exec-").replace("-", "_"): executor["container"]
            for name, executor in spec["deploymentSpec"]["executors"].items()}


def _tasks(spec: dict):
    """Every task of every DAG (the fan-outs' tasks live in their loop's DAG): (stage, task, dag name)."""
    dags = {"root": spec["root"]} | {name: c for name, c in spec["components"].items() if "dag" in c}
    for dag_name, component in dags.items():
        for task in component["dag"]["tasks"].values():
            executor = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if executor:
                yield executor.removeprefix("exec-").replace("-", "_"), task, dag_name


@pytest.mark.parametrize("recipe", ["tckr", "privimage"])
def test_each_committed_pipeline_is_its_paper_profile_with_a_task_for_every_declared_stage(recipe):
    stages = RECIPES[recipe].stages
    committed_path = Path(tckr.pipelines.__file__).parent / f"{recipe}_pipeline.yaml"
    committed, _, _ = _read(committed_path)
    assert set(_executors(committed)) == set(stages.names())
    profile = load_config(COMMITTED[recipe])
    assert profile.recipe == recipe and set(profile.kubernetes.stages) == set(stages.names())


def test_every_task_requests_its_declared_cpu_and_memory(paper):
    spec, _, _ = paper
    for stage, container in _executors(spec).items():
        need, resources = STAGES[stage].resources, container["resources"]
        assert resources["resourceCpuRequest"] == need["cpu"] and resources["resourceCpuLimit"] == need["cpu_limit"]
        assert resources["resourceMemoryRequest"] == need["memory"]
        assert resources["resourceMemoryLimit"] == need["memory_limit"]


def test_gpu_stages_get_one_gpu_the_cuda_image_and_gpu_nodes(paper):
    spec, platform, _ = paper
    assert sorted(GPU_STAGES) == ["attack", "audit", "caption", "fid", "finetune", "generate", "generate_shard",
                                  "negative_control", "positive_control", "shadow_group", "student", "teacher"]
    for stage, container in _executors(spec).items():
        placement = platform.get(f"exec-{stage.replace('_', '-')}", {})
        if stage in GPU_STAGES:
            accelerator = container["resources"]["accelerator"]
            assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1"
            assert container["image"] == CUDA_IMAGE
            assert placement["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
            assert placement["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                                 "effect": "NoSchedule"}]
        else:
            assert "accelerator" not in container["resources"] and container["image"] == IMAGE
            assert "nodeSelector" not in placement and "tolerations" not in placement


def test_tasks_use_the_two_project_images(paper):
    """CPU tasks the slim image, GPU tasks the CUDA one (their tags: tests/test_images.py)."""
    spec, _, _ = paper
    assert {c["image"] for c in _executors(spec).values()} == {IMAGE, CUDA_IMAGE}


def test_tckr_compile_names_the_images_it_is_given(tmp_path):
    """Another registry's tags (``make images IMAGE_REPO=...`` prints them): every task runs one of them."""
    from tckr.cli import main

    cpu = "registry.example:5000/ml/tckr:0.1.0-0123456789ab"
    cuda = f"{cpu}-cuda"
    assert main(["compile", "--profile", "paper-cifar10", "--out-dir", str(tmp_path), "--image", cpu,
                 "--cuda-image", cuda]) == 0
    spec, _, _ = _read(tmp_path / "tckr_pipeline.yaml")
    images = {name: c["image"] for name, c in _executors(spec).items()}
    assert {images[name] for name in GPU_STAGES} == {cuda}
    assert {image for name, image in images.items() if name not in GPU_STAGES} == {cpu}


def test_data_loading_stages_get_a_memory_backed_dev_shm(paper):
    spec, platform, _ = paper
    for stage in _executors(spec):
        mounts = platform.get(f"exec-{stage.replace('_', '-')}", {}).get("emptyDirMounts", [])
        if stage in {"teacher", "student", "shadow_group", "negative_control", "positive_control"}:
            assert mounts == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "8Gi"}]
        else:
            assert mounts == []


def test_tracked_tasks_get_credentials_from_secrets_only(paper):
    spec, platform, text = paper
    for stage, container in _executors(spec).items():
        secrets = platform.get(f"exec-{stage.replace('_', '-')}", {}).get("secretAsEnv", [])
        env = {e["name"]: e["value"] for e in container.get("env", []) if e["name"] not in PLACEMENT_VARIABLES}
        assert not CREDENTIAL_VARIABLES & set(env)
        if stage not in TRACKED_STAGES:
            assert secrets == [] and env == {}
            continue
        by_name = {s["secretName"]: s for s in secrets}
        assert set(by_name) == {"mlpipeline-minio-artifact", "tckr-mlflow"}
        assert by_name["mlpipeline-minio-artifact"]["keyToEnv"] == [
            {"secretKey": "accesskey", "envVar": "AWS_ACCESS_KEY_ID"},
            {"secretKey": "secretkey", "envVar": "AWS_SECRET_ACCESS_KEY"}]
        assert by_name["mlpipeline-minio-artifact"]["optional"] is False
        assert {k["envVar"] for k in by_name["tckr-mlflow"]["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME",
                                                                               "MLFLOW_TRACKING_PASSWORD"}
        assert by_name["tckr-mlflow"]["optional"] is True  # a server without authentication has no secret
        assert env == {"MLFLOW_S3_ENDPOINT_URL": "http://minio-service.kubeflow:9000"}
    # No credential value anywhere: neither KFP's/MinIO's well-known defaults nor a "password: ..." assignment
    # (secret *key names* such as `secretKey: password` are references, and pass).
    assert not re.search(r"minio123|minioadmin|(?i:access_?key_?id|secret_?access_?key|password|token)['\"]?\s*[:=]",
                         text)


def test_secrets_can_be_switched_off(tmp_path):
    spec, platform, _ = _compile(tmp_path, ["kubernetes.s3_secret=null", "kubernetes.mlflow_secret=null"])
    assert not any("secretAsEnv" in p for p in platform.values())
    assert all(set(e["name"] for e in c.get("env", [])) <= PLACEMENT_VARIABLES for c in _executors(spec).values())


def _followed(spec: dict, parameter: dict, dag: str) -> dict:
    """A task's parameter followed up through the DAGs that pass it down (the exit handler's, a fan-out loop's) to
    where it comes from: a pipeline parameter, another task's output, a constant, or a loop's item."""
    dags = {"root": spec["root"]} | {name: c for name, c in spec["components"].items() if "dag" in c}
    callers = {task["componentRef"]["name"]: (name, task) for name, component in dags.items()
               for task in component["dag"]["tasks"].values() if task["componentRef"]["name"] in dags}
    while dag != "root" and "componentInputParameter" in parameter:
        parent, task = callers[dag]
        given = task["inputs"].get("parameters", {}).get(parameter["componentInputParameter"])
        if given is None:  # the loop's item
            return parameter
        parameter, dag = given, parent
    return parameter


def _resolved_inputs(spec: dict) -> dict[str, dict]:
    """Each stage's task inputs as the KFP backend resolves them for its cache key: pipeline parameters to their
    (default) values, constants to themselves, other tasks' outputs to ``producer.output``; inputs of the exit
    handler's and loops' DAGs followed to what their task was given."""
    root = spec["root"]["inputDefinitions"]["parameters"]

    def value(parameter: dict, dag: str):
        parameter = _followed(spec, parameter, dag)
        if "componentInputParameter" in parameter:
            name = parameter["componentInputParameter"]
            return root[name].get("defaultValue") if name in root else f"loop item {name}"
        if "taskOutputParameter" in parameter:
            output = parameter["taskOutputParameter"]
            return f"{output['producerTask']}.{output['outputParameterKey']}"
        return parameter.get("runtimeValue", {}).get("constant")

    resolved = {}
    for stage, task, dag in _tasks(spec):
        inputs = {name: value(parameter, dag) for name, parameter in task["inputs"].get("parameters", {}).items()}
        for name, artifact in task["inputs"].get("artifacts", {}).items():
            source = artifact.get("taskOutputArtifact") or artifact
            inputs[name] = str(source)
        resolved[stage] = inputs
    return resolved


def test_every_task_receives_only_its_own_sections(paper):
    """Sections travel as pipeline parameters of their own name; a task takes exactly those its stage declares."""
    spec, _, _ = paper
    sections = set(load_config("paper-cifar10").model_fields)
    for stage, inputs in _resolved_inputs(spec).items():
        declared = STAGES[stage].sections
        expected = sections if declared == ("*",) else set(declared)
        assert set(inputs) & sections == expected, stage


def test_an_attack_setting_leaves_every_earlier_task_cached(tmp_path):
    """Cluster caching keys on a task's resolved inputs: changing attack.* must give the upstream tasks exactly
    the inputs they had (so they are reused), and the shadow and attack tasks new ones."""
    before = _resolved_inputs(_compile(tmp_path / "a")[0])
    after = _resolved_inputs(_compile(tmp_path / "b", ["attack.shadows=32", "attack.seed=7",
                                                       "attack.variance=per_example"])[0])
    for stage in ("ingest", "teacher", "caption", "generator", "finetune", "generation_plan", "generate_shard",
                  "generate", "student", "negative_control", "positive_control"):
        assert before[stage] == after[stage], stage
    for stage in ("shadow_plan", "shadow_group", "attack"):
        assert before[stage] != after[stage], stage
    assert after["attack"]["attack"] != before["attack"]["attack"]


def _parameter_sources(spec: dict, task: dict, dag: str) -> set[str]:
    """Where a task's parameters come from: a pipeline parameter's name, or ``task:<producer>`` for another
    task's output; inputs of the exit handler's and loops' DAGs are followed to what their task was given."""
    sources = set()
    for parameter in task["inputs"].get("parameters", {}).values():
        parameter = _followed(spec, parameter, dag)
        if "taskOutputParameter" in parameter:
            sources.add(f"task:{parameter['taskOutputParameter']['producerTask']}")
        elif "componentInputParameter" in parameter:
            sources.add(parameter["componentInputParameter"])
    return sources


def test_no_cached_task_takes_a_per_run_input(paper):
    """A cached task given anything new every run (the run name, or what start_run makes from it) would
    never hit the cache. The tasks that log to MLflow find the parent run by the KFP run id instead, which
    the pod's own label gives them, and run after start_run, which opens that parent run and returns nothing."""
    spec, platform, _ = paper
    assert "outputDefinitions" not in spec["components"]["comp-start-run"]
    tracked = set()
    for stage, task, dag in _tasks(spec):
        sources = _parameter_sources(spec, task, dag)
        assert "task:start-run" not in sources, stage
        if stage == "start_run":
            assert sources >= PER_RUN_PARAMETERS and task["cachingOptions"] == {}
        else:
            assert not PER_RUN_PARAMETERS & sources, stage
        if "tracking_uri" in task["inputs"]["parameters"]:
            tracked.add(stage)
            executor = platform[f"exec-{stage.replace('_', '-')}"]
            assert executor["fieldPathAsEnv"] == [{"name": KFP_RUN_ID_ENV, "fieldPath": KFP_RUN_ID_FIELD}], stage
            # finish_run, the exit handler, runs after everything, start_run included
            assert stage in ("start_run", "finish_run") or "start-run" in task["dependentTasks"], stage
        else:
            assert "fieldPathAsEnv" not in platform.get(f"exec-{stage.replace('_', '-')}", {}), stage
    assert tracked == TRACKED_STAGES
    assert KFP_RUN_ID_FIELD == "metadata.labels['pipeline/runid']"  # what KFP's API server labels run pods with


def test_only_run_bookkeeping_is_uncached(paper):
    """start_run opens a new MLflow parent run; register makes new model versions; report closes the run, or
    finish_run does when a task failed."""
    spec, _, _ = paper
    uncached = {stage for stage, task, _ in _tasks(spec) if not task.get("cachingOptions", {}).get("enableCache")}
    assert uncached == {"start_run", "register", "report", "finish_run"}


def test_demo_profile_compiles_for_a_cpu_cluster(tmp_path):
    spec, platform, _ = _compile(tmp_path, profile="demo")
    containers = _executors(spec)
    assert all("accelerator" not in c["resources"] and c["image"] == IMAGE for c in containers.values())
    assert not any("nodeSelector" in p or "tolerations" in p or "emptyDirMounts" in p for p in platform.values())
    assert containers["teacher"]["resources"]["resourceMemoryLimit"] == "4Gi"


def test_overrides_reach_the_compiled_task(tmp_path):
    spec, platform, _ = _compile(tmp_path, ["kubernetes.stages.teacher.memory=40Gi",
                                            "kubernetes.gpu_node_selector={cloud.google.com/gke-accelerator: "
                                            "nvidia-l4}"])
    assert _executors(spec)["teacher"]["resources"]["resourceMemoryRequest"] == "40Gi"
    assert _executors(spec)["teacher"]["resources"]["resourceMemoryLimit"] == "48Gi"  # merged over the default
    assert platform["exec-teacher"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}


def test_resumable_stages_are_retried_and_bookkeeping_is_not(paper):
    """A failed pod (evicted, preempted, OOM) of a stage that may run again is retried with backoff; start_run,
    register, report and finish_run have side effects (a parent run, model versions) and run once."""
    spec, _, _ = paper
    cfg = load_config("paper-cifar10").kubernetes
    for stage, task, _ in _tasks(spec):
        if stage in ("start_run", "register", "report", "finish_run"):
            assert "retryPolicy" not in task, stage
        else:
            assert task["retryPolicy"] == {"maxRetryCount": cfg.retries, "backoffDuration": "60s",
                                           "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}, stage


@pytest.mark.parametrize(("override", "expected"), [((), 8), (("kubernetes.parallelism=3",), 3)])
def test_fan_outs_run_at_most_parallelism_pods_at_once(tmp_path, override, expected):
    spec, _, _ = _compile(tmp_path, list(override))
    loops = [task for _, component in spec["components"].items() if "dag" in component
             for task in component["dag"]["tasks"].values() if "parameterIterator" in task]
    assert len(loops) == 2
    assert all(task["iteratorPolicy"] == {"parallelismLimit": expected} for task in loops)


def test_a_local_run_takes_its_fan_outs_one_task_at_a_time():
    """kfp.local would run two loop iterations at once on one machine whose cores each task's torch already uses."""
    from tckr.pipelines.compile import local_pipeline

    cfg = load_config("demo")
    loops = [task for component in local_pipeline(cfg).pipeline_spec.components.values()
             for task in component.dag.tasks.values() if task.HasField("parameter_iterator")]
    assert len(loops) == 2
    assert all(task.iterator_policy.parallelism_limit == 1 for task in loops)


def test_a_multi_gpu_stage_requests_all_its_gpus(tmp_path):
    """Its pod gets every GPU; the launcher runs one process per GPU in it (tests/core/test_distributed.py)."""
    spec, _, _ = _compile(tmp_path, ["kubernetes.stages.teacher.gpus=4"])
    containers = _executors(spec)
    assert containers["teacher"]["resources"]["accelerator"]["resourceCount"] == "4"
    assert containers["student"]["resources"]["accelerator"]["resourceCount"] == "1"
    assert {e["name"]: e["value"] for e in containers["teacher"]["env"]}[PROCESSES_ENV] == "4"
    assert {e["name"]: e["value"] for e in containers["student"]["env"]}[PROCESSES_ENV] == "1"
    assert PROCESSES_ENV not in {e["name"] for e in containers["caption"].get("env", [])}  # one device only


@pytest.mark.parametrize(("override", "message"), [
    ("kubernetes.stages.teachr.gpus=1", "unknown stages \\['teachr'\\]"),
    ("kubernetes.stages.teacher.memory_limit=16Gi", "memory_limit 16Gi is below the request 32Gi"),
    ("kubernetes.stages.teacher.cpu=4 cores", "kubernetes.stages.teacher.cpu: String should match pattern"),
])
def test_bad_resources_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("paper-cifar10", [override])


def test_kfp_local_ignores_the_cluster_settings(tmp_path):
    """`tckr run` executes the placed graph: kfp.local must run tasks that carry GPUs, secrets and mounts."""
    from kfp import compiler, dsl, local

    from tckr.components.factory import component
    from tckr.core.config import KubernetesConfig
    from tckr.pipelines.cluster import place_all_tasks

    cluster = KubernetesConfig(stages={"shadow_plan": {**STAGES["shadow_plan"].resources, "gpus": 1, "shm": "1Gi"}})

    @dsl.pipeline(name="placed")
    def placed(attack: str) -> list[int]:
        plan = component("tckr", "shadow_plan")(attack=attack)
        place_all_tasks(cluster, STAGES)
        return plan.output

    compiler.Compiler().compile(placed, str(tmp_path / "placed.yaml"))
    spec, platform, _ = _read(tmp_path / "placed.yaml")
    assert "accelerator" in _executors(spec)["shadow_plan"]["resources"] and platform["exec-shadow-plan"]
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"),
               raise_on_error=True)
    cfg = load_config("smoke")
    assert [int(g) for g in placed(attack=cfg.task_parameter("attack")).output] == [0, 1]


def test_profiles_change_placement_and_defaults_not_the_graph():
    """The demo and paper pipelines are one graph; only placement, the fan-outs' parallelism (compiled in, like
    placement; equal here) and the parameters' defaults differ."""
    demo = pipeline_for(load_config("demo", ["kubernetes.parallelism=8"])).pipeline_spec
    paper = pipeline_for(load_config("paper-cifar10")).pipeline_spec
    assert demo.root.dag == paper.root.dag and demo.components == paper.components
    assert demo.root.input_definitions != paper.root.input_definitions


def test_a_work_volume_is_mounted_in_every_task_with_the_caches_on_it(tmp_path):
    """kubernetes.work_pvc: every pod mounts it and finds the Hugging Face cache, tckr's caches and the volume
    (where the launcher puts the task's checkpoints, tests/training/test_loop.py) on it."""
    from tckr.core.volume import VOLUME_ENV
    from tckr.pipelines.cluster import VOLUME_MOUNT

    spec, platform, _ = _compile(tmp_path, ["kubernetes.work_pvc=tckr-work"])
    containers = _executors(spec)
    assert set(platform) == {f"exec-{name.replace('_', '-')}" for name in containers}
    for name, container in containers.items():
        assert platform[f"exec-{name.replace('_', '-')}"]["pvcMount"] == [
            {"constant": "tckr-work", "mountPath": VOLUME_MOUNT, "pvcNameParameter": {"runtimeValue": {
                "constant": "tckr-work"}}}], name
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert env["HF_HOME"] == f"{VOLUME_MOUNT}/huggingface" and env["TCKR_CACHE"] == f"{VOLUME_MOUNT}/cache"
        assert env[VOLUME_ENV] == VOLUME_MOUNT
    spec, platform, _ = _compile(tmp_path / "without")
    assert not any("pvcMount" in executor for executor in platform.values())
    assert not any(VOLUME_ENV in str(c.get("env")) for c in _executors(spec).values())


def test_stages_that_download_or_write_much_get_a_scratch_volume_the_scheduler_provisions(tmp_path):
    """kubernetes.stages.<name>.scratch: a generic ephemeral volume of that size at /scratch holding TMPDIR and,
    without a work volume, the hub caches; with one, the caches stay on it. Other stages get none."""
    from tckr.pipelines.cluster import SCRATCH_MOUNT, VOLUME_MOUNT

    cfg = load_config("paper-cifar10")
    wanted = {name: need.scratch for name, need in cfg.kubernetes.stages.items() if need.scratch}
    assert {"ingest", "caption", "finetune", "generate_shard"} <= set(wanted) and wanted["caption"] == "40Gi"
    spec, platform, _ = _compile(tmp_path, ["kubernetes.scratch_storage_class=fast-ssd",
                                            "kubernetes.stages.generate.scratch=null"])
    for name, container in _executors(spec).items():
        volumes = platform.get(f"exec-{name.replace('_', '-')}", {}).get("genericEphemeralVolume", [])
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if name in wanted and name != "generate":
            assert volumes == [{"volumeName": "scratch", "mountPath": SCRATCH_MOUNT, "accessModes": ["ReadWriteOnce"],
                                "size": wanted[name], "storageClassName": "fast-ssd"}], name
            assert env["TMPDIR"] == SCRATCH_MOUNT and env["HF_HOME"] == f"{SCRATCH_MOUNT}/huggingface", name
            assert env["TCKR_CACHE"] == f"{SCRATCH_MOUNT}/cache", name
        else:
            assert volumes == [] and "TMPDIR" not in env and "HF_HOME" not in env, name
    spec, platform, _ = _compile(tmp_path / "with-volume", ["kubernetes.work_pvc=tckr-work"])
    env = {e["name"]: e["value"] for e in _executors(spec)["caption"]["env"]}
    assert env["TMPDIR"] == SCRATCH_MOUNT and env["HF_HOME"] == f"{VOLUME_MOUNT}/huggingface"
    assert platform["exec-caption"]["genericEphemeralVolume"][0]["defaultStorageClass"] is True


def test_the_local_pipeline_is_not_placed(tmp_path):
    """kfp.local applies a task's environment and retry policy: the variables meant for a pod's volumes
    (TMPDIR=/scratch) would point at nothing on this machine, and a failed task would wait out the cluster's
    backoff before `tckr run` could say why. So the local pipeline carries no placement at all."""
    from kfp import compiler

    from tckr.pipelines.compile import local_pipeline

    compiler.Compiler().compile(local_pipeline(load_config("demo")), str(tmp_path / "local.yaml"))
    documents = list(yaml.safe_load_all((tmp_path / "local.yaml").read_text()))
    assert len(documents) == 1  # no Kubernetes platform spec
    assert not any("env" in container for container in _executors(documents[0]).values())
    assert not any("retryPolicy" in task for _, task, _ in _tasks(documents[0]))
    _, placed, _ = _compile(tmp_path / "placed", profile="demo")
    assert any("genericEphemeralVolume" in executor for executor in placed.values())


def test_a_tasks_identity_is_the_same_for_each_retried_pod():
    """The launcher names a task's checkpoint folder by its inputs, sections and parameters, never by the output
    paths a new pod gets, nor the tracking server."""
    from types import SimpleNamespace

    from tckr.components.launcher import task_identity

    stage = RECIPES["tckr"].stages["shadow_group"]
    sections = {name: "{}" for name in ("teacher", "attack", "runtime")} | {"image_size": 16}

    def pod(output: str, data: str = "s3://mlpipeline/v2/artifacts/run-1/ingest/data") -> dict:
        return {"data": SimpleNamespace(uri=data, path="/gcs/ingest/data"), "group": 1, **sections,
                "shadows": SimpleNamespace(uri=output, path=output)}

    first = task_identity(stage, pod("s3://mlpipeline/v2/artifacts/run-1/shadow-group/1/shadows"))
    assert first == task_identity(stage, pod("s3://mlpipeline/v2/artifacts/run-1/shadow-group/2/shadows"))
    assert first["data"] == "s3://mlpipeline/v2/artifacts/run-1/ingest/data" and first["group"] == 1
    assert first != task_identity(stage, pod("x", data="s3://mlpipeline/v2/artifacts/run-2/ingest/data"))
    assert first != task_identity(stage, pod("x") | {"group": 2})


@pytest.mark.parametrize(("profile", "shard_stages"), [
    ("paper-cifar10", ("generation_plan", "generate_shard")),
    ("paper-cifar10-privimage", ("sample_plan", "sample_shard", "sample"))])
def test_generation_shards_never_receive_the_private_dataset(tmp_path, profile, shard_stages):
    """At paper scale hundreds of shard pods run: each gets the caption text (TCKR) or the fine-tuned generator
    (PrivImage) and the models, never the ingested private images."""
    spec, _, _ = _compile(tmp_path, profile=profile)

    def artifacts(stage: str) -> set[str]:
        return set(spec["components"][f"comp-{stage.replace('_', '-')}"]["inputDefinitions"]["artifacts"])

    for stage in shard_stages:
        assert "data" not in artifacts(stage), (stage, artifacts(stage))
    assert "data" in artifacts("shadow_group")  # where the private dataset does travel


def test_a_task_starts_without_importing_torch():
    """Every pod and every kfp.local task imports the launcher and parses its sections before its stage runs:
    torch, timm and MLflow load only in the stages that use them (they cost a plan task seconds, not work)."""
    probe = ("import sys, tckr.components.launcher, tckr.recipes.tckr.stages, tckr.recipes.privimage.stages; "
             "print(sorted(m for m in ('torch', 'timm', 'mlflow', 'diffusers', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
