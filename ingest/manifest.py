"""manifest.json: the dataset's table of contents and its commit marker (written last).

Built from `_index/plan.json` and the index entries alone, so `--finalize` needs no access to
the input and can run in any pod once every worker has committed its shards.
"""
from __future__ import annotations

import logging
from collections import Counter

import fsspec

from .errors import IncompleteError, InputError
from .storage import display, dump_json, read_json, write_atomic
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
            shards.append({k: entry[k] for k in ("name", "samples", "bytes", "sha256")})
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
        raise IncompleteError(f"{display(fs, root)}: {len(missing)} shard(s) not committed yet ({shown}); "
                              "run the missing workers (or rerun) before --finalize")
    manifest = build_manifest(plan, entries)
    path = f"{root}/{MANIFEST}"
    blob = dump_json(manifest)
    if fs.isfile(path) and fs.cat_file(path) == blob:
        log.info("manifest %s already up to date", display(fs, path))
    else:
        write_atomic(fs, path, blob)
    _remove_leftovers(fs, root)
    return manifest


def _remove_leftovers(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Temporary files of writes that a crash interrupted; harmless, but they waste space."""
    for directory in (root, f"{root}/{INDEX_DIR}"):
        for path in fs.ls(directory, detail=False):
            if ".tmp-" in path.rsplit("/", 1)[-1]:
                fs.rm_file(path)


def load_manifest(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    path = f"{root}/{MANIFEST}"
    if not fs.isfile(path):
        raise InputError(f"{display(fs, path)}: missing (not a finished dataset; run ingest.shard)")
    manifest = read_json(fs, path)
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{display(fs, path)}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    return manifest
