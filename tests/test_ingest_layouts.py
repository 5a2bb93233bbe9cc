"""Every input layout -> shards: exact keys, labels, class table, quirks handled, bytes passed through."""
from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterator

import pytest

from ingest import synth
from ingest.sources import detect, scan_input
from ingest.storage import resolve_input

from .conftest import run_cli
from .helpers import read_dataset

REENCODED = {"grayscale", "cmyk", "png"}
REJECTED = {"truncated": "truncated", "empty": "empty", "not_an_image": "not_an_image"}

CASES = {
    "tinyimagenet": dict(layout="tinyimagenet", zip=False),
    "tinyimagenet-zip": dict(layout="tinyimagenet", zip=True),
    "imagenet": dict(layout="imagenet"),
    "imagenet-kaggle": dict(layout="imagenet-kaggle"),
    "imagefolder": dict(layout="imagefolder"),
}


@pytest.fixture(scope="module", params=list(CASES))
def ingested(request, tmp_path_factory):
    """(truth, input path, output path, cli result) for one layout, ingested once per module."""
    base = tmp_path_factory.mktemp(request.param)
    options = CASES[request.param]
    source = base / ("tiny-imagenet-200.zip" if options.get("zip") else "input")
    truth = synth.generate(str(source), classes=5, train_per_class=6, val_per_class=3, size=40,
                           seed=3, quirks=True, **options)
    output = base / "shards"
    result = run_cli("ingest.shard", "--input", source, "--output", output, "--shard-size", "7",
                     "--processes", "2", check=True)
    return truth, source, output, result


def test_keys_and_labels_round_trip(ingested):
    truth, _, output, _ = ingested
    manifest, splits = read_dataset(str(output))
    index = {c["wnid"]: c["index"] for c in manifest["classes"]}
    for split in ("train", "val"):
        expected = {k: w for k, w in truth.splits[split].items() if truth.quirks.get(k) not in REJECTED}
        assert set(splits[split]) == set(expected), split
        assert {k: s["cls"] for k, s in splits[split].items()} == {k: index[w] for k, w in expected.items()}
        assert manifest["splits"][split]["samples"] == len(expected)
    assert "test" not in splits


def test_class_table_is_sorted_wnids_with_names(ingested):
    truth, _, output, _ = ingested
    manifest, _ = read_dataset(str(output))
    assert [c["wnid"] for c in manifest["classes"]] == truth.wnids == sorted(truth.wnids)
    assert [c["index"] for c in manifest["classes"]] == list(range(len(truth.wnids)))
    # An ImageFolder's only class name is its folder name.
    names = {w: w if truth.layout == "imagefolder" else truth.names[w] for w in truth.wnids}
    assert {c["wnid"]: c["name"] for c in manifest["classes"]} == names


def real_pngs(source) -> dict[str, str]:
    """Keys of the PNG files an ImageFolder holds by design (besides the quirks)."""
    found = {}
    if not os.path.isdir(source):
        return found
    for dirpath, _, files in os.walk(source):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as handle:
                if handle.read(4) == b"\x89PNG":
                    found[name.split(".")[0]] = "png"
    return found


def test_quirks_reencoded_or_rejected(ingested):
    truth, source, output, result = ingested
    manifest, splits = read_dataset(str(output))
    samples = {k: s for per_split in splits.values() for k, s in per_split.items()}
    expected_causes: dict[str, int] = {}
    ingested_keys = set(truth.splits["train"]) | set(truth.splits["val"])
    quirks = {k: kind for k, kind in truth.quirks.items() if k in ingested_keys}
    if truth.layout == "imagefolder":
        quirks = {**real_pngs(source), **quirks}
    for key, kind in quirks.items():
        if kind in REENCODED:
            expected_causes[kind] = expected_causes.get(kind, 0) + 1
            assert samples[key]["jpg"][:3] == b"\xff\xd8\xff"
    assert manifest["reencoded"] == expected_causes
    rejected = {(r["source"].rsplit("/", 1)[-1].split(".")[0], r["reason"]) for r in manifest["rejected"]}
    assert rejected == {(k, REJECTED[kind]) for k, kind in quirks.items() if kind in REJECTED}
    assert "rejected:" in result.stdout and "re-encoded:" in result.stdout


def test_every_stored_image_is_rgb_jpeg(ingested):
    from PIL import Image

    _, _, output, _ = ingested
    _, splits = read_dataset(str(output))
    for per_split in splits.values():
        for key, sample in per_split.items():
            image = Image.open(io.BytesIO(sample["jpg"]))
            assert (image.format, image.mode) == ("JPEG", "RGB"), key
            assert (sample["json"]["width"], sample["json"]["height"]) == image.size


def source_blobs(path) -> Iterator[bytes]:
    """Every file of the input, looking inside zips and (nested) tars as the layouts need."""
    if os.path.isdir(path):
        for dirpath, _, files in os.walk(path):
            for name in files:
                yield from source_blobs(os.path.join(dirpath, name))
        return
    with open(path, "rb") as handle:
        data = handle.read()
    yield from _archive_blobs(str(path), data)


def _archive_blobs(name: str, data: bytes) -> Iterator[bytes]:
    if name.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for info in archive.infolist():
                yield archive.read(info)
    elif name.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            for member in archive:
                if member.isfile():
                    yield from _archive_blobs(member.name, archive.extractfile(member).read())
    else:
        yield data


def test_clean_images_pass_through_byte_for_byte(ingested):
    truth, source, output, _ = ingested
    _, splits = read_dataset(str(output))
    digests = {hashlib.sha256(blob).hexdigest() for blob in source_blobs(source)}
    clean = [k for k in splits["train"] if k not in truth.quirks and k not in real_pngs(source)]
    assert clean
    for key in clean:
        assert hashlib.sha256(splits["train"][key]["jpg"]).hexdigest() in digests, key


def test_boxes_carried_into_json(ingested):
    truth, _, output, _ = ingested
    _, splits = read_dataset(str(output))
    samples = {k: s for per_split in splits.values() for k, s in per_split.items()}
    with_boxes = [k for k in truth.boxes if k in samples]
    if truth.layout in ("tinyimagenet", "imagenet-kaggle"):
        assert with_boxes
    for key in with_boxes:
        assert samples[key]["json"]["boxes"] == [list(map(float, b)) for b in truth.boxes[key]], key


def test_detect_names_the_layout(ingested):
    truth, source, _, _ = ingested
    fs, root = resolve_input(str(source)).open()
    kind, _ = detect(fs, root, "auto")
    assert kind.name == truth.layout


def test_imagenet_labels_follow_wnid_not_ilsvrc_id(tmp_path):
    truth = synth.generate(str(tmp_path / "in"), layout="imagenet", classes=6, train_per_class=2,
                           val_per_class=2, size=32, seed=1)
    by_id = [w for w, _ in sorted(truth.ilsvrc_ids.items(), key=lambda kv: kv[1])]
    assert by_id != sorted(by_id), "the generator must make the ILSVRC2012_ID trap"
    scan = scan_input(resolve_input(str(tmp_path / "in")), "imagenet", ("val",))
    index = {c.wnid: c.index for c in scan.classes}
    assert {s.key: s.label for s in scan.splits["val"]} == {k: index[w] for k, w in truth.splits["val"].items()}


def test_test_split_is_unlabelled_when_asked_for(tmp_path):
    synth.generate(str(tmp_path / "in"), classes=3, train_per_class=2, val_per_class=1, test_count=4, size=32)
    run_cli("ingest.shard", "--input", tmp_path / "in", "--output", tmp_path / "out", "--splits", "test",
            "--processes", "1", check=True)
    manifest, splits = read_dataset(str(tmp_path / "out"))
    assert manifest["splits"]["test"]["labelled"] is False
    assert len(splits["test"]) == 4 and all(s["cls"] is None and "class" not in s["json"] for s in splits["test"].values())


def test_imagefolder_prefixes_keys_when_stems_collide(tmp_path):
    truth = synth.generate(str(tmp_path / "in"), layout="imagefolder", classes=2, train_per_class=2,
                           val_per_class=1, size=32)
    train = tmp_path / "in" / "train"
    first, second = sorted(os.listdir(train))
    a = sorted(os.listdir(train / first))[0]
    shutil.copy(train / first / a, train / second / a)
    run_cli("ingest.shard", "--input", tmp_path / "in", "--output", tmp_path / "out", "--processes", "1", check=True)
    _, splits = read_dataset(str(tmp_path / "out"))
    stem = a.split(".")[0]
    safe = {name: re.sub(r"[^A-Za-z0-9_-]", "_", name) for name in (first, second)}
    assert {f"{safe[first]}_{stem}", f"{safe[second]}_{stem}"} <= set(splits["train"])
    assert len(splits["train"]) == len(truth.splits["train"]) + 1
