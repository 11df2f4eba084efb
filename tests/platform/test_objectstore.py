"""S3 transfers against a real SeaweedFS server, and the local servers' lifecycle (make s3-up/down)."""

import os
import stat

import pytest

from tckr.cli import main
from tckr.platform.objectstore import (
    ObjectStoreError,
    S3Credentials,
    S3Endpoint,
    download_file,
    ensure_bucket,
    file_sha256,
    list_keys,
    s3_client,
    upload_file,
)
from tckr.platform.services import DVC_BUCKET, MLFLOW_BUCKET, StateDir, free_port


def test_round_trip_is_byte_identical_and_checked(s3_store, tmp_path):
    client = s3_client(s3_store)
    ensure_bucket(client, "tckr-test")
    ensure_bucket(client, "tckr-test")  # idempotent
    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(9 << 20))  # > 8 MiB: a multipart upload, each part checksummed
    digest = upload_file(client, source, "tckr-test", "models/weights.bin")
    assert digest == file_sha256(source)
    assert "models/weights.bin" in list_keys(client, "tckr-test", "models/")

    target = tmp_path / "back" / "weights.bin"
    target.parent.mkdir()
    assert download_file(client, "tckr-test", "models/weights.bin", target) == digest
    assert target.read_bytes() == source.read_bytes()


def test_corrupted_object_is_refused_and_leaves_no_file(s3_store, tmp_path):
    client = s3_client(s3_store)
    ensure_bucket(client, "tckr-test")
    # An object whose recorded digest does not match its bytes (as after a bad copy between stores).
    client.put_object(Bucket="tckr-test", Key="bad.bin", Body=b"actual bytes", Metadata={"sha256": "0" * 64})
    target = tmp_path / "bad.bin"
    with pytest.raises(ObjectStoreError, match="arrived with SHA-256"):
        download_file(client, "tckr-test", "bad.bin", target)
    assert list(tmp_path.iterdir()) == []


def test_wrong_keys_and_unreachable_store_give_clear_errors(s3_store, tmp_path):
    impostor = S3Endpoint(s3_store.url, S3Credentials.generate())
    with pytest.raises(ObjectStoreError, match="head_bucket tckr-mlflow failed.*403|Forbidden"):
        ensure_bucket(s3_client(impostor), MLFLOW_BUCKET)
    nowhere = S3Endpoint(f"http://127.0.0.1:{free_port()}", S3Credentials.generate())
    with pytest.raises(ObjectStoreError, match="Could not connect to the endpoint URL"):
        list_keys(s3_client(nowhere, attempts=2, timeout=1), MLFLOW_BUCKET)


def test_client_from_the_environment(s3_store, monkeypatch):
    """What a pod or a shell set up by `.tckr/env` has: endpoint and keys in the environment only."""
    for name, value in s3_store.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")  # MLflow's variable alone is enough
    assert MLFLOW_BUCKET in {bucket["Name"] for bucket in s3_client().list_buckets()["Buckets"]}


def test_credentials_never_show_in_reprs():
    credentials = S3Credentials.generate()
    assert credentials.secret_key not in repr(S3Endpoint("http://127.0.0.1:1", credentials))
    assert credentials.access_key != S3Credentials.generate().access_key


def test_services_up_is_idempotent_and_down_stops_them(tmp_path, capsys):
    """`make s3-up` twice keeps one server and its keys; `make s3-down` stops it; the env file is 0600."""
    state = StateDir(tmp_path / ".tckr")
    args = ["services", "up", "s3", "--state-dir", str(state.root), "--s3-port", str(free_port())]
    assert main(args) == 0
    first_pid, first_env = state.running_pid("seaweedfs"), state.read_env()
    try:
        assert first_pid and stat.S_IMODE(state.env_file.stat().st_mode) == 0o600
        assert main(args) == 0
        assert state.running_pid("seaweedfs") == first_pid and state.read_env() == first_env
        client = s3_client(state.s3_endpoint())
        assert {MLFLOW_BUCKET, DVC_BUCKET} <= {b["Name"] for b in client.list_buckets()["Buckets"]}
        assert first_env["AWS_SECRET_ACCESS_KEY"] not in capsys.readouterr().out
    finally:
        assert main(["services", "down", "s3", "--state-dir", str(state.root)]) == 0
    assert state.running_pid("seaweedfs") is None
    assert "seaweedfs: stopped" in capsys.readouterr().out
    with pytest.raises(ProcessLookupError):
        os.kill(first_pid, 0)
