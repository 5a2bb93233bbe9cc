"""Reading the input: sample bytes for a shard, and tar headers for listing, in few requests.

On object storage every request costs a round trip, so a 140 GB ILSVRC2012 train tar must be a
streaming read, not a request per image:
- `InputReader.read_all` fetches a shard's samples together: images that lie next to each other
  in one input file (the plan keeps runs of tar neighbours in one shard) become one ranged
  request, and all of a shard's requests run concurrently. Local disk reads each sample with
  one pread instead (cheaper than any fsspec call).
- `RangeFile` is a seekable file over a byte range of one object that fetches `chunk` bytes per
  request, so walking a tar's headers reads it in a few large requests (or one small request
  per member where members are large and far apart).
Ranges are always passed by keyword (s3fs's `cat_file` takes a version id second), and an empty
range is never requested (S3 answers an empty Range with the whole object).
"""
from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import fsspec
from fsspec.asyn import AsyncFileSystem

from .errors import InputError
from .sources.base import Sample
from .storage import Location, is_local, storage_call

# Neighbours closer than this are fetched in one request: between two members of a tar lie
# a 512-byte header and padding (a few KB more where a class tar ends and the next begins).
MAX_GAP = 64 << 10
MAX_REQUEST = 64 << 20      # one request's bytes at most, so that a retry repeats little
CONCURRENT_REQUESTS = 32    # per process
LIST_CHUNK_REMOTE = 8 << 20
LIST_CHUNK_LOCAL = 16 << 10
# What makes one sample unreadable, not the run: a missing file, a damaged zip member (bad CRC,
# bad deflate stream). Storage failures are told apart before this (storage_call).
UNREADABLE = (OSError, zipfile.BadZipFile, zlib.error, EOFError)


class Request(NamedTuple):
    path: str
    start: int | None                  # None: the whole object
    end: int | None
    members: list[tuple[int, int]]     # (index of the sample, offset of its bytes in the answer)


def plan_requests(samples: Sequence[Sample]) -> list[Request]:
    """Requests that fetch every non-empty sample once: tar neighbours merged, whole files alone."""
    requests: list[Request] = []
    ranged = []
    for index, sample in enumerate(samples):
        if sample.start is None:
            requests.append(Request(sample.path, None, None, [(index, 0)]))
        elif sample.size:
            ranged.append((sample.path, sample.start, index))
    current: Request | None = None
    for path, start, index in sorted(ranged):
        end = start + samples[index].size
        if current is not None and path == current.path and start - current.end <= MAX_GAP \
                and end - current.start <= MAX_REQUEST:
            current.members.append((index, start - current.start))
            current = current._replace(end=max(current.end, end))
            requests[-1] = current
        else:
            current = Request(path, start, end, [(index, 0)])
            requests.append(current)
    return requests


class InputReader:
    """Reads sample bytes from the input filesystem (opened once per process)."""

    def __init__(self, location: Location):
        self.fs, _ = location.open()
        # fsspec's local cat_file costs ~20 µs a call, os.pread of the listed size ~4 µs:
        # for 2 KB TinyImageNet files that is half of the per-image time.
        self._local = is_local(self.fs)

    def read_all(self, samples: Sequence[Sample]) -> list[bytes | Exception]:
        """Each sample's bytes, or the exception that made just that sample unreadable (a
        missing file, a damaged zip member). Storage that refuses or keeps failing once its
        retries are used up stops the run (IngestError)."""
        if self._local:
            return [_guarded(_read_local, sample) for sample in samples]
        out: list[bytes | Exception] = [b""] * len(samples)   # empty members stay empty
        requests = plan_requests(samples)
        for request, answer in zip(requests, self._fetch(requests)):
            for index, offset in request.members:
                size = samples[index].size
                out[index] = answer if isinstance(answer, Exception) or request.start is None \
                    else answer[offset:offset + size]
        return out

    def _fetch(self, requests: list[Request]) -> list[bytes | Exception]:
        paths = [r.path for r in requests]
        starts, ends = [r.start for r in requests], [r.end for r in requests]
        if isinstance(self.fs, AsyncFileSystem):
            answers = self.fs.cat_ranges(paths, starts, ends, on_error="return", batch_size=CONCURRENT_REQUESTS)
        else:
            answers = [_guarded(self.fs.cat_file, p, start=s, end=e) for p, s, e in zip(paths, starts, ends)]
        return [self._checked(path, answer) for path, answer in zip(paths, answers)]

    def _checked(self, path: str, answer: bytes | Exception) -> bytes | Exception:
        """The answer, or its exception when that is the sample's problem; a storage failure raises."""
        if not isinstance(answer, Exception):
            return answer
        try:
            with storage_call(self.fs, path, "read", refused=InputError):
                raise answer
        except UNREADABLE as exc:
            return exc


def _guarded(read: Callable, *args, **kwargs) -> bytes | Exception:
    try:
        return read(*args, **kwargs)
    except UNREADABLE as exc:
        return exc


def _read_local(sample: Sample) -> bytes:
    fd = os.open(sample.path, os.O_RDONLY)
    try:
        if sample.start is not None:
            return os.pread(fd, sample.size, sample.start)
        data = os.read(fd, sample.size + 1)   # one call when the file is as listed
        if len(data) <= sample.size:
            return data
        chunks = [data]
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class RangeFile:
    """A read-only file over bytes [start, end) of one object: position 0 is `start`. Each read
    outside the bytes held fetches at least `chunk` bytes from there, in one request."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, start: int, end: int, chunk: int | None = None):
        self._fs, self._path, self._start, self._end = fs, path, start, end
        self._local = is_local(fs)
        self._chunk = chunk or (LIST_CHUNK_LOCAL if self._local else LIST_CHUNK_REMOTE)
        self._fd = os.open(path, os.O_RDONLY) if self._local else None
        self._pos = 0
        self._held_at, self._held = 0, b""

    def read(self, size: int = -1) -> bytes:
        size = self._end - self._start - self._pos if size is None or size < 0 else size
        size = max(0, min(size, self._end - self._start - self._pos))
        offset = self._pos - self._held_at
        if size and not (0 <= offset and offset + size <= len(self._held)):
            self._held_at, offset = self._pos, 0
            self._held = self._fetch(self._start + self._pos, max(size, self._chunk))
        data = self._held[offset:offset + size]
        self._pos += len(data)
        return data

    def _fetch(self, at: int, size: int) -> bytes:
        end = min(self._end, at + size)
        if self._local:
            data = os.pread(self._fd, end - at, at)
        else:
            data = self._fs.cat_file(self._path, start=at, end=end)
        if len(data) < end - at:   # the object is shorter than listed: its end is here
            self._end = at + len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._end - self._start}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RangeFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
