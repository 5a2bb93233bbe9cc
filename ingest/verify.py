"""`python -m ingest.verify URL`: check every shard against manifest.json.

For each shard: the object exists, has the recorded size and sha256, and holds the recorded
number of samples, each with an image whose JPEG headers are whole (and of the shard's recorded
image_size, if it has one) and (in labelled splits) a class index in range.
Every mismatch is printed on its own line; the exit code is non-zero if there is any.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor

from tqdm import tqdm

from . import cli
from .errors import EXIT_CODES, EXIT_INCOMPLETE, EXIT_OK
from .images import RejectedImage, jpeg_size
from .manifest import load_manifest
from .storage import Location, failure_reason, is_storage_failure, parse_storage_options

CHUNK = 8 << 20


def check_shard(fs, root: str, shard: dict, labelled: bool, num_classes: int) -> list[str]:
    """The problems of one shard, each a line naming it; empty when it matches the manifest.
    The object is streamed once (hash and tar parse together), so memory stays flat."""
    name = shard["name"]
    try:
        return _check_shard(fs, f"{root}/{name}", shard, labelled, num_classes)
    except FileNotFoundError:
        return [f"{name}: missing"]
    except Exception as exc:
        if not is_storage_failure(exc):
            raise
        return [f"{name}: cannot be read ({failure_reason(exc)})"]


def _check_shard(fs, path: str, shard: dict, labelled: bool, num_classes: int) -> list[str]:
    name = shard["name"]
    size = fs.size(path)
    if size != shard["bytes"]:
        return [f"{name}: size {size} bytes, manifest says {shard['bytes']}"]
    with fs.open(path, "rb") as handle:
        stream = _HashingReader(handle)
        members = _read_members(stream)
        while stream.read(CHUNK):
            pass
    digest = stream.sha256.hexdigest()
    if digest != shard["sha256"]:
        return [f"{name}: sha256 {digest[:12]}..., manifest says {shard['sha256'][:12]}..."]
    if members.tar_error:
        return [f"{name}: not a readable tar ({members.tar_error})"]
    return _check_samples(name, members, shard, labelled, num_classes)


class _HashingReader(io.RawIOBase):
    """A read-through file that hashes what passes."""

    def __init__(self, handle):
        self.handle = handle
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.sha256.update(data)
        return data


class _Members(dict):
    """key -> {extension: payload (.cls; .jpg: its (height, width), or why its headers are not a
    JPEG's; others b"")} of one shard, and what was odd."""

    def __init__(self) -> None:
        super().__init__()
        self.twice: set[str] = set()      # member names seen twice: readers would take either
        self.tar_error: str | None = None


def _read_members(stream) -> _Members:
    members = _Members()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                parts = members.setdefault(key, {})
                if ext in parts:
                    members.twice.add(member.name)
                parts[ext] = _payload(ext, tar.extractfile(member).read() if ext in ("cls", "jpg") else b"")
    except tarfile.TarError as exc:
        members.tar_error = str(exc)
    return members


def _payload(ext: str, data: bytes) -> bytes | tuple[int, int] | str:
    if ext != "jpg":
        return data
    try:
        return jpeg_size(data)
    except RejectedImage as exc:
        return f"{exc.reason}: {exc.detail}"


def _check_samples(name: str, members: _Members, shard: dict, labelled: bool, num_classes: int) -> list[str]:
    problems = [f"{name}: member {member} appears twice" for member in sorted(members.twice)]
    expected, size = shard["samples"], shard.get("image_size")
    if len(members) != expected:
        problems.append(f"{name}: {len(members)} samples, manifest says {expected}")
    for key, parts in members.items():
        image = parts.get("jpg")
        if image is None:
            problems.append(f"{name}: sample {key} has no .jpg")
        elif isinstance(image, str):
            problems.append(f"{name}: sample {key}: its .jpg is not a whole JPEG ({image})")
        elif size and list(image) != size:
            problems.append(f"{name}: sample {key} is {image[0]}x{image[1]}, the manifest's image_size says "
                            f"{size[0]}x{size[1]}")
        if labelled and not _valid_label(parts.get("cls"), num_classes):
            problems.append(f"{name}: sample {key} has no class index in 0..{num_classes - 1}")
    return problems


def _valid_label(raw: bytes | None, num_classes: int) -> bool:
    try:
        return raw is not None and 0 <= int(raw) < num_classes
    except ValueError:
        return False


def _split_totals(manifest: dict) -> list[str]:
    """A split's sample count (what readers size an epoch by) must be the sum over its shards."""
    problems = []
    for split, info in manifest["splits"].items():
        total = sum(shard["samples"] for shard in info["shards"])
        if info["samples"] != total:
            problems.append(f"split {split}: manifest says {info['samples']} samples, its shards list {total}")
    return problems


def verify(location: Location, threads: int = 8) -> tuple[int, list[str]]:
    """(shards checked, problem lines)."""
    fs, root = location.open()
    manifest = load_manifest(fs, root)
    num_classes = len(manifest["classes"])
    jobs = [(shard, info["labelled"]) for info in manifest["splits"].values() for shard in info["shards"]]
    problems = _split_totals(manifest)
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(jobs), unit="shard", desc="verify",
                                                   disable=None) as bar:
        futures = [pool.submit(check_shard, fs, root, shard, labelled, num_classes) for shard, labelled in jobs]
        for future in futures:
            problems += future.result()
            bar.update()
    return len(jobs), problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.verify",
        description="Check every shard of a dataset against its manifest.json (size, sha256, samples, labels).",
        epilog=f"exit codes: {EXIT_OK} all shards match; {EXIT_INCOMPLETE} mismatches (one line each); "
               f"3 no readable manifest; 2 {EXIT_CODES[2]}",
    )
    parser.add_argument("url", help="the dataset: the --output given to ingest.shard (path or fsspec URL)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option, repeatable (e.g. endpoint_url=http://127.0.0.1:9000)")
    parser.add_argument("--threads", type=int, default=8, help="shards checked concurrently (default 8)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, location = cli.parse(build_parser(), argv,
                               lambda a: Location(a.url, parse_storage_options(a.storage_option)))

    def body() -> int:
        checked, problems = verify(location, args.threads)
        for line in problems:
            print(line)
        print(f"{'FAILED' if problems else 'ok'}: {checked} shards checked, {len(problems)} problem(s)")
        return EXIT_INCOMPLETE if problems else EXIT_OK

    return cli.run_main(body)


if __name__ == "__main__":
    sys.exit(main())
