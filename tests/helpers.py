"""Reading a finished dataset back, for assertions."""
from __future__ import annotations

import io
import json
import tarfile

import fsspec


def read_dataset(url: str) -> tuple[dict, dict[str, dict[str, dict]]]:
    """(manifest, {split: {key: {"jpg": bytes, "cls": int | None, "json": dict}}}) via fsspec."""
    fs, root = fsspec.core.url_to_fs(url)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    splits: dict[str, dict[str, dict]] = {}
    for split, info in manifest["splits"].items():
        samples = splits.setdefault(split, {})
        for shard in info["shards"]:
            with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/{shard['name']}"))) as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    assert key not in samples or ext not in samples[key], f"duplicate {member.name}"
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    for samples in splits.values():
        for sample in samples.values():
            sample["cls"] = int(sample["cls"]) if "cls" in sample else None
            sample["json"] = json.loads(sample["json"])
    return manifest, splits


def shard_bytes(url: str) -> dict[str, bytes]:
    """Every object of the dataset (shards, index, manifest) by relative name."""
    fs, root = fsspec.core.url_to_fs(url)
    return {path[len(root):].lstrip("/"): fs.cat_file(path) for path in fs.find(root)}
