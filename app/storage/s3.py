"""The production backend: an S3-compatible bucket (AWS S3, MinIO, moto), via boto3.

Credentials come from the standard AWS sources (``AWS_ACCESS_KEY_ID``, …);
``endpoint_url`` points at MinIO or another S3-compatible server.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.exceptions import Boto3Error, RetriesExceededError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from app.storage import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    StorageUnavailable,
    check_range,
    file_sha256,
    validate_key,
)

MiB = 1 << 20
PART_SIZE = 8 * MiB
MAX_PARTS = 10_000
TRANSFER_THREADS = 4
SHA256_METADATA = "sha256"
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# Answers that say "the service is overloaded or failing, try again", whatever the status.
_OUTAGE_CODES = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "RequestThrottled",
}  # fmt: skip


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def outage(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the endpoint is down or failing right now:
    no connection, a reset, a timeout, a 5xx or a throttling answer. Not a missing key, a
    denied access or a bad request, which retrying does not fix."""
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, BotoConnectionError | HTTPClientError):
            return True
        if isinstance(err, ClientError):
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return int(status) >= 500 or _error_code(err) in _OUTAGE_CODES
        if isinstance(err, RetriesExceededError) and err.last_exception is not None:
            err = err.last_exception
            continue
        err = err.__cause__ or err.__context__
    return False


def _failure(message: str, exc: BaseException) -> StorageError:
    """The store's error for a failed S3 call: StorageUnavailable when it is an outage."""
    kind = StorageUnavailable if outage(exc) else StorageError
    return kind(f"{message}: {exc}")


def transfer_config(size: int) -> TransferConfig:
    """Multipart in parts of at least 8 MiB, enough to stay under S3's 10,000-part limit."""
    part = max(PART_SIZE, math.ceil(size / MAX_PARTS / MiB) * MiB)
    return TransferConfig(
        multipart_threshold=PART_SIZE,
        multipart_chunksize=part,
        max_concurrency=TRANSFER_THREADS,
        use_threads=True,
    )


class S3ObjectStore(ObjectStore):
    """Objects live at ``s3://bucket/prefix/<key>``."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        client: Any | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        if client is None:
            config = Config(
                region_name=region,
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=10,
                read_timeout=60,
                max_pool_connections=max(10, TRANSFER_THREADS * 2),
                # Custom endpoints (MinIO, moto) rarely resolve bucket subdomains.
                s3={"addressing_style": "path" if endpoint_url else "auto"},
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )
        self.client = client

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3ObjectStore('s3://{self.bucket}/{self.prefix}'{where})"

    def object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_file(self, path: Path, key: str, *, sha256: str | None = None) -> None:
        name = self.object_key(key)
        size = path.stat().st_size
        digest = sha256 or file_sha256(path)
        head = self._head(name)
        if (
            head is not None
            and head["ContentLength"] == size
            and head.get("Metadata", {}).get(SHA256_METADATA) == digest
        ):
            path.unlink()
            return
        try:
            self.client.upload_file(
                str(path),
                self.bucket,
                name,
                ExtraArgs={
                    "Metadata": {SHA256_METADATA: digest},
                    "ContentType": "application/octet-stream",
                },
                Config=transfer_config(size),
            )
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise _failure(f"upload of {key!r} to s3://{self.bucket} failed", exc) from exc
        path.unlink()

    def get_to_file(self, key: str, path: Path) -> None:
        name = self.object_key(key)
        head = self._head(name)
        if head is None:
            raise ObjectNotFound(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self.client.download_file(
                self.bucket, name, tmp_name, Config=transfer_config(head["ContentLength"])
            )
            os.replace(tmp_name, path)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            raise _failure(f"download of {key!r} from s3://{self.bucket} failed", exc) from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise _failure(f"download of {key!r} from s3://{self.bucket} failed", exc) from exc
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        name = self.object_key(key)
        if start < 0 or (end is not None and end < start):
            check_range(start, end, 0)  # raises the ValueError
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            response = self.client.get_object(**kwargs)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES:
                raise ObjectNotFound(key) from None
            if code == "InvalidRange":
                raise ValueError(f"byte range {start}-{end} is beyond the end of {key!r}") from None
            raise _failure(f"read of {key!r} from s3://{self.bucket} failed", exc) from exc
        except BotoCoreError as exc:
            raise _failure(f"read of {key!r} from s3://{self.bucket} failed", exc) from exc
        return _stream_body(response["Body"], chunk_size)

    def size(self, key: str) -> int:
        head = self._head(self.object_key(key))
        if head is None:
            raise ObjectNotFound(key)
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        return self._head(self.object_key(key)) is not None

    def delete(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.object_key(key))
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES:
                raise _failure(f"delete of {key!r} failed", exc) from exc
        except BotoCoreError as exc:
            raise _failure(f"delete of {key!r} failed", exc) from exc

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _error_code(exc)
            if code in _MISSING_CODES or code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist") from exc
            if code in {"403", "AccessDenied", "Forbidden"}:
                raise StorageError(f"access to bucket {self.bucket!r} denied") from exc
            raise _failure(f"bucket {self.bucket!r} is not usable", exc) from exc
        except BotoCoreError as exc:
            raise _failure("S3 endpoint unreachable or misconfigured", exc) from exc

    def _head(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=name)  # type: ignore[no-any-return]
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise _failure(f"s3://{self.bucket}/{name} is not readable", exc) from exc
        except BotoCoreError as exc:
            raise _failure("S3 endpoint unreachable or misconfigured", exc) from exc


def _stream_body(body: Any, chunk_size: int) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(chunk_size)
    except (ClientError, BotoCoreError) as exc:
        raise _failure("S3 read interrupted", exc) from exc
    finally:
        body.close()
