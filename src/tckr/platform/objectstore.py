"""S3 object storage through boto3: one client factory, and transfers that prove what arrived.

The same code talks to AWS, to the SeaweedFS store KFP ships in a cluster, and to the local
SeaweedFS endpoint of :mod:`tckr.platform.services`. Credentials come from the environment (or an
:class:`S3Endpoint`), never from code or config files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tckr.core.atomic import atomic_path
from tckr.core.errors import TckrError

SHA256_METADATA = "sha256"  # hex digest of the whole object, set by upload_file, checked by download_file
_CHUNK = 1 << 20


class ObjectStoreError(TckrError, RuntimeError):
    """The object store cannot be reached, refused a request, or returned different bytes."""


@dataclass(frozen=True)
class S3Credentials:
    access_key: str = field(repr=False)
    secret_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> S3Credentials:
        """Fresh random keys: each local store or test gets its own, none is ever written in code."""
        return cls(access_key="tckr" + secrets.token_hex(8), secret_key=secrets.token_urlsafe(30))

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    @classmethod
    def from_env(cls, env: dict[str, str]) -> S3Credentials:
        """The keys :meth:`env` wrote."""
        return cls(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"])


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    credentials: S3Credentials
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """What boto3, s3fs (DVC) and an MLflow server read to reach this store."""
        return {**self.credentials.env(), "AWS_ENDPOINT_URL_S3": self.url, "MLFLOW_S3_ENDPOINT_URL": self.url,
                "AWS_DEFAULT_REGION": self.region}


def s3_client(endpoint: S3Endpoint | None = None, attempts: int = 5, timeout: float = 10.0) -> Any:
    """A boto3 S3 client with bounded retries (exponential backoff) and timeouts.

    Without ``endpoint``, boto3's own environment lookup applies (``AWS_*``, ``AWS_ENDPOINT_URL_S3``);
    ``MLFLOW_S3_ENDPOINT_URL`` is honoured too, so a shell set up for MLflow reaches the same store.
    """
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": attempts, "mode": "standard"}, connect_timeout=timeout,
                    read_timeout=6 * timeout, s3={"addressing_style": "path"})
    if endpoint is None:
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        return boto3.client("s3", endpoint_url=url, config=config)
    return boto3.client("s3", endpoint_url=endpoint.url, region_name=endpoint.region, config=config,
                        aws_access_key_id=endpoint.credentials.access_key,
                        aws_secret_access_key=endpoint.credentials.secret_key)


def _store_error(action: str, error: Exception) -> ObjectStoreError:
    return ObjectStoreError(f"S3 {action} failed: {error}")


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def ensure_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` unless it exists (idempotent; an unreachable store raises ObjectStoreError)."""
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
        return
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise _store_error(f"head_bucket {bucket}", error) from None
    except _botocore_errors() as error:
        raise _store_error(f"head_bucket {bucket}", error) from None
    try:
        client.create_bucket(Bucket=bucket)
    except _botocore_errors() as error:
        raise _store_error(f"create_bucket {bucket}", error) from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_file(client: Any, path: Path, bucket: str, key: str) -> str:
    """Upload ``path`` to ``s3://bucket/key``; returns its SHA-256.

    The server verifies a SHA-256 checksum of every part it receives, and the whole file's digest is
    stored in the object's metadata for :func:`download_file` to check end to end.
    """
    digest = file_sha256(path)
    extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {SHA256_METADATA: digest}}
    try:
        client.upload_file(str(path), bucket, key, ExtraArgs=extra)
    except (*_botocore_errors(), OSError) as error:
        raise _store_error(f"upload of {path} to s3://{bucket}/{key}", error) from None
    return digest


def download_file(client: Any, bucket: str, key: str, path: Path) -> str:
    """Download ``s3://bucket/key`` to ``path`` atomically; returns its SHA-256.

    The file appears only once its digest matches the one recorded at upload; objects written by other
    tools (no digest in their metadata) are taken as the server sent them.
    """
    try:
        expected = client.head_object(Bucket=bucket, Key=key).get("Metadata", {}).get(SHA256_METADATA)
        with atomic_path(path) as partial:
            client.download_file(bucket, key, str(partial))
            digest = file_sha256(partial)
            if expected and digest != expected:
                raise ObjectStoreError(f"s3://{bucket}/{key} arrived with SHA-256 {digest}, "
                                       f"but was uploaded with {expected}")
    except _botocore_errors() as error:
        raise _store_error(f"download of s3://{bucket}/{key}", error) from None
    return digest


def list_keys(client: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix`` (all pages)."""
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
    except _botocore_errors() as error:
        raise _store_error(f"listing s3://{bucket}/{prefix}", error) from None
    return keys
