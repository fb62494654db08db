"""Local paths and ``s3://`` URIs behind one small interface, on pyarrow's filesystems.

S3 settings come from the standard AWS configuration: the credentials chain and
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores (MinIO, a loopback server).
Requests are retried with backoff, so a store that blips for a few seconds is not fatal.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import time
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
    """An S3 filesystem configured from the standard AWS environment; credentials come from the
    AWS default chain of the process that uses it and are never stored in the object."""
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
    # No keys passed: the AWS SDK inside pyarrow finds them itself (environment, profile, instance
    # role) in each process, so a pickled filesystem (Ray Train ships it to every worker) carries none.
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


def size(uri: str) -> int | None:
    """A file's size in bytes; None if there is no file at ``uri``."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def download(uri: str, local_path: str) -> None:
    """Copy one file to a local path, streamed in chunks."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as source, open(local_path, "wb") as sink:
        shutil.copyfileobj(source, sink, COPY_CHUNK_BYTES)


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
    """Relative paths of every file under a folder, sorted. Locally, links to folders are not
    followed (a link back up would list the same files without end)."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        found = []
        for folder, _, names in os.walk(path):  # followlinks=False
            found += [os.path.relpath(os.path.join(folder, n), path) for n in names if os.path.isfile(os.path.join(folder, n))]
        return sorted(found)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(_below(i.path, path) for i in infos if i.type == pafs.FileType.File)


def _below(path: str, folder: str) -> str:
    """``path`` relative to ``folder``, for object-store keys (``posixpath.relpath`` would resolve
    them against this process's working folder, and fail where that folder has gone)."""
    prefix = folder.rstrip("/") + "/"
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {folder}")
    return path[len(prefix):]


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
        target = posixpath.join(dst_path, _below(path, src_path))
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


OUTPUT_MARKER = "_RAY_REC_OUTPUT.json"  # "_": Parquet readers and `prepare` skip it


class OutputError(ValueError):
    """An output location that a command must not replace."""


def _contains(outer: str, inner: str) -> bool:
    """``inner`` is ``outer`` or lies under it (both absolute local paths or both s3:// URIs)."""
    outer, inner = outer.rstrip("/") or "/", inner.rstrip("/") or "/"
    return inner == outer or inner.startswith(outer if outer.endswith("/") else outer + "/")


def claim_output(uri: str, command: str, overwrite: bool = False, reads: tuple[str, ...] = ()) -> None:
    """Check that ``command`` may replace what is at ``uri``, then mark ``uri`` as its output.

    Allowed: nothing there yet, an empty folder, or an earlier output of the same command (its
    marker file `OUTPUT_MARKER` says so). Anything else (somebody's files, another command's
    output) only with ``overwrite``. Never, even with ``overwrite``: a filesystem or bucket root,
    the working directory or a folder above it, or a folder holding one of ``reads`` (the model or
    data set the command reads).

    Raises:
        OutputError: naming the location and what is there.
    """
    target = absolute(uri)
    if is_s3(target):
        if "/" not in target[len("s3://") :].strip("/"):
            raise OutputError(f"{uri} is a whole bucket: give a folder inside it as the output")
    elif target == os.path.dirname(target) or _contains(target, os.getcwd()):
        raise OutputError(f"{uri} is the working directory, a folder above it or a root: give a folder of its own as the output")
    for read in reads:
        if read and _contains(target, absolute(read)):
            raise OutputError(f"{uri} holds {read}, which this command reads: write the output somewhere else")
    marker = join(target, OUTPUT_MARKER)
    if exists(target) and not is_dir(target):
        if not overwrite:
            raise OutputError(f"{uri} is a file, not a folder; pass --overwrite to replace it")
        fs, path = resolve(target)
        fs.delete_file(path)
    elif exists(marker):
        try:
            owner = json.loads(read_bytes(marker)).get("command")
        except (ValueError, AttributeError):
            owner = None
        if owner != command and not overwrite:
            raise OutputError(f"{uri} holds the output of `ray-rec {owner}`, not of {command}; pass --overwrite to replace it")
    elif list_files(target) and not overwrite:
        raise OutputError(
            f"{uri} already holds files that no ray-rec {command} wrote; choose an empty or new folder, "
            f"or pass --overwrite to let {command} replace them"
        )
    mark_output(target, command)


def mark_output(uri: str, command: str, extra: dict[str, Any] | None = None) -> None:
    """Write the marker that says ``uri`` is ``command``'s output (see `claim_output`), with
    ``extra`` facts about it (batch-score: the model and its lineage)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_bytes(join(uri, OUTPUT_MARKER), json.dumps({"command": command, "created": stamp, **(extra or {})}, indent=2).encode())
