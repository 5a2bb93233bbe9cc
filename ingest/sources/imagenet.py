"""ILSVRC2012 as officially downloaded: three archives in one directory.

    ILSVRC2012_img_train.tar      a tar of 1000 per-class tars <wnid>.tar of <wnid>_<n>.JPEG
    ILSVRC2012_img_val.tar        a flat tar of ILSVRC2012_val_<8 digits>.JPEG
    ILSVRC2012_devkit_t12.tar.gz  data/meta.mat (ILSVRC2012_ID -> wnid, names) and
                                  data/ILSVRC2012_validation_ground_truth.txt (ID per val image)

Nothing is extracted: tar members are stored uncompressed, so every image is a byte range of
the 140 GB train tar, found by walking headers (seeking over data) and read later in place.
ILSVRC2012_IDs are not in sorted-wnid order; labels always go through the wnid.
"""
from __future__ import annotations

import io
import re
import tarfile

import fsspec

from ..errors import InputError
from .base import Problem, Sample, Scan, SourceType, StarMap, class_table, join, key_from_name, serial_starmap

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
ARCHIVES = (TRAIN_TAR, VAL_TAR, DEVKIT)
SPLITS = ("train", "val")
_NUMBER = re.compile(r"(\d+)$")


def find_root(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """The directory holding the archives; the path of one of them also points there."""
    if fs.isfile(root):
        parent, _, name = root.rpartition("/")
        return parent if name in ARCHIVES else None
    return root if any(fs.isfile(join(root, name)) for name in ARCHIVES) else None


class Devkit:
    """Class table and val ground truth from the devkit archive."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str):
        self.path = path
        try:
            members = _read_members(fs.cat_file(path), ("data/meta.mat", "data/ILSVRC2012_validation_ground_truth.txt"))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InputError(f"{path}: not a readable devkit archive ({exc})") from None
        self.id_to_wnid, self.names = _parse_meta(path, members["data/meta.mat"])
        self.val_ids = [int(v) for v in members["data/ILSVRC2012_validation_ground_truth.txt"].split()]


def _read_members(blob: bytes, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    found = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as archive:
        for member in archive:
            for suffix in suffixes:
                if member.isfile() and member.name.endswith(suffix):
                    found[suffix] = archive.extractfile(member).read()
    missing = [s for s in suffixes if s not in found]
    if missing:
        raise tarfile.TarError(f"missing {', '.join(missing)}")
    return found


def _parse_meta(path: str, blob: bytes) -> tuple[dict[int, str], dict[str, str]]:
    import scipy.io  # 0.1 s to import; only this layout needs it

    try:
        synsets = scipy.io.loadmat(io.BytesIO(blob), squeeze_me=True)["synsets"]
        leaves = [s for s in synsets.ravel() if int(s["num_children"]) == 0]
        id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in leaves}
        names = {str(s["WNID"]): str(s["words"]) for s in leaves}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: data/meta.mat has no usable synsets table ({exc})") from None
    return id_to_wnid, names


def scan(fs: fsspec.AbstractFileSystem, root: str, splits: tuple[str, ...],
         starmap: StarMap = serial_starmap) -> Scan:
    """The tar walk is one sequential pass over headers, so `starmap` is not used."""
    devkit_path = join(root, DEVKIT)
    devkit = Devkit(fs, devkit_path) if fs.isfile(devkit_path) else None
    train = _list_train(fs, join(root, TRAIN_TAR)) if "train" in splits else None
    if devkit is not None:
        wnids, names = list(devkit.id_to_wnid.values()), devkit.names
    elif train is not None:
        wnids, names = sorted(train), {}
    else:
        raise InputError(f"{devkit_path}: missing (the val labels come from it)")
    classes, index = class_table(wnids, names)
    result = Scan("imagenet", classes, {})
    if train is not None:
        result.splits["train"] = _label_train(train, index, join(root, TRAIN_TAR))
    if "val" in splits:
        if devkit is None:
            raise InputError(f"{devkit_path}: missing (the val labels come from it)")
        result.splits["val"] = _list_val(fs, join(root, VAL_TAR), devkit, index, result.problems)
    return result


def _require(fs, path: str) -> None:
    if not fs.isfile(path):
        raise InputError(f"{path}: missing")


def _regular_members(archive: tarfile.TarFile):
    """Regular files only: links and directories in a tar are never followed."""
    return (m for m in archive if m.isfile())


def _list_train(fs, path: str) -> dict[str, list[tuple[str, int, int]]]:
    """wnid -> [(member name, absolute offset, size)] for every image in the tar of tars."""
    _require(fs, path)
    per_class: dict[str, list[tuple[str, int, int]]] = {}
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as outer:
        for member in _regular_members(outer):
            wnid = member.name.rsplit("/", 1)[-1].removesuffix(".tar")
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                per_class[wnid] = [(m.name, member.offset_data + m.offset_data, m.size)
                                   for m in _regular_members(inner)]
    return per_class


def _label_train(train: dict, index: dict[str, int], path: str) -> list[Sample]:
    samples = []
    for wnid, members in train.items():
        if wnid not in index:
            raise InputError(f"{path}: class archive {wnid}.tar is not a class of the devkit")
        for name, offset, size in members:
            samples.append(Sample(key_from_name(name), index[wnid], f"{TRAIN_TAR}/{wnid}.tar/{name}",
                                  size, path, start=offset))
    return samples


def _list_val(fs, path: str, devkit: Devkit, index: dict[str, int], problems: list[Problem]) -> list[Sample]:
    _require(fs, path)
    samples = []
    with fs.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as archive:
        for member in _regular_members(archive):
            key = key_from_name(member.name)
            source = f"{VAL_TAR}/{member.name}"
            number = _NUMBER.search(key)
            position = int(number.group(1)) - 1 if number else -1
            if not 0 <= position < len(devkit.val_ids):
                problems.append(Problem("val", source, "no_label", "no line in the devkit ground truth"))
                continue
            wnid = devkit.id_to_wnid.get(devkit.val_ids[position])
            if wnid is None:
                raise InputError(f"{devkit.path}: ground truth line {position + 1} names ILSVRC2012_ID "
                                 f"{devkit.val_ids[position]}, which is not a class in data/meta.mat")
            samples.append(Sample(key, index[wnid], source, member.size, path, start=member.offset_data))
    return samples


SOURCE = SourceType(
    name="imagenet",
    looks_for=f"imagenet: {', '.join(ARCHIVES)}",
    splits=SPLITS,
    find_root=find_root,
    scan=scan,
)
