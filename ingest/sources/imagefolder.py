"""Any `<root>/<split>/<class>/<image>` tree (Keras and torchvision's ImageFolder).

Class index = position of the folder name in the sorted union of class folders over the
splits; the folder name is both the class id and its name. Keys are file stems; where two
classes of a split share a stem, every key of that split is prefixed with its class folder.
"""
from __future__ import annotations

from collections import Counter

import fsspec

from ..errors import InputError
from .base import (Problem, Sample, Scan, SourceType, StarMap, class_table, is_text, join, key_from_name, list_dirs,
                   list_files, printable, refused_problems, relative, safe_key, serial_starmap)


# Detection wants a split folder with one of these names, so that an arbitrary tree of
# folders is not taken for a dataset; `--source imagefolder` accepts any split names.
COMMON_SPLITS = ("train", "val", "validation", "test")


def find_root(fs: fsspec.AbstractFileSystem, root: str) -> str | None:
    """A folder with a split folder (train/, val/...) of class folders holding files."""
    if fs.isfile(root):
        return None
    for split in list_dirs(fs, root):
        if split.rsplit("/", 1)[-1] in COMMON_SPLITS and any(list_files(fs, c, root).files
                                                              for c in list_dirs(fs, split)):
            return root
    return None


def scan(fs: fsspec.AbstractFileSystem, root: str, splits: tuple[str, ...],
         starmap: StarMap = serial_starmap) -> Scan:
    available = [d.rsplit("/", 1)[-1] for d in list_dirs(fs, root)]
    missing = [s for s in splits if s not in available]
    if missing:
        raise InputError(f"{root}: no split folder {', '.join(missing)} (found: {', '.join(available) or 'none'})")
    folders = {s: list_dirs(fs, join(root, s)) for s in splits}
    wnids = [f.rsplit("/", 1)[-1] for per_split in folders.values() for f in per_split]
    for wnid in wnids:
        if not is_text(wnid):  # the folder name is the class name, stored as text everywhere
            raise InputError(f"{root}: class folder {printable(wnid)} is not named in UTF-8; rename it")
    classes, index = class_table(wnids, {})
    result = Scan("imagefolder", classes, {})
    for split, split_folders in folders.items():
        result.splits[split] = _split(fs, root, split, split_folders, index, starmap, result.problems)
    return result


def _split(fs, root: str, split: str, folders: list[str], index: dict[str, int], starmap: StarMap,
           problems: list[Problem]) -> list[Sample]:
    listings = starmap(list_files, [(fs, f, root) for f in folders])
    problems += [p for listing in listings for p in refused_problems(split, listing, root)]
    files = [(f.rsplit("/", 1)[-1], path, size) for f, listing in zip(folders, listings)
             for path, size in listing.files.items()]
    stems = Counter(key_from_name(path) for _, path, size in files)
    prefix = any(count > 1 for count in stems.values())
    return [
        Sample(f"{safe_key(cls)}_{key_from_name(path)}" if prefix else key_from_name(path), index[cls],
               relative(path, root), size, path)
        for cls, path, size in files
    ]


SOURCE = SourceType(
    name="imagefolder",
    looks_for=f"imagefolder: {'|'.join(COMMON_SPLITS)}/<class>/<image files>",
    splits=None,
    find_root=find_root,
    scan=scan,
)
