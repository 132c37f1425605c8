"""Both object-store backends against the same contract: a local folder and S3 (moto's server)."""

from __future__ import annotations

import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from app.settings import get_settings
from app.storage import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    get_store,
    store_from_url,
)
from app.storage.local import LocalObjectStore
from app.storage.s3 import S3ObjectStore

MiB = 1 << 20


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return store_from_url((tmp_path / "objects").as_uri())
    endpoint_url, bucket = request.getfixturevalue("s3_endpoint")
    # A fresh prefix per test keeps tests independent on the shared bucket.
    return store_from_url(f"s3://{bucket}/t-{uuid.uuid4().hex}", endpoint_url=endpoint_url)


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[[bytes], Path]:
    def make(data: bytes) -> Path:
        path = tmp_path / f"src-{uuid.uuid4().hex}"
        path.write_bytes(data)
        return path

    return make


def test_put_get_roundtrip(store: ObjectStore, make_file: Callable[[bytes], Path], tmp_path: Path):
    data = os.urandom(300 * 1024 + 7)
    source = make_file(data)
    store.put_file(source, "models/ab/abc")
    assert not source.exists(), "put_file takes ownership of the file"
    assert store.exists("models/ab/abc")
    assert store.size("models/ab/abc") == len(data)
    target = tmp_path / "out" / "copy.bin"
    store.get_to_file("models/ab/abc", target)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["copy.bin"]


def test_iter_range(store: ObjectStore, make_file: Callable[[bytes], Path]):
    data = os.urandom(100_000)
    store.put_file(make_file(data), "k")
    last = len(data) - 1
    assert b"".join(store.iter_range("k")) == data
    assert b"".join(store.iter_range("k", 0, last)) == data
    assert b"".join(store.iter_range("k", 0, 0)) == data[:1]
    assert b"".join(store.iter_range("k", last, last)) == data[-1:]
    assert b"".join(store.iter_range("k", last)) == data[-1:]
    assert b"".join(store.iter_range("k", 10, 99)) == data[10:100]
    assert b"".join(store.iter_range("k", 5000)) == data[5000:]
    assert b"".join(store.iter_range("k", 90_000, 10**9)) == data[90_000:], "end is clamped"
    chunks = list(store.iter_range("k", 0, None, chunk_size=16 * 1024))
    assert b"".join(chunks) == data
    assert len(chunks) >= len(data) // (16 * 1024)
    assert max(len(c) for c in chunks) <= 16 * 1024
    with pytest.raises(ValueError):
        b"".join(store.iter_range("k", len(data)))
    with pytest.raises(ValueError):
        b"".join(store.iter_range("k", 10, 5))


def test_empty_object(store: ObjectStore, make_file: Callable[[bytes], Path], tmp_path: Path):
    store.put_file(make_file(b""), "empty")
    assert store.size("empty") == 0
    assert b"".join(store.iter_range("empty")) == b""
    store.get_to_file("empty", tmp_path / "empty.out")
    assert (tmp_path / "empty.out").read_bytes() == b""


def test_missing_key(store: ObjectStore, tmp_path: Path):
    assert not store.exists("nope/missing")
    with pytest.raises(ObjectNotFound):
        store.size("nope/missing")
    with pytest.raises(ObjectNotFound):
        store.get_to_file("nope/missing", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ObjectNotFound):
        store.iter_range("nope/missing")  # raised on the call, before any iteration
    store.delete("nope/missing")
    assert issubclass(ObjectNotFound, StorageError)


def test_delete(store: ObjectStore, make_file: Callable[[bytes], Path]):
    store.put_file(make_file(b"x" * 10), "a/b/c")
    store.delete("a/b/c")
    assert not store.exists("a/b/c")
    store.delete("a/b/c")


def test_put_same_content_twice_is_idempotent(
    store: ObjectStore, make_file: Callable[[bytes], Path]
):
    data = os.urandom(4096)
    digest = hashlib.sha256(data).hexdigest()
    store.put_file(make_file(data), "same", sha256=digest)
    second = make_file(data)
    store.put_file(second, "same", sha256=digest)
    assert not second.exists()
    assert b"".join(store.iter_range("same")) == data


def test_put_replaces_other_content(store: ObjectStore, make_file: Callable[[bytes], Path]):
    store.put_file(make_file(b"old content"), "key")
    store.put_file(make_file(b"new"), "key")
    assert b"".join(store.iter_range("key")) == b"new"


@pytest.mark.parametrize("key", ["", "/abs", "../up", "a/../b", "a//b", "./a", "a\\b", "a/\x00"])
def test_invalid_keys_rejected(store: ObjectStore, make_file: Callable[[bytes], Path], key: str):
    with pytest.raises(ValueError):
        store.put_file(make_file(b"x"), key)
    with pytest.raises(ValueError):
        store.exists(key)


def test_check_passes(store: ObjectStore):
    store.check()


def test_s3_large_file_uses_multipart(s3_endpoint: tuple[str, str], tmp_path: Path):
    endpoint_url, bucket = s3_endpoint
    store = store_from_url(f"s3://{bucket}/large", endpoint_url=endpoint_url)
    assert isinstance(store, S3ObjectStore)
    data = os.urandom(20 * MiB + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store.put_file(source, "models/big")
    head = store.client.head_object(Bucket=bucket, Key="large/models/big")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), "20 MiB in 8 MiB parts is a 3-part upload"
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    out = tmp_path / "big.out"
    store.get_to_file("models/big", out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    tail = b"".join(store.iter_range("models/big", 20 * MiB))
    assert tail == data[20 * MiB :]


def test_s3_keys_live_under_the_prefix(
    s3_endpoint: tuple[str, str], make_file: Callable[[bytes], Path]
):
    endpoint_url, bucket = s3_endpoint
    store = store_from_url(f"s3://{bucket}/deep/prefix/", endpoint_url=endpoint_url)
    assert isinstance(store, S3ObjectStore)
    store.put_file(make_file(b"abc"), "x/y")
    assert store.client.head_object(Bucket=bucket, Key="deep/prefix/x/y")["ContentLength"] == 3


def test_s3_check_fails_on_missing_bucket(s3_endpoint: tuple[str, str]):
    endpoint_url, _ = s3_endpoint
    store = store_from_url("s3://no-such-bucket-here/p", endpoint_url=endpoint_url)
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.check()


def test_s3_check_fails_when_endpoint_unreachable(s3_endpoint: tuple[str, str]):
    _, bucket = s3_endpoint
    store = S3ObjectStore(bucket, endpoint_url="http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(StorageError, match="unreachable"):
        store.check()


def test_local_check_fails_when_root_unusable(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    store = store_from_url((blocker / "objects").as_uri())
    with pytest.raises(StorageError, match="not writable"):
        store.check()


def test_local_keys_stay_under_root(tmp_path: Path, make_file: Callable[[bytes], Path]):
    store = LocalObjectStore(tmp_path / "root")
    store.put_file(make_file(b"data"), "models/ab/cd")
    assert (tmp_path / "root" / "models" / "ab" / "cd").read_bytes() == b"data"
    assert not store.exists("models")  # a folder is not an object
    with pytest.raises(ObjectNotFound):
        store.size("models")


def test_local_put_across_filesystems_copies(
    tmp_path: Path, make_file: Callable[[bytes], Path], monkeypatch: pytest.MonkeyPatch
):
    store = LocalObjectStore(tmp_path / "root")
    source = make_file(b"payload" * 1000)
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(src) == source:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr("app.storage.local.os.replace", replace)
    store.put_file(source, "k")
    assert not source.exists()
    assert (tmp_path / "root" / "k").read_bytes() == b"payload" * 1000
    assert [p.name for p in (tmp_path / "root").iterdir()] == ["k"]


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/x",
        "file://relative/path",
        "file:relative",
        "s3://",
        "s3:///p",
        "gs://b",
        "",
    ],
)
def test_store_from_url_rejects(url: str):
    with pytest.raises(ValueError):
        store_from_url(url)


def test_store_from_url_parses(tmp_path: Path):
    local = store_from_url(tmp_path.as_uri())
    assert isinstance(local, LocalObjectStore) and local.root == tmp_path
    s3 = store_from_url("s3://bucket/a/b/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3ObjectStore)
    assert (s3.bucket, s3.prefix) == ("bucket", "a/b")
    assert s3.object_key("k") == "a/b/k"
    assert store_from_url("s3://bucket").object_key("k") == "k"  # type: ignore[attr-defined]


def test_get_store_follows_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SQUISH_STORAGE_URL", (tmp_path / "objs").as_uri())
    get_settings.cache_clear()
    get_store.cache_clear()
    try:
        store = get_store()
        assert isinstance(store, LocalObjectStore) and store.root == tmp_path / "objs"
        assert get_store() is store
    finally:
        get_settings.cache_clear()
        get_store.cache_clear()
