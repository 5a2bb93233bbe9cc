"""Build one shard (read, normalise, tar) and commit it: shard object first, index entry last.

An `_index/<shard>.json` entry exists only for a shard object that was completely written,
so "entry present and object of the recorded size" is the definition of a committed shard.
Tars are byte-reproducible (fixed mtime, owner and order), so a redone shard is identical.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass

import fsspec

from .images import Normalized, RejectedImage, normalize
from .plan import ShardPlan
from .reader import InputReader
from .sources import Sample
from .storage import Location, display, read_json, storage_call, write_atomic, write_json
from .tarball import TarBuilder

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
PLAN_FILE = f"{INDEX_DIR}/plan.json"


@dataclass(frozen=True)
class ImageSettings:
    resize: int | None
    validate: str
    quality: int


def index_path(root: str, shard_name: str) -> str:
    return f"{root}/{INDEX_DIR}/{shard_name}.json"


def build_shard(shard: ShardPlan, reader: InputReader, settings: ImageSettings) -> tuple[bytes, dict]:
    """The shard's tar bytes and its index entry (without the object's size and hash yet)."""
    tar = TarBuilder()
    reencoded: Counter[str] = Counter()
    rejected: list[dict] = []
    keys = hashlib.sha256()
    sizes: set[tuple[int, int]] = set()
    for sample, data in zip(shard.samples, reader.read_all(shard.samples)):
        try:
            if isinstance(data, Exception):
                raise RejectedImage("unreadable", f"{type(data).__name__}: {data}")
            image = normalize(data, resize=settings.resize, validate=settings.validate, quality=settings.quality)
        except RejectedImage as exc:
            rejected.append({"split": shard.split, "source": sample.source,
                             "reason": exc.reason, "detail": exc.detail})
            continue
        if image.reencoded:
            reencoded[image.reencoded] += 1
        sizes.add((image.height, image.width))
        for name, payload in _members(sample, image):
            tar.add(name, payload)
        keys.update(f"{sample.key}\t{sample.label}\n".encode())
    entry = {
        "name": shard.name,
        "split": shard.split,
        "samples": len(shard.samples) - len(rejected),
        "keys_sha256": keys.hexdigest(),
        "reencoded": dict(sorted(reencoded.items())),
        "rejected": rejected,
    }
    if len(sizes) == 1:   # the trainer skips resizing a split whose images all have the model's size
        entry["image_size"] = list(sizes.pop())
    return tar.getvalue(), entry


def _members(sample: Sample, image: Normalized) -> list[tuple[str, bytes]]:
    members = [(f"{sample.key}.jpg", image.data)]
    if sample.label is not None:
        members.append((f"{sample.key}.cls", str(sample.label).encode()))
    members.append((f"{sample.key}.json", _sample_json(sample, image)))
    return members


def _sample_json(sample: Sample, image: Normalized) -> bytes:
    """The sample's JSON, keys sorted; formatted by hand: json.dumps of a dict is the slowest
    step per sample, and only the source path needs escaping."""
    parts = []
    if sample.boxes:
        boxes = [[round(v * image.scale, 2) for v in box] for box in sample.boxes]
        parts.append(f'"boxes": {boxes}')
    if sample.label is not None:
        parts.append(f'"class": {sample.label}')
    parts += [f'"height": {image.height}', f'"key": "{sample.key}"', f'"source": {json.dumps(sample.source)}',
              f'"width": {image.width}']
    return ("{" + ", ".join(parts) + "}").encode()


def commit_shard(fs: fsspec.AbstractFileSystem, root: str, data: bytes, entry: dict, plan_id: str) -> dict:
    """Write the shard object, then its index entry: the entry is the commit marker."""
    entry = {**entry, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "plan_id": plan_id}
    write_atomic(fs, f"{root}/{entry['name']}", data)
    write_json(fs, index_path(root, entry["name"]), entry)
    return entry


def load_committed(fs: fsspec.AbstractFileSystem, root: str, plan_id: str) -> dict[str, dict]:
    """Index entries of this plan whose shard object exists with the recorded size."""
    index = f"{root}/{INDEX_DIR}"
    for directory in (root, index):  # other processes and pods write here; listings must be fresh
        fs.invalidate_cache(directory)
    with storage_call(fs, root, "list"):
        sizes = {info["name"].rsplit("/", 1)[-1]: info["size"] for info in fs.ls(root, detail=True)
                 if info["type"] == "file" and info["name"].endswith(".tar")}
        names = [p for p in fs.ls(index, detail=False) if p.endswith(".tar.json")] if fs.isdir(index) else []
    with storage_call(fs, index, "read"):
        blobs = fs.cat(names) if names else {}
    committed = {}
    for path, blob in blobs.items():
        try:
            entry = json.loads(blob)
        except ValueError:
            log.warning("ignoring unreadable index entry %s", display(fs, path))
            continue
        if entry.get("plan_id") == plan_id and sizes.get(entry.get("name")) == entry.get("bytes"):
            committed[entry["name"]] = entry
    return committed


def read_plan(fs: fsspec.AbstractFileSystem, root: str) -> dict | None:
    # Read, not isfile() first: fsspec's isfile() answers False on any error, and taking an
    # unreachable plan for a missing one would let a differently planned run overwrite it.
    try:
        return read_json(fs, f"{root}/{PLAN_FILE}")
    except FileNotFoundError:
        return None


class ShardWorker:
    """Everything one process needs to build and commit shards; created once per process."""

    def __init__(self, source: Location, output: Location, settings: ImageSettings):
        self.reader = InputReader(source)
        self.fs, self.root = output.open()
        self.settings = settings

    def __call__(self, shard: ShardPlan, plan_id: str) -> dict:
        data, entry = build_shard(shard, self.reader, self.settings)
        return commit_shard(self.fs, self.root, data, entry, plan_id)
