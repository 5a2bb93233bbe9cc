"""Tests for the synthetic data set generator (ingest.synth)."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ingest import synth

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(classes=6, train_per_class=4, val_per_class=3, size=32)
KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
TRAIN_QUIRKS = {"cmyk", "png", "truncated", "empty", "not_an_image"}

Files = dict[str, dict[str, tuple[str | None, bytes]]]  # split -> key -> (label from path, bytes)


def _make(tmp_path: Path, layout: str, name: str = "out", **overrides) -> synth.SynthTruth:
    options = {**SMALL, "quirks": True, **overrides}
    zipped = options.get("zip", False)
    return synth.generate(str(tmp_path / (name + (".zip" if zipped else ""))), layout=layout,
                          **options)


def _add(files: Files, split: str, name: str, label: str | None, data: bytes) -> None:
    files.setdefault(split, {})[name.rpartition(".")[0]] = (label, data)


def _tar_files(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as archive:
        return {m.name: archive.extractfile(m).read() for m in archive.getmembers()}


def _tree_files(root: Path, layout: str) -> Files:
    """Every image file under a directory layout, keyed by split and stem."""
    files: Files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        parts = path.relative_to(root).parts
        if len(parts) < 3:  # metadata files at the top
            continue
        if layout == "tinyimagenet" and parts[-2] == "images":
            _add(files, parts[0], path.name, parts[1] if parts[0] == "train" else None,
                 path.read_bytes())
        elif layout == "imagenet-kaggle" and parts[0] == "ILSVRC":
            split = parts[3]
            _add(files, split, path.name, parts[4] if split == "train" else None, path.read_bytes())
        elif layout == "imagefolder":
            _add(files, parts[0], path.name, parts[1], path.read_bytes())
    return files


def _imagenet_files(root: Path) -> Files:
    files: Files = {}
    for inner_name, inner in _tar_files(root / "ILSVRC2012_img_train.tar").items():
        with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
            for member in archive.getmembers():
                _add(files, "train", member.name, inner_name.removesuffix(".tar"),
                     archive.extractfile(member).read())
    for name, data in _tar_files(root / "ILSVRC2012_img_val.tar").items():
        _add(files, "val", name, None, data)
    return files


def _zip_files(path: Path) -> Files:
    files: Files = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            parts = name.split("/")
            if len(parts) > 2 and parts[-2] == "images" and parts[-1]:
                _add(files, parts[1], parts[-1], parts[2] if parts[1] == "train" else None,
                     archive.read(name))
    return files


def _files(truth: synth.SynthTruth) -> Files:
    path = Path(truth.path)
    if path.suffix == ".zip":
        return _zip_files(path)
    if truth.layout == "imagenet":
        return _imagenet_files(path)
    return _tree_files(path, truth.layout)


def _all_bytes(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


LAYOUT_CASES = [("tinyimagenet", {}), ("tinyimagenet", {"zip": True}), ("imagenet", {}),
                ("imagenet-kaggle", {}), ("imagefolder", {})]
CASE_IDS = ["tinyimagenet", "tinyimagenet-zip", "imagenet", "imagenet-kaggle", "imagefolder"]


@pytest.mark.parametrize(("layout", "extra"), LAYOUT_CASES, ids=CASE_IDS)
def test_truth_matches_files_on_disk(tmp_path: Path, layout: str, extra: dict) -> None:
    truth = _make(tmp_path, layout, **extra)
    files = _files(truth)
    assert set(files) == set(truth.splits)
    for split, keys in truth.splits.items():
        assert set(files[split]) == set(keys)
        for key, (label_from_path, _) in files[split].items():
            if label_from_path is not None:
                assert label_from_path == keys[key]
    # Keys are unique across splits: truth.quirks and truth.boxes are keyed by them alone.
    all_keys = [key for keys in truth.splits.values() for key in keys]
    assert len(all_keys) == len(set(all_keys))
    assert len(truth.splits["train"]) == 6 * 4 + len(TRAIN_QUIRKS)
    assert len(truth.splits["val"]) == 6 * 3 + 1
    assert truth.wnids == sorted(truth.wnids) and len(set(truth.wnids)) == 6
    assert set(truth.names) == set(truth.wnids)
    labels = {label for keys in truth.splits.values() for label in keys.values()}
    assert labels - {None} == set(truth.wnids)


@pytest.mark.parametrize(("layout", "extra"), LAYOUT_CASES, ids=CASE_IDS)
def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, layout: str, extra: dict) -> None:
    first = _all_bytes(Path(_make(tmp_path, layout, "a", seed=3, **extra).path))
    second = _all_bytes(Path(_make(tmp_path, layout, "b", seed=3, **extra).path))
    other = _all_bytes(Path(_make(tmp_path, layout, "c", seed=4, **extra).path))
    assert first == second
    assert first != other


@pytest.mark.parametrize(("layout", "extra"), LAYOUT_CASES, ids=CASE_IDS)
def test_quirk_files_are_what_truth_says(tmp_path: Path, layout: str, extra: dict) -> None:
    truth = _make(tmp_path, layout, **extra)
    files = _files(truth)
    kinds_by_split = {split: {truth.quirks[k] for k in keys if k in truth.quirks}
                      for split, keys in truth.splits.items()}
    assert TRAIN_QUIRKS | {"grayscale"} <= kinds_by_split["train"]
    assert "cmyk" in kinds_by_split["val"]
    for split, keys in files.items():
        for key, (_, data) in keys.items():
            _check_kind(truth.quirks.get(key) if key in truth.splits[split] else None, data)


def _check_kind(kind: str | None, data: bytes) -> None:
    if kind == "empty":
        assert data == b""
    elif kind == "not_an_image":
        assert data.startswith(b"<html>")
    elif kind == "truncated":
        assert data.startswith(b"\xff\xd8") and not data.endswith(b"\xff\xd9")
    elif kind == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        with Image.open(io.BytesIO(data)) as image:
            expected = {"cmyk": "CMYK", "grayscale": "L", None: "RGB"}[kind]
            assert image.mode == expected
            image.load()


def test_quirks_off_leaves_only_grayscale(tmp_path: Path) -> None:
    truth = _make(tmp_path, "tinyimagenet", quirks=False)
    assert set(truth.quirks.values()) == {"grayscale"}
    assert len(truth.splits["train"]) == 6 * 4


def test_tinyimagenet_metadata(tmp_path: Path) -> None:
    truth = _make(tmp_path, "tinyimagenet", test_count=5)
    root = Path(truth.path)
    listed = root.joinpath("wnids.txt").read_text().split()
    assert sorted(listed) == truth.wnids and listed != truth.wnids

    words = dict(line.split("\t") for line in root.joinpath("words.txt").read_text().splitlines())
    assert {w: words[w] for w in truth.wnids} == truth.names
    assert len(set(words) - set(truth.wnids)) >= 20
    assert any(", " in name for name in truth.names.values())

    for line in root.joinpath("val/val_annotations.txt").read_text().splitlines():
        name, wnid, *box = line.split("\t")
        key = name.removesuffix(".JPEG")
        assert truth.splits["val"][key] == wnid
        assert truth.boxes[key] == [tuple(map(int, box))]
    for wnid in truth.wnids:
        for line in root.joinpath(f"train/{wnid}/{wnid}_boxes.txt").read_text().splitlines():
            name, *box = line.split("\t")
            x0, y0, x1, y1 = map(int, box)
            assert truth.boxes[name.removesuffix(".JPEG")] == [(x0, y0, x1, y1)]
            assert 0 <= x0 <= x1 < 32 and 0 <= y0 <= y1 < 32
    assert len(truth.splits["test"]) == 5 and set(truth.splits["test"].values()) == {None}
    assert truth.ilsvrc_ids == {}


def test_tinyimagenet_zip_members(tmp_path: Path) -> None:
    truth = _make(tmp_path, "tinyimagenet", zip=True)
    with zipfile.ZipFile(truth.path) as archive:
        names = archive.namelist()
    assert all(name.startswith("tiny-imagenet-200/") for name in names)
    for folder in ("", "train/", "val/images/", f"train/{truth.wnids[0]}/images/"):
        assert "tiny-imagenet-200/" + folder in names
    assert "tiny-imagenet-200/wnids.txt" in names
    assert "tiny-imagenet-200/val/val_annotations.txt" in names


def _load_meta(root: Path) -> tuple[np.ndarray, list[int]]:
    devkit = _tar_files(root / "ILSVRC2012_devkit_t12.tar.gz")
    meta = scipy.io.loadmat(io.BytesIO(devkit["ILSVRC2012_devkit_t12/data/meta.mat"]),
                            squeeze_me=True)["synsets"]
    truth_file = devkit["ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"]
    return meta, [int(line) for line in truth_file.decode().split()]


def test_imagenet_devkit_reads_like_the_real_one(tmp_path: Path) -> None:
    truth = _make(tmp_path, "imagenet")
    meta, ground_truth = _load_meta(Path(truth.path))
    assert meta.ndim == 1
    leaves = [rec for rec in meta if rec["num_children"] == 0]
    # torchvision's parse_devkit_archive reads the fields by position.
    ids, wnids, words = list(zip(*leaves))[:3]
    assert list(ids) == list(range(1, 7))
    assert list(wnids) != sorted(wnids)
    assert {w: int(i) for i, w in zip(ids, wnids)} == truth.ilsvrc_ids
    assert dict(zip(wnids, words)) == truth.names
    train_counts = Counter(truth.splits["train"].values())
    assert {str(rec["WNID"]): int(rec["num_train_images"]) for rec in leaves} == train_counts
    parents = [rec for rec in meta if rec["num_children"] > 0]
    assert parents and all(int(rec["ILSVRC2012_ID"]) > 6 for rec in parents)
    assert all(str(rec["WNID"]) not in truth.names for rec in parents)

    wnid_of_id = dict(zip(map(int, ids), wnids))
    val = sorted(truth.splits["val"].items())
    assert [wnid_of_id[i] for i in ground_truth] == [wnid for _, wnid in val]
    assert val[0][0] == "ILSVRC2012_val_00000001"


def test_imagenet_archives_are_realistic(tmp_path: Path) -> None:
    truth = _make(tmp_path, "imagenet")
    root = Path(truth.path)
    assert sorted(p.name for p in root.iterdir()) == [
        "ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]
    with tarfile.open(root / "ILSVRC2012_img_train.tar") as archive:
        assert {m.mtime for m in archive.getmembers()} == {synth._TAR_MTIME}
    numbers = sorted(int(key.rpartition("_")[2]) for key in truth.splits["train"])
    assert numbers != list(range(numbers[0], numbers[0] + len(numbers)))
    sizes = set()
    for key, (_, data) in _files(truth)["val"].items():
        if truth.quirks.get(key) in (None, "grayscale"):
            sizes.add(Image.open(io.BytesIO(data)).size)
    assert len(sizes) > 1 and any(w != h for w, h in sizes)


def test_imagenet_kaggle_csvs(tmp_path: Path) -> None:
    truth = _make(tmp_path, "imagenet-kaggle", test_count=4)
    root = Path(truth.path)
    mapping = root.joinpath("LOC_synset_mapping.txt").read_text().splitlines()
    in_id_order = sorted(truth.ilsvrc_ids, key=truth.ilsvrc_ids.get)
    assert [line.split(" ", 1)[0] for line in mapping] == in_id_order != truth.wnids
    assert {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in mapping} == truth.names

    val_rows = _solution(root / "LOC_val_solution.csv")
    assert set(val_rows) == set(truth.splits["val"])
    assert list(val_rows) != sorted(val_rows)
    train_rows = _solution(root / "LOC_train_solution.csv")
    assert 0 < len(train_rows) < len(truth.splits["train"])
    for split, rows in (("val", val_rows), ("train", train_rows)):
        for key, boxes in rows.items():
            assert {wnid for wnid, _ in boxes} == {truth.splits[split][key]}
            assert [box for _, box in boxes] == truth.boxes[key]
    # The two-disks class (index 3) gets two boxes per image, like multi-object rows.
    assert any(len(boxes) > 1 for boxes in val_rows.values())
    assert set(truth.splits["test"]) == {f"ILSVRC2012_test_{k:08d}" for k in range(1, 5)}


def _solution(path: Path) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    header, *lines = path.read_text().splitlines()
    assert header == "ImageId,PredictionString"
    rows = {}
    for line in lines:
        key, prediction = line.split(",")
        assert prediction.endswith(" ")
        tokens = prediction.split()
        rows[key] = [(tokens[i], tuple(map(int, tokens[i + 1:i + 5])))
                     for i in range(0, len(tokens), 5)]
    return rows


def test_imagefolder_names_and_extensions(tmp_path: Path) -> None:
    truth = _make(tmp_path, "imagefolder", quirks=False)
    root = Path(truth.path)
    assert {p.name for p in (root / "train").iterdir()} == set(truth.wnids)
    assert all(folder == name.replace(" ", "_") for folder, name in truth.names.items())
    files = list((root / "train").rglob("*"))
    suffixes = {p.suffix for p in files if p.is_file()}
    assert suffixes == {".jpg", ".png", ".JPEG"}
    for path in files:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(b"\x89PNG")


def test_render_shapes_and_boxes() -> None:
    rng = np.random.default_rng(0)
    for cls in range(12):
        image, (x0, y0, x1, y1) = synth.render(cls, rng, (48, 80))
        assert image.shape == (48, 80, 3) and image.dtype == np.uint8
        assert 0 <= x0 <= x1 < 80 and 0 <= y0 <= y1 < 48
    image, _ = synth.render(250, rng, 8)
    assert image.shape == (8, 8, 3)


def test_patterns_distinct_and_never_mirror_images() -> None:
    signatures = {(p.shape, p.orientation, round(p.frequency, 6))
                  for p in map(synth.pattern, range(600))}
    assert len(signatures) == 600
    first_ten = [synth.pattern(c) for c in range(10)]
    assert len({p.shape for p in first_ten}) == 10
    # A horizontal flip maps a grating at theta to 180 - theta; it must not land on another class.
    for shape, orientation, frequency in signatures:
        mirrored = (shape, (180.0 - orientation) % 180.0, frequency)
        assert mirrored == (shape, orientation, frequency) or mirrored not in signatures


def _fft_features(image: np.ndarray) -> np.ndarray:
    """Translation-invariant: the magnitude spectrum of the grayscale image."""
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    spectrum = np.log1p(np.abs(np.fft.fft2(gray - gray.mean()))).ravel()
    return spectrum / np.linalg.norm(spectrum)


def test_learnable_by_nearest_centroid_on_fft() -> None:
    rng = np.random.default_rng(0)
    classes, per_class, train = 10, 40, 30
    features = np.array([[_fft_features(synth.render(c, rng, 64)[0]) for _ in range(per_class)]
                         for c in range(classes)])
    centroids = features[:, :train].mean(axis=1)
    test = features[:, train:].reshape(-1, features.shape[-1])
    labels = np.repeat(np.arange(classes), per_class - train)
    distances = ((test[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == labels).mean()
    assert accuracy >= 0.5, accuracy


@pytest.mark.parametrize(("overrides", "message"), [
    ({"layout": "coco"}, "unknown layout 'coco'"),
    ({"classes": 0}, "classes must be >= 1"),
    ({"size": 7}, "size must be >= 8"),
    ({"train_per_class": -1}, "train_per_class must be >= 0"),
    ({"val_per_class": -2}, "val_per_class must be >= 0"),
    ({"test_count": -3}, "test_count must be >= 0"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"grayscale_fraction": 1.5}, "grayscale_fraction"),
    ({"layout": "imagenet", "zip": True}, "zip is only supported"),
])
def test_bad_arguments_raise(tmp_path: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        synth.generate(str(tmp_path / "out"), **{**SMALL, **overrides})


def test_refuses_to_clobber(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        synth.generate(str(tmp_path / "full"), **SMALL)
    (tmp_path / "a.zip").write_bytes(b"mine")
    with pytest.raises(ValueError, match="already exists"):
        synth.generate(str(tmp_path / "a.zip"), zip=True, **SMALL)
    with pytest.raises(ValueError, match="must end in .zip"):
        synth.generate(str(tmp_path / "b"), zip=True, **SMALL)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    synth.generate(str(tmp_path / "empty"), **SMALL)  # an empty directory is fine


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ingest.synth", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = _cli("--output", str(tmp_path / "out"), "--layout", "coco")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: unknown layout 'coco'")
    assert "Traceback" not in result.stderr


def test_cli_writes_and_summarises(tmp_path: Path) -> None:
    result = _cli("--output", str(tmp_path / "out"), "--classes", "3", "--train-per-class", "2",
                  "--val-per-class", "1", "--size", "16", "--quirks")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"wrote tinyimagenet data set, 3 classes (train 11, val 4, test 3 images) "
        f"to {tmp_path / 'out'}")
    assert (tmp_path / "out" / "wnids.txt").exists()


def test_cli_help_explains_every_flag() -> None:
    result = _cli("--help")
    assert result.returncode == 0
    for flag in ("--output", "--layout", "--classes", "--train-per-class", "--val-per-class",
                 "--test-count", "--size", "--seed", "--quirks", "--zip", "--grayscale-fraction"):
        assert flag in result.stdout
