"""Reading one shard: fetch its bytes, check them against the manifest, index the tar headers in
Python, and return the samples as vectors (offsets, lengths, labels), so tf.data crosses into
Python once per shard.

Transient storage faults are retried by the storage libraries (botocore and s3fs: measured in
docs/reliability.md, two faults in a row of every kind are absorbed), so there is no retry layer
here. A shard that still cannot be read, or whose size or sha256 differs from the manifest's, is
skipped and counted, never silently: `ReadStats` holds the counts and the log names the shard.
Reading never raises into tf.data (the pipeline drops undecodable images with `ignore_errors`,
which would swallow it): a fatal failure is kept in `ShardSource.failure` and ends the stream.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ingest.storage import Location, is_storage_failure

log = logging.getLogger(__name__)

BLOCK = 512
# Skipping a bad shard keeps training going; skipping this many in a row means the storage is
# gone, and training on nothing would hang the job or fake progress: fail instead.
MAX_CONSECUTIVE_SKIPS = 20
MAX_CLASSES = 2**31 - 1   # labels are int32


class ShardError(Exception):
    """A shard's bytes are not a readable WebDataset tar, or not the ones the manifest names."""


class StorageGone(Exception):
    """So many shards in a row could not be read that the storage, not a shard, is the problem."""


@dataclass
class ReadStats:
    """Counters of one process's reading, for logs and metrics."""

    shard_bytes: int = 0
    shards: int = 0
    skipped_samples: Counter = field(default_factory=Counter)   # reason -> samples
    skipped_shards: Counter = field(default_factory=Counter)    # reason -> shards
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def skip(self, kind: str, reason: str, count: int = 1) -> None:
        with self._lock:
            getattr(self, f"skipped_{kind}")[reason] += count

    def snapshot(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """(shard bytes, skipped shards, skipped samples by reason), read while the readers go on."""
        with self._lock:
            return self.shard_bytes, dict(self.skipped_shards), dict(self.skipped_samples)


Span = tuple[int, int]
_ZERO_BLOCK = bytes(BLOCK)
_PAX, _LONG_NAME, _REGULAR = ord("x"), (ord("x"), ord("L")), (ord("0"), 0)
_NOTHING = (b"", np.zeros([0], np.int64), np.zeros([0], np.int64), np.zeros([0], np.int32))


def parse_tar(data: bytes) -> dict[str, dict[str, Span]]:
    """key -> {extension: (start, end) of the payload in `data`} for the regular files of a tar
    (ustar, PAX and GNU long names). ~1 µs a member, against ~40 µs for the tarfile module:
    this loop runs for every member the trainer reads, holding the GIL, so it reads the header
    fields in place rather than through a copy of each header and a call per field."""
    members: dict[str, dict[str, Span]] = {}
    offset, long_name, total = 0, None, len(data)
    while offset + BLOCK <= total:
        if data[offset] == 0 and data[offset:offset + BLOCK] == _ZERO_BLOCK:
            break
        size = _octal(data[offset + 124:offset + 136])
        kind = data[offset + 156]
        start, end = offset + BLOCK, offset + BLOCK + size
        if end > total:
            raise ShardError(f"member at byte {offset} runs past the end ({end} > {total})")
        header, offset = offset, start + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in _LONG_NAME:  # the next member's long name (PAX record or GNU long link)
            long_name = _pax_path(data[start:end]) if kind == _PAX else data[start:end].rstrip(b"\0").decode()
            continue
        name, long_name = long_name or _header_name(data, header), None
        if kind in _REGULAR:
            key, _, ext = name.rpartition("/")[2].partition(".")
            entry = members.get(key)
            if entry is None:
                members[key] = {ext: (start, end)}
            else:
                entry[ext] = (start, end)
    return members


def _octal(field_bytes: bytes) -> int:
    try:
        return int(field_bytes.rstrip(b"\0 ") or b"0", 8)   # int() skips leading spaces itself
    except ValueError:
        raise ShardError(f"bad size field {field_bytes!r}") from None


def _header_name(data: bytes, header: int) -> str:
    """The name field of the header at byte `header`. A ustar prefix field holds only directories
    (names are split at a "/"), which a sample's key never needs."""
    stop = data.find(b"\0", header, header + 100)
    return data[header:stop if stop >= 0 else header + 100].decode("utf-8", "replace")


def _pax_path(records: bytes) -> str | None:
    for record in records.decode("utf-8", "replace").split("\n"):
        _, _, keyword_value = record.partition(" ")
        keyword, _, value = keyword_value.partition("=")
        if keyword == "path":
            return value
    return None


# Per sample, in key order: JPEG offset and length in the shard's bytes, label (-1 when unlabelled),
# and whether the sample has the members it needs.
SampleIndex = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def sample_index(data: bytes, labelled: bool, classes: int = MAX_CLASSES) -> SampleIndex:
    """The samples of a WebDataset tar's bytes, in key order; a label must be one of `classes`."""
    offsets, lengths, labels, complete = [], [], [], []
    for key, spans in sorted(parse_tar(data).items()):
        image, label = spans.get("jpg"), spans.get("cls")
        whole = image is not None and (label is not None or not labelled)
        complete.append(whole)
        offsets.append(image[0] if whole else 0)
        lengths.append(image[1] - image[0] if whole else 0)
        labels.append(_label(data, key, label, classes) if whole and labelled else -1)
    return (np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64), np.array(labels, dtype=np.int32),
            np.array(complete, dtype=bool))


def _label(data: bytes, key: str, span: Span, classes: int) -> int:
    text = data[span[0]:span[1]].strip()
    # isdigit: int() would also take "-1", "+3" and "1_0"; 10 digits hold any int32
    if not text.isdigit() or len(text) > 10 or int(text) >= classes:
        raise ShardError(f"sample {key}: its .cls {text[:20]!r} is not a class index in 0..{classes - 1}")
    return int(text)


class ShardSource:
    """Reads shards of one dataset; one per process (it holds the storage client)."""

    def __init__(self, location: Location, stats: ReadStats | None = None,
                 expected: dict[str, tuple[int, str]] | None = None, classes: int = MAX_CLASSES):
        self.fs, self.root = location.open()
        self.stats = stats or ReadStats()
        self.expected = expected or {}        # name -> (bytes, sha256) from the manifest
        self.classes = classes                # labels outside 0..classes-1 make a shard corrupt
        self.failure: Exception | None = None
        # (name, labelled) -> index of a shard the manifest pins by sha256: the tar is indexed once a
        # process, not every epoch (in Python it was 60% of the reader's time; ~20 bytes a sample).
        self._indexes: dict[tuple[str, bool], SampleIndex] = {}
        self._consecutive_skips = 0
        self._lock = threading.Lock()   # the skip count and the first failure: readers run on several threads

    def samples(self, name: str, part: int = 0, parts: int = 1,
                labelled: bool = True) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
        """The shard's bytes and, for its samples i with i % parts == part, the JPEG offsets and
        lengths in those bytes and the labels (int32; -1 when unlabelled). The JPEGs are cut out
        by tf.strings.substr inside the graph: no Python object per sample. Empty when skipped,
        and after a fatal failure, which is kept in `failure` rather than raised."""
        if self.failure:
            return _NOTHING
        try:
            return self._samples(name, part, parts, labelled)
        except StorageGone as exc:
            self._fail(exc)
        except Exception as exc:   # raised into tf.data, it would be dropped with the bad images
            log.exception("shard %s: reading failed", name)
            self._fail(exc)
        return _NOTHING

    def _fail(self, exc: Exception) -> None:
        # The first failure is the cause; readers on other threads may fail after it.
        with self._lock:
            if self.failure is None:
                self.failure = exc

    def _samples(self, name: str, part: int, parts: int,
                 labelled: bool) -> tuple[bytes, np.ndarray, np.ndarray, np.ndarray]:
        data, index = self._read(name, labelled)
        if index is None:
            return _NOTHING
        offsets, lengths, labels, complete = (column[part::parts] for column in index)
        incomplete = len(complete) - int(complete.sum())
        if incomplete:
            self.stats.skip("samples", "incomplete", incomplete)
            log.warning("shard %s: %d samples lack .jpg or .cls; skipped", name, incomplete)
        return data, offsets[complete], lengths[complete], labels[complete]

    def _read(self, name: str, labelled: bool) -> tuple[bytes, SampleIndex | None]:
        """The shard's verified bytes and their sample index (None when the shard is skipped)."""
        try:
            data = self._fetch(f"{self.root}/{name}", name)
            self._check(name, data)
            index = self._indexes.get((name, labelled))
            if index is None:
                index = sample_index(data, labelled, self.classes)
                if name in self.expected:   # the manifest's sha256 pins these bytes: same index next epoch
                    self._indexes[(name, labelled)] = index
        except FileNotFoundError:
            return b"", self._skip(name, "missing", "not found")
        except Exception as exc:
            # Storage failures are what ingest.storage says they are (OSError, botocore's and
            # aiohttp's errors after their own retries); anything else is a bug: fatal.
            if not isinstance(exc, (ShardError, ValueError)) and not is_storage_failure(exc):
                raise
            reason = "corrupt" if isinstance(exc, ShardError) else "unreadable"
            return b"", self._skip(name, reason, f"{type(exc).__name__}: {exc}")
        self.stats.add(shard_bytes=len(data), shards=1)
        with self._lock:
            self._consecutive_skips = 0
        return data, index

    def _fetch(self, path: str, name: str) -> bytes:
        """The shard's bytes. With the manifest's size, as a byte range: a plain read makes s3fs ask
        for the object's size first, a second request that cost 40% of the reading CPU for small
        shards. Bytes past that size would not be the manifest's shard anyway."""
        size = self.expected.get(name, (0, ""))[0]
        return self.fs.cat_file(path, start=0, end=size) if size else self.fs.cat_file(path)

    def _check(self, name: str, data: bytes) -> None:
        """Size and sha256 against the manifest: a damaged shard is caught here, not by the decoder."""
        if name not in self.expected:
            return
        size, sha256 = self.expected[name]
        if len(data) != size:
            raise ShardError(f"{len(data)} bytes, the manifest says {size}")
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ShardError("sha256 differs from the manifest's")

    def _skip(self, name: str, reason: str, detail: str) -> None:
        self.stats.skip("shards", reason)
        log.error("shard %s skipped (%s): %s", name, reason, detail)
        if reason == "corrupt":   # bytes that arrived: the data's fault, which no rerun mends
            return
        with self._lock:
            self._consecutive_skips += 1
            skips = self._consecutive_skips
        if skips >= MAX_CONSECUTIVE_SKIPS:
            raise StorageGone(f"{MAX_CONSECUTIVE_SKIPS} shards in a row could not be read (last: {name}: "
                             f"{detail}); is the storage at {self.root} reachable?")

    def check(self) -> None:
        """Raise the fatal failure, if reading had one."""
        if self.failure:
            raise self.failure
