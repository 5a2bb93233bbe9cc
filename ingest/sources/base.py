"""What every source module produces: the classes and, per split, the samples to store.

A source only lists; it never reads image bytes. Each sample carries a `loc` that the
reader in any worker process can resolve: a path in the input filesystem, optionally with
a byte range (an image inside an uncompressed tar is just a range of the tar file).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple
from collections.abc import Callable

import fsspec

from ..errors import InputError
from ..storage import is_local

Box = tuple[float, float, float, float]
# How a source runs independent listing tasks, e.g. one per class folder: `starmap(fn, args)`
# -> [fn(*a) for a in args], in order; the ingest passes its worker pool's, so listing runs in
# parallel. `fn` must be a module-level function (it may be sent to another process).
StarMap = Callable[[Callable, list[tuple]], list]


def serial_starmap(fn: Callable, args: list[tuple]) -> list:
    return [fn(*a) for a in args]

_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class Sample(NamedTuple):
    """One image to store. A NamedTuple: millions are made, and sent to worker processes
    (pickling a tuple costs a quarter of a dataclass)."""

    key: str                        # unique in its split; no dots or slashes (WebDataset keys)
    label: int | None               # class index; None for unlabelled splits (test)
    source: str                     # path shown to users, relative to the input
    size: int                       # source bytes, for the plan's byte cap
    path: str                       # where the bytes are in the input filesystem
    start: int | None = None        # byte range inside `path`, for images inside tars
    boxes: tuple[Box, ...] = ()


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str
    name: str


# Why a listed input entry is not stored; the manifest lists these beside the rejected images.
LISTING_REASONS = (
    "missing_file",   # an annotation names a file that is not there
    "no_label",       # an image without annotation
    "duplicate_key",  # a key already taken by another sample of the split
    "unsafe_path",    # a tar member named with an absolute path or '..'; a link leading outside the input
    "not_a_file",     # a tar member that is a link or device; a broken symbolic link
    "bad_name",       # a file or member name that is not valid UTF-8
    "unreadable",     # an archive inside the input that is not a readable tar
)


@dataclass(frozen=True)
class Problem:
    """An input sample that cannot be stored, found while listing (counted, never fatal)."""

    split: str
    source: str
    reason: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in LISTING_REASONS:
            raise ValueError(f"unknown listing problem {self.reason!r}; expected one of {LISTING_REASONS}")


@dataclass
class Scan:
    """A listed source: class table, samples per split, and problems found while listing."""

    kind: str
    classes: list[ClassInfo]
    splits: dict[str, list[Sample]]
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class SourceType:
    """A registry entry: how to recognise a layout and how to list it."""

    name: str
    looks_for: str                                                  # said when nothing matched
    splits: tuple[str, ...] | None                                  # None: whatever folders exist
    find_root: Callable[[fsspec.AbstractFileSystem, str], str | None]
    scan: Callable[[fsspec.AbstractFileSystem, str, tuple[str, ...], StarMap], Scan]


def safe_key(text: str) -> str:
    """Only [A-Za-z0-9_-]: WebDataset splits a member name at its first dot."""
    return _KEY_UNSAFE.sub("_", text) or "_"


def key_from_name(name: str) -> str:
    """`a/b/n01443537_0.JPEG` -> `n01443537_0`: the file stem, made safe as a WebDataset key."""
    return safe_key(name.rsplit("/", 1)[-1].split(".", 1)[0])


def class_table(wnids: list[str], names: dict[str, str]) -> tuple[list[ClassInfo], dict[str, int]]:
    """Class index = position in the sorted wnid list (Keras, torchvision and TFDS agree)."""
    ordered = sorted(set(wnids))
    classes = [ClassInfo(i, w, names.get(w, w)) for i, w in enumerate(ordered)]
    return classes, {c.wnid: c.index for c in classes}


def read_text(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.cat_file(path).decode("utf-8", errors="replace")


def text_lines(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    return [line for line in read_text(fs, path).splitlines() if line.strip()]


def parse_boxes(fields: list[str]) -> tuple[Box, ...]:
    """`["x0", "y0", "x1", "y1", ...]` -> boxes; a box that is not four finite numbers is dropped
    (boxes are metadata: a bad one must not cost the sample)."""
    boxes = []
    for i in range(0, len(fields) - 3, 4):
        try:
            box = tuple(float(v) for v in fields[i:i + 4])
        except ValueError:
            continue
        if all(math.isfinite(v) for v in box):
            boxes.append(box)
    return tuple(boxes)


def is_text(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python holds them as lone surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def printable(name: str) -> str:
    """The name with its undecodable bytes written as \\xNN: text that JSON and logs can hold."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Listing(NamedTuple):
    files: dict[str, int]                  # path -> size in bytes: the files to store
    refused: list[tuple[str, str, str]]    # (path, reason, detail): entries not taken, and why


def list_files(fs: fsspec.AbstractFileSystem, directory: str, root: str) -> Listing:
    """Regular files directly in `directory` (hidden ones skipped), of the dataset at `root`."""
    if not fs.isdir(directory):
        raise InputError(f"{directory}: directory missing")
    if is_local(fs):
        return _list_local_files(directory, root)
    out = {}
    for info in fs.ls(directory, detail=True):
        name = info["name"].rstrip("/")
        if info["type"] == "file" and not name.rsplit("/", 1)[-1].startswith("."):
            out[name] = int(info["size"])
    return Listing(out, [])


def _list_local_files(directory: str, root: str) -> Listing:
    """os.scandir: a third of fsspec's per-entry cost, which adds up over 1.28 M ImageNet files.
    Symbolic links are followed to files inside the dataset folder `root`; links leading outside
    it (whose bytes would end up in the shards), broken links and non-UTF-8 names are refused."""
    inside = os.path.realpath(root)
    linked_folder = not _within(os.path.realpath(directory), inside)
    files, refused = {}, []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            why = _refusal(entry, inside, linked_folder)
            if why:
                refused.append((entry.path, *why))
            elif entry.is_file():
                files[entry.path] = entry.stat().st_size
    return Listing(files, refused)


def _refusal(entry: os.DirEntry, inside: str, linked_folder: bool) -> tuple[str, str] | None:
    if not is_text(entry.name):
        return ("bad_name", "file name is not valid UTF-8") if entry.is_file() else None
    if not (linked_folder or entry.is_symlink()):   # the common case costs no system call
        return None
    target = os.path.realpath(entry.path)
    if not os.path.exists(target):
        return "not_a_file", "broken symbolic link (dangling, or a loop)"
    if not _within(target, inside) and os.path.isfile(target):
        return "unsafe_path", "a symbolic link leads outside the dataset folder"
    return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def refused_problems(split: str, listing: Listing, root: str) -> list[Problem]:
    return [Problem(split, printable(relative(path, root)), reason, detail)
            for path, reason, detail in listing.refused]


def list_dirs(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    return sorted(
        info["name"].rstrip("/") for info in fs.ls(directory, detail=True)
        if info["type"] == "directory" and not info["name"].rstrip("/").rsplit("/", 1)[-1].startswith(".")
    )


def relative(path: str, root: str) -> str:
    return path[len(root):].lstrip("/") if root and path.startswith(root) else path


def join(*parts: str) -> str:
    """Join path parts; an empty root (the top of a zip filesystem) adds no leading slash."""
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)
