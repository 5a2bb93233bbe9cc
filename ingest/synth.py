"""Learnable synthetic image-classification data sets in the on-disk layouts of real downloads.

ImageNet and TinyImageNet cannot be downloaded here, so the demo, the tests and the benchmarks
use this generator. Each class is a shape filled with an oriented grating; position, scale,
colours and pixel noise are random per image, so a model has to learn the pattern (and random
crops help), while no class is the horizontal mirror image of another (so flips are safe).
The files mimic the real downloads, including their traps (unsorted wnids.txt, ILSVRC2012_IDs
that are not in sorted-wnid order, grayscale JPEGs) and, with ``quirks``, their dirty files.

    python -m ingest.synth --output demo-data/tiny --classes 10 --train-per-class 100
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import io
import math
import sys
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from collections.abc import Callable, Iterator

import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

Box = tuple[int, int, int, int]  # x0, y0, x1, y1: inclusive pixel coordinates, like the real files

QUIRK_KINDS = ("grayscale", "cmyk", "png", "truncated", "empty", "not_an_image")
_TRAIN_QUIRKS = ("cmyk", "png", "truncated", "empty", "not_an_image")
_VAL_QUIRKS = ("cmyk",)
_NOT_AN_IMAGE = b"<html>error</html>\n"
_TAB = "\t"  # f-string expressions cannot contain backslashes before Python 3.12

_SHAPES = ("disk", "square", "triangle", "two-disks", "ring",
           "cross", "diamond", "hexagon", "half-disk", "frame")
# Mirroring maps a grating at theta to 180 - theta; none of these is another's mirror image.
_ORIENTATIONS = (0.0, 22.5, 45.0, 67.5, 90.0)
_FREQUENCIES = 4  # per block of 200 classes
_BASE_FREQUENCY = 2.0  # grating cycles across the shape's diameter
# Ratio between successive frequencies: the highest (2 * 1.35**4 = 6.6 cycles) still has a
# period of 3.4 px on the smallest 64 px shape, above the 2 px Nyquist limit.
_FREQUENCY_RATIO = 1.35
_SCALE_RANGE = (0.35, 0.70)  # shape diameter as a fraction of the shorter image side
_ORIENTATION_JITTER = 4.0  # degrees; well below the 22.5 degree spacing of the classes
_JPEG_QUALITY = 90
_WNID_RANGE = (1_000_000, 15_300_000)
_DISTRACTOR_SYNSETS = 20
_NON_LEAF_SYNSETS = 3
_TAR_MTIME = 1_335_830_400  # fixed (2012-05-01) so that tars are byte-identical across runs
_ZIP_DATE = (2015, 1, 1, 0, 0, 0)
_MAT_HEADER = b"MATLAB 5.0 MAT-file Platform: posix, Created on: Tue May  1 00:00:00 2012".ljust(116)
_ZIP_ROOT = "tiny-imagenet-200/"
_KAGGLE_DATA = "ILSVRC/Data/CLS-LOC"
_TRAIN_BOX_FRACTION = 0.5  # LOC_train_solution.csv covers only part of the train images
_LAYOUTS_WITH_TEST = ("tinyimagenet", "imagenet-kaggle")


@dataclass
class SynthTruth:
    """What was written, for tests of the ingest to compare against."""

    layout: str
    path: str
    wnids: list[str]  # sorted; for imagefolder the class folder names
    names: dict[str, str]  # wnid -> human name exactly as written in the metadata
    splits: dict[str, dict[str, str | None]]  # split -> {file stem: wnid, None if unlabelled}
    quirks: dict[str, str] = field(default_factory=dict)  # file stem -> one of QUIRK_KINDS
    boxes: dict[str, list[Box]] = field(default_factory=dict)  # file stem -> annotated boxes
    ilsvrc_ids: dict[str, int] = field(default_factory=dict)  # wnid -> ILSVRC2012_ID


# --------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    """The visual signature of one class."""

    shape: int
    orientation: float  # degrees, image coordinates (y down)
    frequency: float  # grating cycles across the shape's diameter
    frequency_index: int

    @property
    def name(self) -> str:
        return f"striped {_SHAPES[self.shape]} {self.orientation:g}deg f{self.frequency_index}"


def _van_der_corput(n: int) -> float:
    """0, 1/2, 1/4, 3/4, 1/8, ...: fills the gaps between earlier values ever more finely."""
    value, denominator = 0.0, 1.0
    while n:
        denominator *= 2
        n, bit = divmod(n, 2)
        value += bit / denominator
    return value


def pattern(cls: int) -> Pattern:
    """Class ``cls``'s pattern; the first few classes already differ in shape, angle and frequency.

    Classes 0..199 are a bijection onto 10 shapes x 5 orientations x 4 frequencies; every further
    block of 200 classes repeats it with frequencies between the earlier ones.
    """
    shape, j = cls % len(_SHAPES), cls // len(_SHAPES)
    block, j = divmod(j, len(_ORIENTATIONS) * _FREQUENCIES)
    # For a fixed shape, j -> (orientation, frequency) is a bijection on 0..19.
    orientation = (j + shape) % len(_ORIENTATIONS)
    local = (j // len(_ORIENTATIONS) + shape) % _FREQUENCIES
    frequency = _BASE_FREQUENCY * _FREQUENCY_RATIO ** (local + _van_der_corput(block))
    return Pattern(shape, _ORIENTATIONS[orientation], frequency, _FREQUENCIES * block + local)


def _disk(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    return [u * u + v * v <= 1.0]


def _square(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    return [np.maximum(np.abs(u), np.abs(v)) <= 0.8]


def _triangle(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    return [(np.abs(u) <= (v + 1.0) * 0.6) & (v <= 0.8)]


def _two_disks(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    # Two parts, so that the Kaggle layout gets rows with several boxes like the real file.
    return [(u - 0.5) ** 2 + v * v <= 0.2, (u + 0.5) ** 2 + v * v <= 0.2]


def _ring(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    rho2 = u * u + v * v
    return [(rho2 <= 1.0) & (rho2 >= 0.3)]


def _cross(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    au, av = np.abs(u), np.abs(v)
    return [((au <= 0.3) | (av <= 0.3)) & (au <= 1.0) & (av <= 1.0)]


def _diamond(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    return [np.abs(u) + np.abs(v) <= 1.0]


def _hexagon(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    av = np.abs(v)
    return [(av <= math.sqrt(3) / 2) & (np.abs(u) + av / math.sqrt(3) <= 1.0)]


def _half_disk(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    # The upper half, which is its own mirror image.
    return [(u * u + v * v <= 1.0) & (v <= 0.0)]


def _frame(u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
    chebyshev = np.maximum(np.abs(u), np.abs(v))
    return [(chebyshev <= 0.9) & (chebyshev >= 0.6)]


_SHAPE_MASKS: tuple[Callable[[np.ndarray, np.ndarray], list[np.ndarray]], ...] = (
    _disk, _square, _triangle, _two_disks, _ring, _cross, _diamond, _hexagon, _half_disk, _frame)


@functools.lru_cache(maxsize=64)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx


def _mask_box(mask: np.ndarray, fallback: Box) -> Box:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:  # a shape thinner than the pixel grid at tiny sizes
        return fallback
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _union(boxes: list[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            max(b[2] for b in boxes), max(b[3] for b in boxes))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background and the grating's two colours; the grating's are apart in every channel,
    so that the pattern survives conversion to grayscale."""
    background = rng.uniform(0, 255, 3).astype(np.float32)
    dark = rng.uniform(0, 110, 3).astype(np.float32)
    light = rng.uniform(145, 255, 3).astype(np.float32)
    return background, dark, light


def _render(cls: int, rng: np.random.Generator, height: int, width: int
            ) -> tuple[np.ndarray, list[Box]]:
    """The image and one box per part of the shape."""
    spec = pattern(cls)
    radius = rng.uniform(*_SCALE_RANGE) * min(height, width) / 2
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    yy, xx = _grid(height, width)
    u, v = (xx - cx) / radius, (yy - cy) / radius
    parts = _SHAPE_MASKS[spec.shape](u, v)
    mask = functools.reduce(np.logical_or, parts)

    theta = math.radians(spec.orientation + rng.uniform(-_ORIENTATION_JITTER, _ORIENTATION_JITTER))
    # u spans 2 units per diameter, so pi * frequency * u makes `frequency` cycles per diameter.
    phase = np.pi * spec.frequency * (u * math.cos(theta) + v * math.sin(theta))
    grating = 0.5 + 0.5 * np.sin(phase + rng.uniform(0, 2 * np.pi))

    background, dark, light = _colours(rng)
    ramp = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) * (60.0 / max(height, width))
    image = np.where(mask[..., None], dark + (light - dark) * grating[..., None],
                     background + ramp[..., None])
    # Uniform noise (std 3..12) costs a fifth of Gaussian noise and looks the same in a JPEG.
    image += (rng.random((height, width, 3), dtype=np.float32) - 0.5) * rng.uniform(10, 42)

    square = (max(0, int(cx - radius)), max(0, int(cy - radius)),
              min(width - 1, int(cx + radius)), min(height - 1, int(cy + radius)))
    boxes = [_mask_box(part, square) for part in parts]
    return np.clip(image, 0, 255).astype(np.uint8), boxes


def _height_width(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def render(cls: int, rng: np.random.Generator, size: int | tuple[int, int]
           ) -> tuple[np.ndarray, Box]:
    """One image of class ``cls`` (HxWx3 uint8; ``size`` is a side or (height, width)) and the
    bounding box of its shape."""
    image, boxes = _render(cls, rng, *_height_width(size))
    return image, _union(boxes)


# --------------------------------------------------------------------------- encoding


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, fmt, quality=_JPEG_QUALITY)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def _encode(pixels: np.ndarray, kind: str | None, fmt: str) -> bytes:
    """File contents for an image of the given quirk kind (None: a plain RGB image in ``fmt``)."""
    image = Image.fromarray(pixels)
    if kind is None:
        return _save(image, fmt)
    if kind == "grayscale":
        return _save(image.convert("L"), fmt)
    if kind == "cmyk":
        return _save(image.convert("CMYK"), "JPEG")
    if kind == "png":
        return _save(image, "PNG")
    if kind == "truncated":
        jpeg = _save(image, "JPEG")
        return jpeg[: len(jpeg) // 2]
    if kind == "empty":
        return b""
    if kind == "not_an_image":
        return _NOT_AN_IMAGE
    raise ValueError(f"unknown quirk kind {kind!r}; allowed: {', '.join(QUIRK_KINDS)}")


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Item:
    """One file to write: its class's pattern and its quirk kind (None: a plain image)."""

    cls: int
    kind: str | None = None


def _with_grayscale(items: list[_Item], fraction: float, rng: np.random.Generator) -> list[_Item]:
    """Turns ceil(fraction * n) plain items grayscale, so even tiny sets contain one."""
    plain = [i for i, item in enumerate(items) if item.kind is None]
    count = min(len(plain), math.ceil(fraction * len(plain)))
    chosen = set(rng.choice(plain, size=count, replace=False).tolist()) if count else set()
    return [_Item(item.cls, "grayscale") if i in chosen else item for i, item in enumerate(items)]


def _train_plan(job: _Job) -> list[list[_Item]]:
    """Per class: the plain images, then any quirk files, which continue the numbering."""
    per_class = job.train_per_class
    flat = _with_grayscale([_Item(c) for c in range(job.classes) for _ in range(per_class)],
                           job.grayscale_fraction, job.rng)
    plan = [flat[c * per_class:(c + 1) * per_class] for c in range(job.classes)]
    if job.quirks:
        owners = job.rng.permutation(job.classes)
        for i, kind in enumerate(_TRAIN_QUIRKS):
            owner = int(owners[i % job.classes])
            plan[owner].append(_Item(owner, kind))
    return plan


def _val_plan(job: _Job) -> list[_Item]:
    """All classes interleaved in random order, like the real validation sets."""
    items = [_Item(c) for c in range(job.classes) for _ in range(job.val_per_class)]
    items = _with_grayscale(items, job.grayscale_fraction, job.rng)
    if job.quirks:
        items += [_Item(int(job.rng.integers(job.classes)), kind) for kind in _VAL_QUIRKS]
    return [items[i] for i in job.rng.permutation(len(items))]


def _test_plan(job: _Job) -> list[_Item]:
    items = [_Item(int(c)) for c in job.rng.integers(job.classes, size=job.test_count)]
    return _with_grayscale(items, job.grayscale_fraction, job.rng)


def _imagenet_numbers(rng: np.random.Generator, count: int) -> list[int]:
    """Unique, non-contiguous file numbers, like n01440764_10026.JPEG in the real set."""
    population = max(99_999, 2 * count)
    return sorted((rng.choice(population, size=count, replace=False) + 1).tolist())


# --------------------------------------------------------------------------- output


class _Sink(Protocol):
    def write(self, relative: str, data: bytes) -> None: ...


class _DirSink:
    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, relative: str, data: bytes) -> None:
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


class _ZipSink:
    """Writes members under the zip's top folder, with directory entries like the real zip."""

    def __init__(self, archive: zipfile.ZipFile, top: str) -> None:
        self.archive, self.top = archive, top
        self.folders: set[str] = set()

    def _folder(self, name: str) -> None:
        if name in self.folders:
            return
        parent = name.rstrip("/").rpartition("/")[0]
        if parent:
            self._folder(parent + "/")
        info = zipfile.ZipInfo(name, _ZIP_DATE)
        info.external_attr = (0o40755 << 16) | 0x10  # a directory, as unzip expects
        self.archive.writestr(info, b"")
        self.folders.add(name)

    def write(self, relative: str, data: bytes) -> None:
        name = self.top + relative
        self._folder(name.rpartition("/")[0] + "/")
        info = zipfile.ZipInfo(name, _ZIP_DATE)
        info.external_attr = 0o100644 << 16
        # JPEGs do not deflate; the text files do.
        info.compress_type = zipfile.ZIP_STORED if name.endswith(".JPEG") else zipfile.ZIP_DEFLATED
        self.archive.writestr(info, data)


@dataclass
class _Job:
    """Everything one generation run shares; the rng is consumed in a fixed order."""

    root: Path
    sink: _Sink
    rng: np.random.Generator
    bar: tqdm
    classes: int
    train_per_class: int
    val_per_class: int
    test_count: int
    size: int
    quirks: bool
    grayscale_fraction: float
    varied_sizes: bool
    wnids: list[str]  # by class index
    names: list[str]  # by class index
    truth: SynthTruth

    def image_size(self) -> tuple[int, int]:
        if not self.varied_sizes:
            return self.size, self.size
        low, high = int(self.size * 0.75), int(self.size * 1.5)
        height, width = self.rng.integers(low, high + 1, size=2)
        return int(height), int(width)

    def encode(self, item: _Item, fmt: str = "JPEG") -> tuple[bytes, list[Box]]:
        """File contents and the shape's part boxes for one planned item."""
        pixels, boxes = _render(item.cls, self.rng, *self.image_size())
        self.bar.update()
        return _encode(pixels, item.kind, fmt), boxes

    def record(self, split: str, key: str, label: str | None, item: _Item) -> None:
        self.truth.splits[split][key] = label
        if item.kind is not None:
            self.truth.quirks[key] = item.kind

    def by_ilsvrc_id(self) -> list[int]:
        """Class indices in ILSVRC2012_ID order."""
        ids = self.truth.ilsvrc_ids
        return sorted(range(self.classes), key=lambda c: ids[self.wnids[c]])


def _box_text(box: Box, separator: str) -> str:
    return separator.join(str(value) for value in box)


# --------------------------------------------------------------------------- layouts


def _write_tinyimagenet(job: _Job) -> None:
    """The tiny-imagenet-200 layout: wnids.txt, words.txt, train/, val/, test/."""
    listed = _unsorted_shuffle(job.rng, job.wnids[:job.classes])  # like the real wnids.txt
    job.sink.write("wnids.txt", "".join(f"{wnid}\n" for wnid in listed).encode())
    job.sink.write("words.txt", _words_txt(job).encode())

    for cls, items in enumerate(_train_plan(job)):
        wnid, lines = job.wnids[cls], []
        for i, item in enumerate(items):
            data, parts = job.encode(item)
            key, box = f"{wnid}_{i}", _union(parts)
            job.sink.write(f"train/{wnid}/images/{key}.JPEG", data)
            lines.append(f"{key}.JPEG\t{_box_text(box, _TAB)}\n")
            job.record("train", key, wnid, item)
            job.truth.boxes[key] = [box]
        job.sink.write(f"train/{wnid}/{wnid}_boxes.txt", "".join(lines).encode())

    lines = []
    for j, item in enumerate(_val_plan(job)):
        data, parts = job.encode(item)
        key, wnid, box = f"val_{j}", job.wnids[item.cls], _union(parts)
        job.sink.write(f"val/images/{key}.JPEG", data)
        lines.append(f"{key}.JPEG\t{wnid}\t{_box_text(box, _TAB)}\n")
        job.record("val", key, wnid, item)
        job.truth.boxes[key] = [box]
    job.sink.write("val/val_annotations.txt", "".join(lines).encode())

    for k, item in enumerate(_test_plan(job)):
        data, _ = job.encode(item)
        job.sink.write(f"test/images/test_{k}.JPEG", data)
        job.record("test", f"test_{k}", None, item)


def _words_txt(job: _Job) -> str:
    """The classes plus distractor synsets, sorted by wnid like the real 82k-line file."""
    extra = job.wnids[job.classes:job.classes + _DISTRACTOR_SYNSETS]
    rows = list(zip(job.wnids, job.names)) + [
        (wnid, f"unused synset {i}, distractor") for i, wnid in enumerate(extra)]
    return "".join(f"{wnid}\t{name}\n" for wnid, name in sorted(rows))


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
    archive.addfile(info, io.BytesIO(data))


def _write_imagenet(job: _Job) -> None:
    """The official ILSVRC2012 download: train tar of per-class tars, flat val tar, devkit."""
    job.root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(job.root / "ILSVRC2012_img_train.tar", "w") as outer:
        for cls, items in enumerate(_train_plan(job)):
            wnid, inner_bytes = job.wnids[cls], io.BytesIO()
            with tarfile.open(fileobj=inner_bytes, mode="w") as inner:
                for number, item in zip(_imagenet_numbers(job.rng, len(items)), items):
                    key = f"{wnid}_{number}"
                    _tar_add(inner, f"{key}.JPEG", job.encode(item)[0])
                    job.record("train", key, wnid, item)
            _tar_add(outer, f"{wnid}.tar", inner_bytes.getvalue())

    ground_truth = []
    with tarfile.open(job.root / "ILSVRC2012_img_val.tar", "w") as val:
        for j, item in enumerate(_val_plan(job), start=1):
            key, wnid = f"ILSVRC2012_val_{j:08d}", job.wnids[item.cls]
            _tar_add(val, f"{key}.JPEG", job.encode(item)[0])
            job.record("val", key, wnid, item)
            ground_truth.append(f"{job.truth.ilsvrc_ids[wnid]}\n")

    _write_devkit(job, "".join(ground_truth))


def _meta_mat(job: _Job) -> bytes:
    """meta.mat as in the real devkit: an N x 1 struct array ``synsets``, leaves first."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    order = job.by_ilsvrc_id()
    parents = job.wnids[job.classes + _DISTRACTOR_SYNSETS:]
    synsets = np.zeros((len(order) + len(parents), 1), dtype=[(f, object) for f in fields])
    train_counts = Counter(job.truth.splits["train"].values())
    for row, cls in enumerate(order):
        wnid = job.wnids[cls]
        gloss = f"a {_SHAPES[pattern(cls).shape]} filled with an oriented grating"
        synsets[row, 0] = (row + 1, wnid, job.names[cls], gloss, 0,
                           np.zeros((1, 0), dtype=np.uint16), 0, train_counts[wnid])
    # Non-leaf synsets (not classes) split the leaves between them, like the real hierarchy.
    for i, wnid in enumerate(parents):
        children = np.arange(1, len(order) + 1)[i::len(parents)].astype(np.uint16)
        synsets[len(order) + i, 0] = (len(order) + i + 1, wnid, f"pattern group {i}, group",
                                      "a group of patterns", len(children), children[None, :], 1, 0)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"synsets": synsets})
    # savemat stamps "Created on: <now>" into the 116-byte text header; a fixed text keeps
    # the devkit byte-identical across runs.
    return _MAT_HEADER + buffer.getvalue()[len(_MAT_HEADER):]


def _write_devkit(job: _Job, ground_truth: str) -> None:
    folder = "ILSVRC2012_devkit_t12/data/"
    # mtime=0 in the gzip header keeps the archive byte-identical across runs.
    with open(job.root / "ILSVRC2012_devkit_t12.tar.gz", "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w") as devkit:
        _tar_add(devkit, folder + "meta.mat", _meta_mat(job))
        _tar_add(devkit, folder + "ILSVRC2012_validation_ground_truth.txt", ground_truth.encode())


def _write_imagenet_kaggle(job: _Job) -> None:
    """Kaggle's ImageNet Object Localization Challenge layout."""
    mapping = "".join(f"{job.wnids[c]} {job.names[c]}\n" for c in job.by_ilsvrc_id())
    job.sink.write("LOC_synset_mapping.txt", mapping.encode())

    train_rows = []
    for cls, items in enumerate(_train_plan(job)):
        wnid = job.wnids[cls]
        for number, item in zip(_imagenet_numbers(job.rng, len(items)), items):
            key = f"{wnid}_{number}"
            data, parts = job.encode(item)
            job.sink.write(f"{_KAGGLE_DATA}/train/{wnid}/{key}.JPEG", data)
            job.record("train", key, wnid, item)
            if job.rng.random() < _TRAIN_BOX_FRACTION:
                train_rows.append(_solution_row(job, key, wnid, parts))
    job.sink.write("LOC_train_solution.csv", _solution_csv(job, train_rows))

    val_rows = []
    for j, item in enumerate(_val_plan(job), start=1):
        key, wnid = f"ILSVRC2012_val_{j:08d}", job.wnids[item.cls]
        data, parts = job.encode(item)
        job.sink.write(f"{_KAGGLE_DATA}/val/{key}.JPEG", data)
        job.record("val", key, wnid, item)
        val_rows.append(_solution_row(job, key, wnid, parts))
    job.sink.write("LOC_val_solution.csv", _solution_csv(job, val_rows))

    for k, item in enumerate(_test_plan(job), start=1):
        key = f"ILSVRC2012_test_{k:08d}"
        job.sink.write(f"{_KAGGLE_DATA}/test/{key}.JPEG", job.encode(item)[0])
        job.record("test", key, None, item)


def _solution_row(job: _Job, key: str, wnid: str, parts: list[Box]) -> str:
    job.truth.boxes[key] = parts
    # Each box repeats the wnid and is followed by a space, hence the real file's trailing space.
    return f"{key}," + "".join(f"{wnid} {_box_text(box, ' ')} " for box in parts) + "\n"


def _solution_csv(job: _Job, rows: list[str]) -> bytes:
    shuffled = [rows[i] for i in job.rng.permutation(len(rows))]  # the real rows are unordered
    return ("ImageId,PredictionString\n" + "".join(shuffled)).encode()


def _write_imagefolder(job: _Job) -> None:
    """PATH/{train,val}/<class name>/<file>, with mixed extensions (.jpg, real .png, .JPEG)."""
    for split, plan in (("train", [i for items in _train_plan(job) for i in items]),
                        ("val", _val_plan(job))):
        for n, item in enumerate(plan):
            extension = _imagefolder_extension(n, item)
            data, _ = job.encode(item, "PNG" if extension == ".png" else "JPEG")
            key, folder = f"{split}_{n:06d}", job.wnids[item.cls]  # unique across splits
            job.sink.write(f"{split}/{folder}/{key}{extension}", data)
            job.record(split, key, folder, item)


def _imagefolder_extension(n: int, item: _Item) -> str:
    """Mostly .jpg, every tenth a real PNG and every tenth .JPEG; quirk files pose as .jpg."""
    if item.kind not in (None, "grayscale"):
        return ".jpg"
    return {3: ".png", 7: ".JPEG"}.get(n % 10, ".jpg")


LAYOUTS: dict[str, Callable[[_Job], None]] = {
    "tinyimagenet": _write_tinyimagenet,
    "imagenet": _write_imagenet,
    "imagenet-kaggle": _write_imagenet_kaggle,
    "imagefolder": _write_imagefolder,
}


# --------------------------------------------------------------------------- entry points


def _validate(path: Path, layout: str, classes: int, counts: dict[str, int | None], size: int,
              seed: int, zip_: bool, grayscale_fraction: float) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    if classes < 1:
        raise ValueError(f"classes must be >= 1, got {classes}")
    for name, count in counts.items():
        if count is not None and count < 0:
            raise ValueError(f"{name} must be >= 0, got {count}")
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= grayscale_fraction <= 1.0:
        raise ValueError(f"grayscale_fraction must be in [0, 1], got {grayscale_fraction}")
    if zip_ and layout != "tinyimagenet":
        raise ValueError(f"zip is only supported for layout 'tinyimagenet', not {layout!r}")
    if zip_ and path.suffix != ".zip":
        raise ValueError(f"with zip the output must end in .zip, got {str(path)!r}")
    if zip_ and path.exists():
        raise ValueError(f"output {str(path)!r} already exists; refusing to overwrite it")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"output {str(path)!r} exists and is not an empty directory")


def _unique_wnids(rng: np.random.Generator, count: int) -> list[str]:
    # Real WordNet offsets run from n00001740 to n15102894; stay in that range to look real.
    numbers = rng.choice(_WNID_RANGE[1] - _WNID_RANGE[0], size=count, replace=False)
    return [f"n{_WNID_RANGE[0] + number:08d}" for number in numbers]


def _names(classes: int) -> list[str]:
    """Human names; every third carries a synonym after ", " as real words.txt lines do."""
    return [pattern(c).name + (f", {_SHAPES[pattern(c).shape]} pattern {c}" if c % 3 == 1 else "")
            for c in range(classes)]


def _unsorted_shuffle(rng: np.random.Generator, values: list[str]) -> list[str]:
    """A random order that is never the sorted one (given two or more values): code relying on
    sorted order must fail on synthetic data as it would on the real files."""
    order = [values[i] for i in rng.permutation(len(values))]
    if len(order) > 1 and order == sorted(order):
        order[0], order[1] = order[1], order[0]
    return order


def _ilsvrc_ids(rng: np.random.Generator, wnids: list[str]) -> dict[str, int]:
    """IDs 1..C in an order that is deliberately not sorted-wnid order, as in the real devkit."""
    return {wnid: i for i, wnid in enumerate(_unsorted_shuffle(rng, wnids), start=1)}


@contextlib.contextmanager
def _open_sink(path: Path, zip_: bool) -> Iterator[_Sink]:
    if not zip_:
        yield _DirSink(path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        yield _ZipSink(archive, _ZIP_ROOT)


def _total_images(layout: str, classes: int, train_per_class: int, val_per_class: int,
                  test_count: int, quirks: bool) -> int:
    total = classes * (train_per_class + val_per_class)
    total += (len(_TRAIN_QUIRKS) + len(_VAL_QUIRKS)) if quirks else 0
    return total + (test_count if layout in _LAYOUTS_WITH_TEST else 0)


def generate(path: str, *, layout: str = "tinyimagenet", classes: int = 200,
             train_per_class: int = 500, val_per_class: int = 50, test_count: int | None = None,
             size: int = 64, seed: int = 0, quirks: bool = False, zip: bool = False,
             grayscale_fraction: float = 0.02) -> SynthTruth:
    """Writes a synthetic data set in ``layout`` at ``path`` and returns what it wrote.

    ``test_count`` (default: the validation count) applies to the layouts with a test split
    (tinyimagenet, imagenet-kaggle). ``size`` is the side of the square images, or the typical
    side of the varied, non-square images of the imagenet layouts.
    """
    target = Path(path)
    counts = {"train_per_class": train_per_class, "val_per_class": val_per_class,
              "test_count": test_count}
    _validate(target, layout, classes, counts, size, seed, zip, grayscale_fraction)
    test_count = classes * val_per_class if test_count is None else test_count

    rng = np.random.default_rng(seed)
    wnids = _unique_wnids(rng, classes + _DISTRACTOR_SYNSETS + _NON_LEAF_SYNSETS)
    names = _names(classes)
    ilsvrc_ids = _ilsvrc_ids(rng, wnids[:classes])
    if layout == "imagefolder":  # no wnids there: classes are folders named after the classes
        wnids[:classes] = [name.replace(" ", "_") for name in names]
    splits = ("train", "val", "test") if layout in _LAYOUTS_WITH_TEST else ("train", "val")
    truth = SynthTruth(layout, str(target), sorted(wnids[:classes]),
                       {wnids[c]: names[c] for c in range(classes)}, {s: {} for s in splits},
                       ilsvrc_ids=ilsvrc_ids if layout.startswith("imagenet") else {})
    total = _total_images(layout, classes, train_per_class, val_per_class, test_count, quirks)
    with tqdm(total=total, unit="img", disable=None) as bar, _open_sink(target, zip) as sink:
        LAYOUTS[layout](_Job(target, sink, rng, bar, classes, train_per_class, val_per_class,
                             test_count, size, quirks, grayscale_fraction,
                             layout.startswith("imagenet"), wnids, names, truth))
    return truth


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.synth",
        description="Write a learnable synthetic image-classification data set in the on-disk "
                    "layout of a real download (the real data sets cannot be downloaded here).")
    parser.add_argument("--output", required=True,
                        help="where to write: the data set root (must not exist or be empty); "
                             "for imagenet the directory receiving the three archives; with --zip "
                             "the .zip file to create")
    parser.add_argument("--layout", default="tinyimagenet",
                        help=f"on-disk layout to imitate, one of: {', '.join(LAYOUTS)} "
                             "(default: %(default)s)")
    parser.add_argument("--classes", type=int, default=200,
                        help="number of classes (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=500,
                        help="training images per class (default: %(default)s)")
    parser.add_argument("--val-per-class", type=int, default=50,
                        help="validation images per class (default: %(default)s)")
    parser.add_argument("--test-count", type=int, default=None,
                        help="unlabelled test images, for the layouts with a test split "
                             "(tinyimagenet, imagenet-kaggle); default: the validation count")
    parser.add_argument("--size", type=int, default=64,
                        help="image side in pixels; the imagenet layouts vary width and height "
                             "between 0.75x and 1.5x of it (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same seed writes byte-identical files "
                             "(default: %(default)s)")
    parser.add_argument("--quirks", action="store_true",
                        help="add dirty files like real downloads have: a CMYK JPEG, a PNG named "
                             "like a JPEG, a truncated JPEG, an empty file and an HTML error page "
                             "named like an image")
    parser.add_argument("--zip", action="store_true",
                        help="write a tiny-imagenet-200.zip-style archive instead of a directory "
                             "(tinyimagenet only)")
    parser.add_argument("--grayscale-fraction", type=float, default=0.02,
                        help="fraction of images saved as 1-channel grayscale JPEGs "
                             "(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        truth = generate(args.output, layout=args.layout, classes=args.classes,
                         train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                         test_count=args.test_count, size=args.size, seed=args.seed,
                         quirks=args.quirks, zip=args.zip,
                         grayscale_fraction=args.grayscale_fraction)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {len(keys)}" for split, keys in truth.splits.items())
    print(f"wrote {truth.layout} data set, {len(truth.wnids)} classes ({counts} images) "
          f"to {truth.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
