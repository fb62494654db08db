"""Local paths and ``s3://`` URIs behind one small interface, on pyarrow's filesystems.

S3 settings come from the standard AWS configuration: the credentials chain and
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, a loopback server).
Requests are retried with backoff, so a store that blips for a few seconds is not fatal.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_RETRY_ATTEMPTS = 10
COPY_THREADS = 4
COPY_CHUNK_BYTES = 8 * 2**20


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def absolute(uri: str) -> str:
    """A URI that means the same from any working directory: local paths made absolute."""
    return uri if is_s3(uri) else os.path.abspath(uri.removeprefix("file://"))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri, *parts))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem whose pickle keeps its retry attempts.

    pyarrow's own pickle drops the retry strategy, and Ray Train ships ``storage_filesystem`` to
    its controller and workers pickled: their checkpoint uploads then gave up after pyarrow's
    default 3 attempts while everything else retried ``RAY_REC_S3_RETRIES`` times (found by the
    S3-outage test: the controller's ``checkpoint_manager_snapshot.json`` upload failed the run).
    """

    def __init__(self, attempts: int, **kwargs: Any) -> None:
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts), **kwargs)
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        kwargs = super().__reduce__()[1][0]  # the constructor arguments pyarrow itself pickles
        return (_rebuild_s3, (self.attempts, kwargs))


def _rebuild_s3(attempts: int, kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(attempts, **kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "connect_timeout": 5,
        "background_writes": False,  # a write returns once uploaded: buffered data stays one part
        "request_timeout": 30,
    }
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs.setdefault("region", "us-east-1")
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return RetryingS3FileSystem(int(os.environ.get("RAY_REC_S3_RETRIES", S3_RETRY_ATTEMPTS)), **kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path within it) for a local path or ``s3://bucket/key`` URI."""
    uri = str(uri)
    if is_s3(uri):
        rest = uri[len("s3://") :].rstrip("/")
        if not rest:
            raise ValueError(f"{uri!r} names no bucket")
        return s3_filesystem(), rest
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri!r}: only local paths and s3:// URIs are supported")
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete_dir(uri: str) -> None:
    """Delete a folder and everything under it; a missing folder is fine."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under a folder, sorted."""
    fs, path = resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(posixpath.relpath(i.path, path) for i in infos if i.type == pafs.FileType.File)


def copy_dir(src: str, dst: str) -> None:
    """Copy a folder between any two locations (local or S3)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if isinstance(src_fs, pafs.LocalFileSystem) and isinstance(dst_fs, pafs.LocalFileSystem):
        shutil.copytree(src_path, dst_path, dirs_exist_ok=True)
        return
    dst_fs.create_dir(dst_path, recursive=True)
    files = [i.path for i in src_fs.get_file_info(pafs.FileSelector(src_path, recursive=True)) if i.type == pafs.FileType.File]

    def copy(path: str) -> None:
        target = posixpath.join(dst_path, posixpath.relpath(path, src_path))
        with src_fs.open_input_stream(path) as source, dst_fs.open_output_stream(target) as sink:
            shutil.copyfileobj(source, sink, COPY_CHUNK_BYTES)

    # A few files at a time, each streamed in chunks: memory stays the same however many files
    # there are (pyarrow's copy_files opened them all at once, its memory grew with the data set).
    with ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(copy, files))


def move_dir(src: str, dst: str) -> None:
    """Move a folder: a rename locally, copy then delete on S3 (which has no rename)."""
    src_fs, src_path = resolve(src)
    dst_fs, dst_path = resolve(dst)
    if isinstance(src_fs, pafs.LocalFileSystem) and isinstance(dst_fs, pafs.LocalFileSystem):
        Path(dst_path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src_path, dst_path)
        return
    copy_dir(src, dst)
    delete_dir(src)
