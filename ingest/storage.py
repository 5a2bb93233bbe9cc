"""All storage access of the ingest: fsspec URLs for input and output, atomic writes, JSON.

Local disk, s3:// (S3-compatible endpoints via AWS_ENDPOINT_URL or the endpoint_url storage
option), gs:// and memory:// share one code path. Credentials come from the environment or the
storage options and are never logged or written anywhere.

Retries: the storage libraries already retry transient failures with jittered exponential
backoff (botocore: 500, 502, 503, 504, SlowDown and other throttling answers, dropped
connections, 5 attempts in its default "legacy" mode, set by AWS_MAX_ATTEMPTS / AWS_RETRY_MODE;
s3fs retries SlowDown and connection, timeout and truncated-body errors again, 5 times, around
that). Tests through bench.faultproxy measured it, so no third layer is added here.
`storage_call` turns what is left once those retries are used up, or a permanent refusal, into
a one-line error naming the object.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import IngestError, InputError, OutputError, StorageError

log = logging.getLogger(__name__)

# Object stores make an object visible only once its upload completed, so a direct put is
# already atomic; everything else (local disk, NFS) needs write-to-temp then rename.
ATOMIC_PUT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "memory", "az", "abfs", "abfss"}


# Credentials on a command line end up in shell history, `ps` and pod specs: they must come
# from the environment (or the provider's credential files) instead.
_CREDENTIAL_WORDS = ("key", "secret", "token", "password", "credential")


def parse_storage_options(pairs: list[str]) -> dict[str, Any]:
    """`["endpoint_url=http://x", "anon=true"]` -> `{"endpoint_url": "http://x", "anon": True}`."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"storage option {key if sep else '(no =)'} is not KEY=VALUE")
        if any(word in key.lower() for word in _CREDENTIAL_WORDS):
            raise ValueError(f"storage option {key} looks like a credential; pass credentials through the "
                             "environment (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                             "GOOGLE_APPLICATION_CREDENTIALS), never on the command line")
        options[key] = _coerce(value)
    return options


def _coerce(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


@dataclass(frozen=True)
class Location:
    """A filesystem plus a root path in it; picklable, so worker processes can reopen it."""

    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def open(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, root = fsspec.core.url_to_fs(self.url, **self.options)
        return fs, root.rstrip("/")


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def display(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as the user would write it (no credentials: fsspec URLs never carry them)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def resolve_input(path: str, options: dict[str, Any] | None = None) -> Location:
    """The input as a Location; a .zip file is opened as a filesystem of its own."""
    options = dict(options or {})
    if "://" not in path:
        if not os.path.exists(path):
            raise InputError(f"input path {path} does not exist")
        path = os.path.abspath(path)
        if os.path.isfile(path) and path.lower().endswith(".zip"):
            return _zip_location(Location(f"zip://::{path}"), path)
        return Location(path)
    location = Location(path, options)
    fs, root = location.open()
    with storage_call(fs, root, "read", refused=InputError):
        if not fs.exists(root):
            raise InputError(f"input path {path} does not exist")
        if fs.isfile(root) and root.lower().endswith(".zip"):
            # fsspec URL chaining; the storage options belong to the filesystem under the zip.
            return _zip_location(Location(f"zip://::{path}", {_protocols(fs)[0]: options}), path)
    return location


def _zip_location(location: Location, path: str) -> Location:
    """The zip, proven readable here, at the boundary (fsspec keeps the opened instance)."""
    try:
        location.open()
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a readable zip ({exc}); an incomplete download?") from None
    return location


def prepare_output(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the output and prove it is writable now, before any work is done."""
    try:
        fs, root = location.open()
    except (ImportError, ValueError) as exc:
        raise OutputError(f"cannot open output {location.url}: {exc}") from None
    where = display(fs, root) if root else location.url
    probe = f"{root}/_index/.probe-{uuid.uuid4().hex}"
    try:
        if is_local(fs):
            fs.makedirs(f"{root}/_index", exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except FileNotFoundError:
        raise OutputError(f"output {where}: bucket or directory does not exist") from None
    except PermissionError:
        raise OutputError(f"output {where} is not writable (permission denied)") from None
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        raise OutputError(f"output {where} is not writable: {failure_reason(exc)}") from None
    return fs, root


def is_storage_failure(exc: BaseException) -> bool:
    """An OSError, or what botocore and aiohttp raise (not OSErrors) once their retries gave up."""
    return isinstance(exc, (OSError, *_transport_errors()))


@functools.cache
def _transport_errors() -> tuple[type[Exception], ...]:
    # Imported on the first failure only: local runs never load botocore.
    found = []
    for module, name in (("botocore.exceptions", "BotoCoreError"), ("aiohttp", "ClientError")):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


def failure_reason(exc: BaseException) -> str:
    """`SlowDown: Please reduce your request rate.`: the service's error code where there is one."""
    response = getattr(exc.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    text = " ".join(str(exc).split())[:200]
    return f"{code or type(exc).__name__}: {text}"


@contextlib.contextmanager
def storage_call(fs: fsspec.AbstractFileSystem, path: str, action: str,
                 refused: type[IngestError] = OutputError) -> Iterator[None]:
    """Turn a storage failure inside the block into a one-line error naming `path`: `refused`
    for permission denied, StorageError otherwise. FileNotFoundError passes through: whether a
    missing object is an error is the caller's call."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        where = display(fs, path)
        log.debug("%s %s failed", action, where, exc_info=True)
        if isinstance(exc, PermissionError):
            raise refused(f"{where}: {action} refused, permission denied ({failure_reason(exc)})") from None
        retried = "" if is_local(fs) else " after retries"
        raise StorageError(f"{where}: {action} failed{retried} ({failure_reason(exc)}); rerun to resume") from None


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` hold `data`, never a partial object, even if the process dies midway."""
    with storage_call(fs, path, "write"):
        try:
            _write_atomic(fs, path, data)
        except FileNotFoundError:
            raise OutputError(f"{display(fs, path)}: bucket or directory does not exist") from None


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if set(_protocols(fs)) & ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    # No fsync: a killed process loses nothing the page cache holds, and after a power loss
    # a resume re-checks every shard's size (ingest.verify its hash). It cost 40% of ingest time.
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # object stores have no folders to make
    for attempt in range(2):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        fs.pipe_file(tmp, data)
        try:
            fs.mv(tmp, path)
            return
        except FileNotFoundError:
            # A finalize that ran meanwhile (an overlapping run of the same plan) removed our
            # temporary file as a crash leftover; write it again.
            if attempt or fs.exists(tmp):
                raise


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def read_json(fs: fsspec.AbstractFileSystem, path: str, invalid: type[IngestError] = OutputError) -> Any:
    """The JSON object at `path`; FileNotFoundError when there is none, `invalid` when it is not
    JSON or reading it is refused."""
    with storage_call(fs, path, "read", refused=invalid):
        blob = fs.cat_file(path)
    try:
        return json.loads(blob)
    except ValueError as exc:
        raise invalid(f"{display(fs, path)}: not valid JSON ({exc})") from None


def dump_json(obj: Any) -> bytes:
    """Stable bytes for the same object: rerunning a job rewrites identical files."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_atomic(fs, path, dump_json(obj))
