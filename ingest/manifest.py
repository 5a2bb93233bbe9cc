"""manifest.json: the dataset's table of contents and its commit marker (written last).

Built from `_index/plan.json` and the index entries alone, so `--finalize` needs no access to
the input and can run in any pod once every worker has committed its shards.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter

import fsspec

from .errors import IncompleteError, InputError
from .storage import display, dump_json, read_json, storage_call, write_atomic
from .writer import INDEX_DIR, load_committed, read_plan

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "webdataset-imagenet"
FORMAT_VERSION = 1


def build_manifest(plan: dict, entries: dict[str, dict]) -> dict:
    splits = {}
    reencoded: Counter[str] = Counter()
    rejected = list(plan["problems"])
    for split, info in plan["splits"].items():
        shards = []
        for name in info["shards"]:
            entry = entries[name]
            shards.append({k: entry[k] for k in ("name", "samples", "bytes", "sha256", "image_size") if k in entry})
            reencoded.update(entry["reencoded"])
            rejected += entry["rejected"]
        splits[split] = {"samples": sum(s["samples"] for s in shards), "labelled": info["labelled"], "shards": shards}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "plan_id": plan["plan_id"],
        "source": plan["source"],
        "classes": plan["classes"],
        "splits": splits,
        "reencoded": dict(sorted(reencoded.items())),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
        "rejected": sorted(rejected, key=lambda r: (r["split"], r["source"])),
    }


class ShardsNotCommitted(IncompleteError):
    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


def missing_shards(plan: dict, entries: dict[str, dict]) -> list[str]:
    return [n for info in plan["splits"].values() for n in info["shards"] if n not in entries]


def finalize(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    """Merge the index into manifest.json once every planned shard is committed."""
    plan = read_plan(fs, root)
    if plan is None:
        raise InputError(f"{display(fs, root)}: no {INDEX_DIR}/plan.json; run the workers first")
    entries = load_committed(fs, root, plan["plan_id"])
    missing = missing_shards(plan, entries)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise ShardsNotCommitted(f"{display(fs, root)}: {len(missing)} shard(s) not committed yet ({shown}); "
                                 "run the missing workers (or rerun) before --finalize", missing)
    manifest = build_manifest(plan, entries)
    path = f"{root}/{MANIFEST}"
    blob = dump_json(manifest)
    if _read_or_none(fs, path) == blob:
        log.info("manifest %s already up to date", display(fs, path))
    else:
        write_atomic(fs, path, blob)
    _remove_leftovers(fs, root)
    return manifest


def _read_or_none(fs: fsspec.AbstractFileSystem, path: str) -> bytes | None:
    with storage_call(fs, path, "read"):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None


def _remove_leftovers(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Temporary files of writes that a crash interrupted; harmless, but they waste space."""
    for directory in (root, f"{root}/{INDEX_DIR}"):
        with storage_call(fs, directory, "clean up"):
            for path in fs.ls(directory, detail=False):
                if ".tmp-" in path.rsplit("/", 1)[-1]:
                    with contextlib.suppress(FileNotFoundError):  # an overlapping finalize got it first
                        fs.rm_file(path)


def load_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    """The manifest, checked for the structure and internal consistency readers rely on."""
    path = f"{root}/{MANIFEST}"
    try:
        manifest = read_json(fs, path, invalid=InputError)
    except FileNotFoundError:
        raise InputError(f"{display(fs, path)}: missing (not a finished dataset; run ingest.shard)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT \
            or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{display(fs, path)}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{display(fs, path)}: {problem}")
    return manifest


# A shard name is a plain file name in the dataset folder: never a path that leads elsewhere.
_SHARD_NAME = re.compile(r"^[^/\\.][^/\\]*\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _manifest_problem(manifest: dict) -> str | None:
    """What makes a manifest unusable or self-contradictory, or None."""
    classes, splits = manifest.get("classes"), manifest.get("splits")
    if not isinstance(classes, list) or not isinstance(splits, dict):
        return "malformed (classes must be a list and splits an object)"
    seen: set[str] = set()
    for split, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not isinstance(info.get("samples"), int):
            return f"split {split}: malformed (needs samples and a list of shards)"
        for shard in shards:
            problem = _shard_problem(shard, seen)
            if problem:
                return f"split {split}: {problem}"
    return None


def _shard_problem(shard: object, seen: set[str]) -> str | None:
    if not isinstance(shard, dict) or not isinstance(shard.get("name"), str):
        return "a shard entry without a name"
    name = shard["name"]
    if not _SHARD_NAME.match(name):
        return f"shard name {name!r} is not a plain .tar file name"
    if name in seen:
        return f"shard {name} listed twice"
    seen.add(name)
    counts = [shard.get(k) for k in ("samples", "bytes")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        return f"shard {name}: samples and bytes must be counts"
    if not isinstance(shard.get("sha256"), str) or not _SHA256.match(shard["sha256"]):
        return f"shard {name}: sha256 is not a hex digest"
    size = shard.get("image_size")
    if size is not None and not (isinstance(size, list) and len(size) == 2
                                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)):
        return f"shard {name}: image_size must be [height, width] in pixels"
    return None
