"""TinyImageNet-200: `tiny-imagenet-200.zip` or its extracted directory.

    wnids.txt                      the 200 class wnids (not sorted)
    words.txt                      wnid<TAB>names for all of WordNet
    train/<wnid>/images/*.JPEG     + train/<wnid>/<wnid>_boxes.txt (file x0 y0 x1 y1)
    val/images/*.JPEG              + val/val_annotations.txt (file wnid x0 y0 x1 y1)
    test/images/*.JPEG             unlabelled
"""
from __future__ import annotations

import fsspec

from ..errors import InputError
from .base import (Problem, Sample, Scan, SourceType, StarMap, class_table, join, key_from_name,
                   list_dirs, list_files, parse_boxes, refused_problems, relative, serial_starmap, text_lines)

SPLITS = ("train", "val", "test")


def find_root(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """The directory holding wnids.txt: the input itself or one level down (the zip's top folder)."""
    if fs.isfile(root):
        return None
    for candidate in [root, *list_dirs(fs, root)]:
        if fs.isfile(join(candidate, "wnids.txt")) and fs.isdir(join(candidate, "train")):
            return candidate
    return None


def read_names(fs: fsspec.AbstractFileSystem, root: str, wanted: set[str]) -> dict[str, str]:
    path = join(root, "words.txt")
    if not fs.isfile(path):
        return {}
    names = {}
    for line in text_lines(fs, path):
        wnid, _, name = line.partition("\t")
        if wnid in wanted:
            names[wnid] = name.strip()
    return names


def scan(fs: fsspec.AbstractFileSystem, root: str, splits: tuple[str, ...],
         starmap: StarMap = serial_starmap) -> Scan:
    wnids = [line.strip() for line in text_lines(fs, join(root, "wnids.txt"))]
    classes, index = class_table(wnids, read_names(fs, root, set(wnids)))
    result = Scan("tinyimagenet", classes, {})
    for split in splits:
        if split == "train":
            per_class = starmap(_train_class, [(fs, root, wnid, label) for wnid, label in index.items()])
            result.splits[split] = [sample for samples, _ in per_class for sample in samples]
            result.problems += [problem for _, problems in per_class for problem in problems]
        else:
            result.splits[split] = {"val": _val, "test": _test}[split](fs, root, index, result.problems)
    return result


def _train_class(fs, root: str, wnid: str, label: int) -> tuple[list[Sample], list[Problem]]:
    images = join(root, "train", wnid, "images")
    if not fs.isdir(images):
        raise InputError(f"{images}: missing (wnids.txt lists {wnid})")
    boxes = _boxes(fs, join(root, "train", wnid, f"{wnid}_boxes.txt"))
    listing = list_files(fs, images, root)
    samples = []
    for path, size in listing.files.items():
        name = path.rsplit("/", 1)[-1]
        samples.append(Sample(key_from_name(name), label, relative(path, root), size, path,
                              boxes=boxes.get(name, ())))
    return samples, refused_problems("train", listing, root)


def _boxes(fs, path: str) -> dict[str, tuple]:
    if not fs.isfile(path):
        return {}
    out = {}
    for line in text_lines(fs, path):
        name, *fields = line.split()
        out[name] = parse_boxes(fields)
    return out


def _val(fs, root: str, index: dict[str, int], problems: list[Problem]) -> list[Sample]:
    annotations = join(root, "val", "val_annotations.txt")
    if not fs.isfile(annotations):
        raise InputError(f"{annotations}: missing (it holds the val labels)")
    listing = list_files(fs, join(root, "val", "images"), root)
    problems += refused_problems("val", listing, root)
    by_name = {path.rsplit("/", 1)[-1]: (path, size) for path, size in listing.files.items()}
    # Files refused while listing are reported once, under that reason, not as missing too.
    refused = {path.rsplit("/", 1)[-1] for path, _, _ in listing.refused}
    samples, labelled = [], set()
    for number, line in enumerate(text_lines(fs, annotations), 1):
        fields = line.split("\t")
        if len(fields) < 2:
            raise InputError(f"{annotations}: line {number}: expected FILE<TAB>WNID[<TAB>BOX], got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise InputError(f"{annotations}: line {number}: wnid {wnid} is not in wnids.txt")
        if name in refused:
            continue
        if name not in by_name:
            problems.append(Problem("val", f"val/images/{name}", "missing_file",
                                    f"listed in {relative(annotations, root)} line {number}"))
            continue
        path, size = by_name[name]
        samples.append(Sample(key_from_name(name), index[wnid], relative(path, root), size, path,
                              boxes=parse_boxes(fields[2:6])))
        labelled.add(name)
    for name in sorted(set(by_name) - labelled):
        problems.append(Problem("val", f"val/images/{name}", "no_label", "not in val_annotations.txt"))
    return samples


def _test(fs, root: str, index: dict[str, int], problems: list[Problem]) -> list[Sample]:
    listing = list_files(fs, join(root, "test", "images"), root)
    problems += refused_problems("test", listing, root)
    return [Sample(key_from_name(path), None, relative(path, root), size, path)
            for path, size in listing.files.items()]


SOURCE = SourceType(
    name="tinyimagenet",
    looks_for="tinyimagenet: wnids.txt and train/ (tiny-imagenet-200.zip or its folder)",
    splits=SPLITS,
    find_root=find_root,
    scan=scan,
)
