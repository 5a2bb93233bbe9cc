"""Registry of input layouts and `--source auto` detection."""
from __future__ import annotations

import fsspec

from ..errors import InputError
from ..storage import Location, display, storage_call
from . import imagefolder, imagenet, imagenet_kaggle, tinyimagenet
from .base import ClassInfo, Problem, Sample, Scan, SourceType, StarMap, serial_starmap

# Most specific first: an imagefolder tree would also match the others' folders.
SOURCES: dict[str, SourceType] = {
    s.name: s for s in (tinyimagenet.SOURCE, imagenet.SOURCE, imagenet_kaggle.SOURCE, imagefolder.SOURCE)
}
# `--source imagenet` accepts both ways ImageNet is downloaded.
ALIASES = {"auto": tuple(SOURCES), "imagenet": ("imagenet", "imagenet-kaggle")}
CHOICES = ("auto", *SOURCES)

__all__ = ["SOURCES", "CHOICES", "scan_input", "serial_starmap", "ClassInfo", "Problem", "Sample", "Scan", "StarMap"]


def detect(fs: fsspec.AbstractFileSystem, root: str, source: str) -> tuple[SourceType, str]:
    """The first layout of `source`'s candidates found at `root`, and the dataset root."""
    if source not in CHOICES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(CHOICES)}")
    candidates = [SOURCES[name] for name in ALIASES.get(source, (source,))]
    for candidate in candidates:
        found = candidate.find_root(fs, root)
        if found is not None:
            return candidate, found
    looked = "; ".join(c.looks_for for c in candidates)
    raise InputError(f"{display(fs, root) or root}: no {source if source != 'auto' else 'known'} "
                     f"dataset layout found (looked for {looked})")


def scan_input(location: Location, source: str, splits: tuple[str, ...],
               starmap: StarMap = serial_starmap) -> Scan:
    """List the input: its classes and the samples of the requested splits."""
    fs, root = location.open()
    with storage_call(fs, root, "list", refused=InputError):
        kind, found = detect(fs, root, source)
        unknown = [s for s in splits if kind.splits is not None and s not in kind.splits]
        if unknown:
            raise InputError(f"{kind.name} has no split {', '.join(unknown)} (it has: {', '.join(kind.splits)})")
        try:
            return kind.scan(fs, found, splits, starmap)
        except FileNotFoundError as exc:
            raise InputError(f"{exc.filename or exc}: missing ({kind.name} layout)") from None
