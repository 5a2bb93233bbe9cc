"""ILSVRC2012 in Kaggle's "ImageNet Object Localization Challenge" layout.

    ILSVRC/Data/CLS-LOC/train/<wnid>/<wnid>_<n>.JPEG
    ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_<8 digits>.JPEG
    ILSVRC/Data/CLS-LOC/test/ILSVRC2012_test_<8 digits>.JPEG   unlabelled
    LOC_synset_mapping.txt    "<wnid> <names>" per line, in ILSVRC2012_ID order
    LOC_val_solution.csv      ImageId,PredictionString ("<wnid> x0 y0 x1 y1 ..." per box)
    LOC_train_solution.csv    the same for the train images that have boxes (optional)
"""
from __future__ import annotations

import csv
import io

import fsspec

from ..errors import InputError
from .base import (Problem, Sample, Scan, SourceType, StarMap, class_table, join, key_from_name,
                   list_dirs, list_files, parse_boxes, read_text, refused_problems, relative, serial_starmap,
                   text_lines)

DATA = "ILSVRC/Data/CLS-LOC"
MAPPING = "LOC_synset_mapping.txt"
SPLITS = ("train", "val", "test")


def find_root(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    if fs.isfile(root):
        return None
    for candidate in [root, *list_dirs(fs, root)]:
        if fs.isfile(join(candidate, MAPPING)) and fs.isdir(join(candidate, DATA)):
            return candidate
    return None


def scan(fs: fsspec.AbstractFileSystem, root: str, splits: tuple[str, ...],
         starmap: StarMap = serial_starmap) -> Scan:
    names = {}
    for line in text_lines(fs, join(root, MAPPING)):
        wnid, _, name = line.strip().partition(" ")
        names[wnid] = name.strip()
    classes, index = class_table(list(names), names)
    result = Scan("imagenet-kaggle", classes, {})
    for split in splits:
        if split == "train":
            result.splits[split] = _train(fs, root, index, starmap, result.problems)
        else:
            result.splits[split] = {"val": _val, "test": _test}[split](fs, root, index, result.problems)
    return result


def _solutions(fs, path: str, index: dict[str, int]) -> dict[str, tuple[int, tuple]]:
    """ImageId -> (class index, boxes). Every box of an image names the same wnid."""
    out = {}
    reader = csv.reader(io.StringIO(read_text(fs, path)))
    next(reader, None)
    for number, row in enumerate(reader, 2):
        if len(row) < 2 or not row[1].split():
            raise InputError(f"{path}: line {number}: expected ImageId,PredictionString, got {row!r}")
        fields = row[1].split()
        wnid = fields[0]
        if wnid not in index:
            raise InputError(f"{path}: line {number}: wnid {wnid} is not in {MAPPING}")
        # "<wnid> x0 y0 x1 y1 <wnid> x0 y0 x1 y1 ...": every box names the image's class.
        boxes = parse_boxes([v for i, v in enumerate(fields) if i % 5])
        out[row[0].strip()] = (index[wnid], boxes)
    return out


def _train(fs, root: str, index: dict[str, int], starmap: StarMap, problems: list[Problem]) -> list[Sample]:
    solution = join(root, "LOC_train_solution.csv")
    boxes = _solutions(fs, solution, index) if fs.isfile(solution) else {}
    tasks = []
    for directory in list_dirs(fs, join(root, DATA, "train")):
        wnid = directory.rsplit("/", 1)[-1]
        if wnid not in index:
            raise InputError(f"{directory}: class folder {wnid} is not in {MAPPING}")
        tasks.append((fs, root, directory, index[wnid]))
    per_class = starmap(_train_class, tasks)
    problems += [problem for _, refused in per_class for problem in refused]
    samples = [s for per_class_samples, _ in per_class for s in per_class_samples]
    return [s._replace(boxes=boxes[s.key][1]) if s.key in boxes else s for s in samples]


def _train_class(fs, root: str, directory: str, label: int) -> tuple[list[Sample], list[Problem]]:
    listing = list_files(fs, directory, root)
    samples = [Sample(key_from_name(path), label, relative(path, root), size, path)
               for path, size in listing.files.items()]
    return samples, refused_problems("train", listing, root)


def _val(fs, root: str, index: dict[str, int], problems: list[Problem]) -> list[Sample]:
    solution = join(root, "LOC_val_solution.csv")
    if not fs.isfile(solution):
        raise InputError(f"{solution}: missing (it holds the val labels)")
    labels = _solutions(fs, solution, index)
    listing = list_files(fs, join(root, DATA, "val"), root)
    problems += refused_problems("val", listing, root)
    # Files refused while listing are reported once, under that reason, not as missing too.
    samples, seen = [], {key_from_name(path) for path, _, _ in listing.refused}
    for path, size in listing.files.items():
        key = key_from_name(path)
        if key not in labels:
            problems.append(Problem("val", relative(path, root), "no_label", "not in LOC_val_solution.csv"))
            continue
        label, boxes = labels[key]
        samples.append(Sample(key, label, relative(path, root), size, path, boxes=boxes))
        seen.add(key)
    for key in sorted(set(labels) - seen):
        problems.append(Problem("val", f"{DATA}/val/{key}.JPEG", "missing_file", "listed in LOC_val_solution.csv"))
    return samples


def _test(fs, root: str, index: dict[str, int], problems: list[Problem]) -> list[Sample]:
    listing = list_files(fs, join(root, DATA, "test"), root)
    problems += refused_problems("test", listing, root)
    return [Sample(key_from_name(path), None, relative(path, root), size, path)
            for path, size in listing.files.items()]


SOURCE = SourceType(
    name="imagenet-kaggle",
    looks_for=f"imagenet-kaggle: {MAPPING} and {DATA}/",
    splits=SPLITS,
    find_root=find_root,
    scan=scan,
)
