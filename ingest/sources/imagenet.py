"""ILSVRC2012 as officially downloaded: three archives in one directory.

    ILSVRC2012_img_train.tar      a tar of 1000 per-class tars <wnid>.tar of <wnid>_<n>.JPEG
    ILSVRC2012_img_val.tar        a flat tar of ILSVRC2012_val_<8 digits>.JPEG
    ILSVRC2012_devkit_t12.tar.gz  data/meta.mat (ILSVRC2012_ID -> wnid, names) and
                                  data/ILSVRC2012_validation_ground_truth.txt (ID per val image)

Nothing is extracted: tar members are stored uncompressed, so every image is a byte range of
the 140 GB train tar, found by walking headers (seeking over data) and read later in place.
ILSVRC2012_IDs are not in sorted-wnid order; labels always go through the wnid.
Members that are links, devices, named with an absolute path or '..', or not named in UTF-8
are never used; each is listed as a problem. A class archive that is not a readable tar keeps
the images before the damage and lists the rest as one problem.
"""
from __future__ import annotations

import io
import re
import tarfile

import fsspec

from ..errors import InputError
from ..reader import RangeFile
from ..storage import display
from .base import (Problem, Sample, Scan, SourceType, StarMap, class_table, is_text, join, key_from_name, printable,
                   serial_starmap)

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
                if not member.name.endswith(suffix):
                    continue
                problem = _member_problem(member)
                if problem:   # the class table must come from exactly the file the devkit ships
                    raise tarfile.TarError(f"member {printable(member.name)}: {problem[1]}")
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
    """The outer train tar's headers are walked here (one small read per class archive); the
    class archives and the val tar are then walked in parallel through `starmap`."""
    devkit_path = join(root, DEVKIT)
    devkit = Devkit(fs, devkit_path) if fs.isfile(devkit_path) else None
    if "val" in splits and devkit is None:
        raise InputError(f"{display(fs, devkit_path)}: missing (the val labels come from it)")
    result = Scan("imagenet", [], {})
    train_path, val_path = join(root, TRAIN_TAR), join(root, VAL_TAR)
    archives = _class_archives(fs, train_path, result.problems) if "train" in splits else []
    tasks = [(fs, val_path, 0, _size(fs, val_path), "val", VAL_TAR)] if "val" in splits else []
    tasks += [(fs, train_path, start, end, "train", f"{TRAIN_TAR}/{printable(name)}") for name, start, end in archives]
    walks = starmap(walk_tar, tasks)
    val_walk = walks.pop(0) if "val" in splits else None
    train = {}
    for (name, _, _), (images, problems, error) in zip(archives, walks):
        result.problems += problems
        if error:
            result.problems.append(Problem("train", f"{TRAIN_TAR}/{printable(name)}", "unreadable",
                                           f"not a readable tar after {len(images)} images ({error}); "
                                           "the rest is skipped"))
        train[name.rsplit("/", 1)[-1].removesuffix(".tar")] = images
    if devkit is not None:
        wnids, names = list(devkit.id_to_wnid.values()), devkit.names
    else:
        wnids, names = sorted(train), {}
    result.classes, index = class_table(wnids, names)
    if "train" in splits:
        result.splits["train"] = _label_train(train, index, train_path)
    if val_walk is not None:
        result.splits["val"] = _label_val(val_walk, val_path, display(fs, val_path), devkit, index, result.problems)
    return result


def _size(fs, path: str) -> int:
    """The size of an archive that must be there."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        info = {"type": None}
    if info["type"] != "file":
        raise InputError(f"{display(fs, path)}: missing")
    return int(info["size"])


def _member_problem(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(reason, detail) when a tar member must not be used, None for a regular file."""
    name = member.name
    if not is_text(name):
        return "bad_name", "member name is not valid UTF-8"
    if name.startswith("/") or ".." in name.split("/"):
        return "unsafe_path", "member name is an absolute path or has '..'"
    if not member.isfile():
        return "not_a_file", "tar member is a link or device, which is never followed"
    return None


def _members(archive: tarfile.TarFile, split: str, prefix: str, problems: list[Problem]):
    """The regular file members of a tar; the others are listed as problems (directories aside)."""
    for member in archive:
        problem = None if member.isdir() else _member_problem(member)
        if problem:
            problems.append(Problem(split, f"{prefix}/{printable(member.name)}", *problem))
        elif not member.isdir():
            yield member


# The outer train tar holds one member per class, each ~140 MB: one small read per header.
_OUTER_CHUNK = 64 << 10


def _class_archives(fs, path: str, problems: list[Problem]) -> list[tuple[str, int, int]]:
    """(member name, start, end) of every class archive in the train tar of tars."""
    found = []
    with RangeFile(fs, path, 0, _size(fs, path), chunk=_OUTER_CHUNK) as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r:") as outer:
                for member in _members(outer, "train", TRAIN_TAR, problems):
                    found.append((member.name, member.offset_data, member.offset_data + member.size))
        except tarfile.TarError as exc:   # an incomplete download: better redone than half used
            raise InputError(f"{display(fs, path)}: not a readable tar ({exc}); an incomplete download?") from None
    return found


def walk_tar(fs, path: str, start: int, end: int, split: str,
             prefix: str) -> tuple[list[tuple[str, int, int]], list[Problem], str | None]:
    """The regular files of the tar at bytes [start, end) of `path`: ([(name, absolute offset,
    size)], problems, None), or with the error that ended the walk early as its last item."""
    images: list[tuple[str, int, int]] = []
    problems: list[Problem] = []
    with RangeFile(fs, path, start, end) as handle:
        try:
            with tarfile.open(fileobj=handle, mode="r:") as archive:
                for m in _members(archive, split, prefix, problems):
                    if start + m.offset_data + m.size > end:
                        raise tarfile.ReadError(f"member {printable(m.name)} runs past the end")
                    images.append((m.name, start + m.offset_data, m.size))
        except tarfile.TarError as exc:
            return images, problems, str(exc)
    return images, problems, None


def _label_train(train: dict, index: dict[str, int], path: str) -> list[Sample]:
    samples = []
    for wnid, members in train.items():
        if wnid not in index:
            raise InputError(f"{path}: class archive {wnid}.tar is not a class of the devkit")
        for name, offset, size in members:
            samples.append(Sample(key_from_name(name), index[wnid], f"{TRAIN_TAR}/{wnid}.tar/{name}",
                                  size, path, start=offset))
    return samples


def _label_val(walk: tuple, path: str, where: str, devkit: Devkit, index: dict[str, int],
               problems: list[Problem]) -> list[Sample]:
    members, walk_problems, error = walk
    if error:
        raise InputError(f"{where}: not a readable tar ({error}); an incomplete download?")
    problems += walk_problems
    samples = [s for s in (_val_sample(m, path, devkit, index, problems) for m in members) if s is not None]
    # A member listed as a problem while walking is not missing as well.
    sources = [s.source for s in samples] + [p.source for p in walk_problems]
    found = {_position(key_from_name(source)) for source in sources}
    for position in sorted(set(range(len(devkit.val_ids))) - found):
        problems.append(Problem("val", f"{VAL_TAR}/ILSVRC2012_val_{position + 1:08d}.JPEG", "missing_file",
                                f"line {position + 1} of the devkit ground truth; not in the val tar"))
    return samples


def _position(key: str) -> int:
    """ILSVRC2012_val_00000001 -> 0: the line of the devkit ground truth; -1 without a number."""
    number = _NUMBER.search(key)
    return int(number.group(1)) - 1 if number else -1


def _val_sample(member: tuple[str, int, int], path: str, devkit: Devkit, index: dict[str, int],
                problems: list[Problem]) -> Sample | None:
    name, offset, size = member
    key = key_from_name(name)
    source = f"{VAL_TAR}/{name}"
    position = _position(key)
    if not 0 <= position < len(devkit.val_ids):
        problems.append(Problem("val", source, "no_label", "no line in the devkit ground truth"))
        return None
    wnid = devkit.id_to_wnid.get(devkit.val_ids[position])
    if wnid is None:
        raise InputError(f"{devkit.path}: ground truth line {position + 1} names ILSVRC2012_ID "
                         f"{devkit.val_ids[position]}, which is not a class in data/meta.mat")
    return Sample(key, index[wnid], source, size, path, start=offset)


SOURCE = SourceType(
    name="imagenet",
    looks_for=f"imagenet: {', '.join(ARCHIVES)}",
    splits=SPLITS,
    find_root=find_root,
    scan=scan,
)
