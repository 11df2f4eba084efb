"""Where and how each task of a pipeline runs on Kubernetes, from the run configuration's ``kubernetes:`` section.

KFP fixes these settings when a pipeline is compiled; ``kfp.local`` ignores them, so ``tckr run``
executes the same graph without a cluster.
"""

from __future__ import annotations

import sys

from kfp import kubernetes
from kfp.dsl import PipelineTask, pipeline_context

from tckr.components import Images, default_images
from tckr.core.config import KubernetesConfig
from tckr.core.distributed import PROCESSES_ENV
from tckr.core.stage import StageRegistry
from tckr.core.volume import cache_environment, volume_environment
from tckr.platform.tracking import KFP_RUN_ID_ENV

VOLUME_MOUNT = "/mnt/tckr"  # kubernetes.work_pvc's mount path in every pod
SCRATCH_MOUNT = "/scratch"  # a stage's scratch volume (kubernetes.stages.<name>.scratch)
# Secret keys -> environment variables. KFP's object-store secret names its keys accesskey/secretkey.
S3_KEYS = {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}
# KFP's API server labels every pod of a run with the run's id (its v2 template sets the workflow's podMetadata).
KFP_RUN_ID_FIELD = "metadata.labels['pipeline/runid']"


def ensure_container_spec_exists(self: PipelineTask) -> None:
    """kfp's check before each resource setter, with the same error, without its ``inspect.stack()`` (only to name
    the caller in that error, it resolves the module of every frame by scanning ``sys.modules``: a cold compile 3x
    slower with torch, mlflow and datasets imported, bench/bench_compile.py; 7-22 s a compile inside pytest)."""
    if self.container_spec is None:
        raise ValueError(f"{sys._getframe(1).f_code.co_name} can only be used on single-step components, not "
                         "pipelines used as components, or special components like importers.")


KFP_CONTAINER_SPEC_CHECK = PipelineTask._ensure_container_spec_exists  # kfp's own, for bench/bench_compile.py
PipelineTask._ensure_container_spec_exists = ensure_container_spec_exists


def images_of(cluster: KubernetesConfig) -> Images:
    """The images the tasks run in: the section's, else this code's own."""
    images = default_images()
    return Images(cluster.image or images.cpu, cluster.cuda_image or images.cuda)


def place_all_tasks(cluster: KubernetesConfig, stages: StageRegistry) -> None:
    """Place every task of the pipeline being defined (call last in its body), so none is missed."""
    images = images_of(cluster)
    for task in pipeline_context.Pipeline.get_default_pipeline().tasks.values():
        place(task, cluster, stages, images)


def place(task: PipelineTask, cluster: KubernetesConfig, stages: StageRegistry, images: Images) -> None:
    """Resources, GPU, image, node placement, volumes, /dev/shm, processes and credentials of one task."""
    stage = stages[task.component_spec.name.replace("-", "_")]
    need = cluster.stages[stage.name]
    task.set_cpu_request(need.cpu).set_memory_request(need.memory).set_memory_limit(need.memory_limit)
    if need.cpu_limit:
        task.set_cpu_limit(need.cpu_limit)
    task.set_container_image(images.cuda if need.gpus else images.cpu)
    if need.gpus:
        task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(need.gpus)
        for label, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label, value)
        for toleration in cluster.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration.model_dump())
    if stage.cache and cluster.retries:  # a stage KFP may cache is one that may run again; bookkeeping is not
        task.set_retry(num_retries=cluster.retries, backoff_duration="60s", backoff_factor=2.0,
                       backoff_max_duration="3600s")
    if stage.multi_gpu:  # one process per GPU of the pod (tckr.core.distributed)
        task.set_env_variable(PROCESSES_ENV, str(max(1, need.gpus)))
    if cluster.work_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.work_pvc, mount_path=VOLUME_MOUNT)
        for variable, value in volume_environment(VOLUME_MOUNT).items():
            task.set_env_variable(variable, value)
    if need.scratch:  # temporary files, and the hub downloads unless the work volume keeps them
        kubernetes.add_ephemeral_volume(task, volume_name="scratch", mount_path=SCRATCH_MOUNT,
                                        access_modes=["ReadWriteOnce"], size=need.scratch,
                                        storage_class_name=cluster.scratch_storage_class)
        task.set_env_variable("TMPDIR", SCRATCH_MOUNT)
        if not cluster.work_pvc:
            for variable, value in cache_environment(SCRATCH_MOUNT).items():
                task.set_env_variable(variable, value)
    if need.shm:  # DataLoader workers pass batches through shared memory
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=need.shm)
    if stage.tracked:  # the task logs to MLflow
        # ... under the parent run tagged with this KFP run's id (tckr.platform.tracking.pipeline_run_id)
        kubernetes.use_field_path_as_env(task, env_name=KFP_RUN_ID_ENV, field_path=KFP_RUN_ID_FIELD)
        if cluster.s3_secret:  # artifacts go straight to the store when the server does not proxy them
            kubernetes.use_secret_as_env(task, cluster.s3_secret, S3_KEYS)
            task.set_env_variable("MLFLOW_S3_ENDPOINT_URL", cluster.s3_endpoint)
        if cluster.mlflow_secret:  # optional: a server without authentication has no such secret
            kubernetes.use_secret_as_env(task, cluster.mlflow_secret, MLFLOW_KEYS, optional=True)
