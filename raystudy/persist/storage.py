"""Files under a study's storage path: a local folder or any pyarrow filesystem URI (s3://, gs://).

Every node of a cluster reads the targets and the study record from here, so a trial can run on
any node. No Ray here.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import re
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from raystudy.errors import RaystudyError

OPTUNA_DB = "optuna.db"  # a search's Optuna history (sqlite) in its experiment folder
# Where studies go without --storage: $RAYSTUDY_STORAGE (a cluster sets it to its bucket), else here.
DEFAULT_STORAGE = os.environ.get("RAYSTUDY_STORAGE", "~/raystudy_results")


def configure_s3_endpoint() -> None:
    """`RAYSTUDY_S3_ENDPOINT=http://host:9000` (MinIO, Ceph, a local S3 server) becomes the standard
    AWS_ENDPOINT_URL, which pyarrow, Ray and boto3 all read for s3:// URIs."""
    endpoint = os.environ.get("RAYSTUDY_S3_ENDPOINT")
    if endpoint and os.environ.get("AWS_ENDPOINT_URL") != endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint


def is_uri(location: str) -> bool:
    return "://" in location


def normalize(storage: str) -> str:
    """Absolute local path (Ray needs one), or the URI unchanged (one without credentials in it)."""
    if is_uri(storage):
        refuse_credentials_in(storage)
        return storage if storage.endswith("://") else storage.rstrip("/")  # .../exp/ is .../exp
    return str(Path(storage).expanduser().resolve())


# Query parameters of a pyarrow filesystem URI that carry a credential (access_key, secret_key,
# session_token, ...): the storage path is kept in the study record, in Ray's state and in messages.
_SECRET_PARAMETER = re.compile(r"key|secret|token|password|passwd|credential|signature|sig$", re.IGNORECASE)


def refuse_credentials_in(
    uri: str, what: str = "storage", instead: str = "AWS_* variables, a profile or an instance role"
) -> None:
    """A URI with a password or secret query parameter (or a URL holding one as a value) is one
    line, the secret unshown: such URIs are kept in the study record, Ray's state, and messages."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    secret = [name for name, _ in query if _SECRET_PARAMETER.search(name)]
    secret += [name for name, value in query if "@" in value and urlsplit(value).password is not None]
    user_info = parts.password is not None or (what == "storage" and parts.username is not None)
    if user_info or secret:
        shown = f"{parts.scheme}://{parts.hostname or ''}{parts.path}"
        held = "a user name or password" if user_info else f"a credential in {', '.join(secret)}"
        raise RaystudyError(
            f"{what} {shown!r} (...) holds {held}: it would be kept with the experiment and printed; give "
            f"credentials through the environment ({instead}) instead"
        )


def join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


# What an object-store filesystem is made from: a changed endpoint, key or region makes a new one.
_FILESYSTEM_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(root: str, settings: tuple) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def _resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a location. An s3:// or gs:// bucket's filesystem is made once and
    shared (making one resolves the bucket's region: a request each time); it is thread-safe."""
    try:
        if not is_uri(location):  # absolute is enough to open it: resolving links costs a stat per part
            return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))
        configure_s3_endpoint()
        scheme, _, rest = location.partition("://")
        if scheme in ("s3", "gs", "gcs"):
            bucket = rest.split("/", 1)[0]
            settings = tuple(os.environ.get(k) for k in _FILESYSTEM_SETTINGS)
            return _bucket_filesystem(f"{scheme}://{bucket}", settings), rest.rstrip("/")
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise RaystudyError(f"cannot open storage {location!r}: {err}") from None


def outage_seconds() -> float:
    """How long an object store that stops answering (a restart, a network blip, throttling) is
    waited out, with exponential backoff and jitter, before an operation fails (read when used)."""
    return float(os.environ.get("RAYSTUDY_STORAGE_OUTAGE_S", "300"))


# What a store that is down (not one that refuses us) says through pyarrow's S3 and GCS clients.
_TRANSIENT = (
    "connection refused",
    "couldn't connect",
    "could not connect",
    "connection reset",
    "connection was reset",
    "connection was closed",
    "timed out",
    "timeout",
    "network_connection",
    "curlcode: 7,",
    "curlcode: 28",
    "curlcode: 52",
    "curlcode: 55",
    "curlcode: 56",
    "service unavailable",
    "slowdown",
    "internalerror",
    "http response code: 500",
    "http response code: 502",
    "http response code: 503",
    "http response code: 504",
    "serviceunavailable",
    "error occurred (500)",
    "error occurred (502)",
    "error occurred (503)",
    "error occurred (504)",
)


def is_transient(error: OSError) -> bool:
    text = str(error).lower()
    return not isinstance(error, FileNotFoundError) and any(marker in text for marker in _TRANSIENT)


def _retrying(what: str, location: str, operation, seconds: float | None = None):
    """Run a storage operation; on an object store, connection failures are retried with exponential
    backoff and jitter for up to outage_seconds() (a local folder is never retried). Other errors,
    and an outage that lasts longer, are one-line errors."""
    seconds = outage_seconds() if seconds is None else seconds
    delay, deadline, warned = 0.5, time.monotonic() + seconds, False
    while True:
        try:
            return operation()
        except OSError as err:
            if not is_uri(location) or not is_transient(err) or time.monotonic() + delay > deadline:
                raise RaystudyError(f"cannot {what} {location!r}: {err}") from None
            if not warned:
                print(f"storage unreachable ({str(err)[:160]}); retrying for up to {seconds:g} s", file=sys.stderr)
                warned = True
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(2 * delay, 30.0)


def write_bytes(location: str, data: bytes, outage_seconds: float | None = None) -> None:
    fs, path = _resolve(location)

    def write() -> None:
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)

    _retrying("write", location, write, outage_seconds)


def read_bytes(location: str, missing_ok: bool = False, max_bytes: int | None = None) -> bytes | None:
    """The file's bytes; with `missing_ok`, None if there is no such file; with `max_bytes`, at most
    one byte more than that (a caller refusing larger files never holds a huge one whole)."""
    fs, path = _resolve(location)
    get_object = _object_reader(location)
    amount = None if max_bytes is None else max_bytes + 1

    def read() -> bytes | None:
        try:
            if get_object is not None:
                return get_object(path, amount)
            with fs.open_input_stream(path) as handle:
                return handle.read(amount) if amount is not None else handle.read()
        except FileNotFoundError:
            if missing_ok:
                return None
            raise

    return _retrying("read", location, read)


def _object_reader(location: str):
    """For s3:// with boto3 installed (`pip install -e ".[s3]"`): a reader of "bucket/key" that sends
    one GET per object. pyarrow's S3 client sends a HEAD before every GET, which doubles the requests
    of an analysis that reads one small file per trial. None elsewhere (pyarrow reads)."""
    if not location.startswith("s3://"):
        return None
    try:
        import botocore.exceptions
    except ImportError:
        return None
    client = _s3_client(tuple(os.environ.get(k) for k in _FILESYSTEM_SETTINGS))

    def get_object(path: str, amount: int | None = None) -> bytes:
        bucket, _, key = path.partition("/")
        try:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            with contextlib.closing(body):
                return body.read(amount)
        except client.exceptions.NoSuchKey:
            raise FileNotFoundError(f"no such object: s3://{path}") from None
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
            raise OSError(str(err)) from None  # judged by is_transient like pyarrow's errors

    return get_object


@functools.lru_cache(maxsize=8)
def _s3_client(settings: tuple):
    """One boto3 S3 client per endpoint and credentials (thread-safe; its connection pool as large as
    the analysis's readers). It reads AWS_ENDPOINT_URL and the usual credential chain, as pyarrow does."""
    import boto3
    import botocore.config

    config = botocore.config.Config(max_pool_connections=64, retries={"mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def read_json(location: str, limit: int = 64 << 20, missing_ok: bool = False) -> Any:
    """A JSON file from storage, as untrusted input: too large, not UTF-8, malformed or nested too
    deep for the parser is one line naming the file (never a traceback or a MemoryError)."""
    data = read_bytes(location, missing_ok=missing_ok, max_bytes=limit)
    if data is None:
        return None
    if len(data) > limit:
        raise RaystudyError(f"{location}: more than {limit} bytes, more than such a file holds: not read")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise RaystudyError(f"{location}: not valid JSON ({type(err).__name__}: {str(err)[:120]})") from None


def exists(location: str) -> bool:
    fs, path = _resolve(location)
    return _retrying("look up", location, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def file_entry(location: str) -> FileEntry | None:
    """A file's size and time, from one request; None if there is no such file."""
    fs, path = _resolve(location)
    info = _retrying("look up", location, lambda: fs.get_file_info(path))
    if info.type != pafs.FileType.File:
        return None
    return FileEntry(info.base_name, info.size, info.mtime_ns)


def wait_until_reachable(location: str) -> None:
    """Return once the storage answers (waiting out an outage as every operation here does): a
    trial calls it before Ray uploads its checkpoint, which Ray does not retry."""
    exists(location)


def list_files(location: str, suffix: str = "") -> list[str]:
    """Names of the files directly in a folder (empty if it does not exist)."""
    infos, _ = _listing(location)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def _listing(location: str, recursive: bool = False) -> tuple[list[pafs.FileInfo], str]:
    """(entries of a folder, its path on its filesystem); none if the folder does not exist."""
    fs, path = _resolve(location)

    def listing() -> list[pafs.FileInfo]:
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive))

    return _retrying("list", location, listing), path


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the listed folder, '/'-separated
    size: int
    mtime_ns: int | None  # None where the filesystem does not say


def list_tree(location: str) -> list[FileEntry]:
    """Every file under a folder, at any depth, from one recursive listing (on an object store a
    few paginated requests, not one per file); empty if the folder does not exist."""
    infos, path = _listing(location, recursive=True)
    prefix = path.rstrip("/") + "/"
    return [
        FileEntry(i.path[len(prefix) :] if i.path.startswith(prefix) else i.base_name, i.size, i.mtime_ns)
        for i in infos
        if i.type == pafs.FileType.File
    ]


def list_dirs(location: str) -> list[str]:
    """Names of the folders directly in a folder (empty if it does not exist)."""
    infos, _ = _listing(location)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def check_writable(storage: str) -> None:
    """Fail early, with one line, on a storage path the study could not write into."""
    probe = join(normalize(storage), f".raystudy-write-check-{os.getpid()}")
    write_bytes(probe, b"ok", outage_seconds=15)  # at the start, an unreachable store is more likely a typo
    fs, path = _resolve(probe)
    fs.delete_file(path)


def only_user_writes(path: Path) -> bool:
    """True if `path` and its folder belong to this user and neither is writable by others."""
    try:
        stats = [path.stat(), path.resolve().parent.stat()]
    except OSError:
        return False
    return all(s.st_uid == os.getuid() and not s.st_mode & (stat.S_IWGRP | stat.S_IWOTH) for s in stats)
