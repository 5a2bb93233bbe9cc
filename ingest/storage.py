"""All storage access of the ingest: fsspec URLs for input and output, atomic writes, JSON.

Local disk, s3:// (S3-compatible endpoints via AWS_ENDPOINT_URL or the endpoint_url storage
option), gs:// and memory:// share one code path. Credentials come from the environment or the
storage options and are never logged or written anywhere.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import InputError, OutputError

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
            return Location(f"zip://::{path}")
        return Location(path)
    location = Location(path, options)
    fs, root = location.open()
    if not fs.exists(root):
        raise InputError(f"input path {path} does not exist")
    if fs.isfile(root) and root.lower().endswith(".zip"):
        # fsspec URL chaining; the storage options belong to the filesystem under the zip.
        return Location(f"zip://::{path}", {_protocols(fs)[0]: options})
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
    except OSError as exc:
        raise OutputError(f"output {where} is not writable: {exc}") from None
    return fs, root


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` hold `data`, never a partial object, even if the process dies midway."""
    if set(_protocols(fs)) & ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    # No fsync: a killed process loses nothing the page cache holds, and after a power loss
    # a resume re-checks every shard's size (ingest.verify its hash). It cost 40% of ingest time.
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # object stores have no folders to make
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path))


def dump_json(obj: Any) -> bytes:
    """Stable bytes for the same object: rerunning a job rewrites identical files."""
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def write_json(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_atomic(fs, path, dump_json(obj))
