"""`python -m trainer.report URL [URL ...]`: the study's results table of trainer runs, best first.

Each URL is a run (a trainer.train --output: a directory holding config.json) or a prefix holding
runs, searched up to MAX_DEPTH levels below it and never inside a run (its checkpoints/ are not
runs). A finished run's row is its results.json; a run without one (still training, killed or
failed) is listed as unfinished with the best epoch of its last checkpoint so far.

Other code renders the same table with `report(urls)`, or `load` + `rows` + `render`;
trainer.report_plot draws the runs' val top-5 curves. No TensorFlow: the files are JSON and CSV.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ingest import cli
from ingest.errors import InputError, OutputError, UsageError
from ingest.storage import Location, display, read_json, storage_call, write_atomic

log = logging.getLogger("trainer.report")

CONFIG, RESULTS, LATEST, HISTORY = "config.json", "results.json", "checkpoints/latest.json", "history.csv"
# prefix/run, prefix/sweep/trial and prefix/study/sweep/trial: a sweep writes trial i to <output>/<trial>/.
MAX_DEPTH = 3
FINISHED, UNFINISHED, UNREADABLE = "finished", "unfinished", "unreadable"


@dataclass(frozen=True)
class Run:
    """One run as read: its row of the table and its epochs."""

    row: dict               # see rows(); the keys of --format json
    history: list[dict]     # one dict per epoch, history.csv's columns


def _summary_so_far(config: dict, checkpoint: dict | None) -> dict:
    """An unfinished run's results-like fields: its best epoch so far (trainer.records.results does the
    same at the end; it is not imported here because it needs TensorFlow)."""
    history = checkpoint["history"] if checkpoint else []
    summary = {"model": config["model"]["name"], "dropout": config["model"]["dropout"],
               "augmentation": config["augment"]["enabled"], "epochs_run": len(history),
               "stopped_early": bool(checkpoint and checkpoint["stopped_early"]),
               "workers": checkpoint.get("workers") if checkpoint else None, "best_epoch": None,
               "images_per_second": None}
    if not history:
        return summary | dict.fromkeys(("train_top1", "train_top5", "val_top1", "val_top5"))
    best = next(epoch for epoch in history if epoch["epoch"] == checkpoint["best_epoch"])
    rate = sum(epoch["images_per_second"] for epoch in history) / len(history)
    return summary | {key: best[key] for key in ("train_top1", "train_top5", "val_top1", "val_top5")} | {
        "best_epoch": best["epoch"], "images_per_second": rate * summary["workers"]}


# --- finding and reading runs ---------------------------------------------------------------------

def load(urls: list[str], storage_options: dict[str, Any] | None = None) -> list[Run]:
    """Every run at or below each URL, each once (a run reached by two URLs is listed under the first);
    a URL without any is an InputError (exit 3). A run whose files cannot be read as a trainer run's is
    a row with Status `unreadable` and a warning on stderr, not an error: the other runs are still listed."""
    runs, seen = [], set()
    for url in urls:
        fs, root = _open(url, storage_options or {})
        found = _find(fs, root)
        if not found:
            raise InputError(f"{url}: no trainer runs there (a run is a directory holding {CONFIG}; searched up to "
                             f"{MAX_DEPTH} levels down)")
        for run_id, path in found:
            if display(fs, path) not in seen:
                seen.add(display(fs, path))
                runs.append(_read_or_unreadable(fs, path, run_id))
    return runs


def readable(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.row["status"] != UNREADABLE]


def _read_or_unreadable(fs, path: str, run_id: str) -> Run:
    try:
        return _read_run(fs, path, run_id)
    except InputError as exc:
        log.warning("warning: %s", exc)
        return Run(dict.fromkeys(key for key in _row_keys()) | {"run_id": run_id, "status": UNREADABLE,
                                                                 "url": display(fs, path)}, [])


def _open(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    try:
        return Location(url, options).open()
    except (ImportError, ValueError) as exc:   # an unknown protocol, a storage library not installed
        raise InputError(f"cannot open {url}: {' '.join(str(exc).split())}") from None


def _find(fs, root: str) -> list[tuple[str, str]]:
    """(run id, path) of the runs at or below `root`: the root itself, or those under it by relative path."""
    fs.invalidate_cache(root)   # fsspec reuses filesystem instances: a sweep's listing from before is stale
    with storage_call(fs, root, "list", refused=InputError):
        paths = list(_walk(fs, root, 0))
    if paths == [root]:
        return [(root.rsplit("/", 1)[-1], root)]
    return [(path[len(root):].lstrip("/"), path) for path in paths]


def _walk(fs, path: str, depth: int) -> Iterator[str]:
    """The runs at or below `path`, one listing per directory visited: a run's own folders are never listed."""
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return
    names = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries}
    if names.get(CONFIG, {}).get("type") == "file":
        yield path
        return
    if depth < MAX_DEPTH:
        for name in sorted(names):
            if names[name]["type"] == "directory":
                yield from _walk(fs, names[name]["name"].rstrip("/"), depth + 1)


def _read_run(fs, path: str, run_id: str) -> Run:
    where = display(fs, path)
    config = _optional_json(fs, f"{path}/{CONFIG}")
    results, checkpoint = (_optional_json(fs, f"{path}/{name}") for name in (RESULTS, LATEST))
    try:
        if config is None:   # deleted between the listing and the read
            raise FileNotFoundError(f"{CONFIG} is gone")
        # A finished run rerun with more --epochs keeps its old results.json until it ends again.
        finished = results is not None and (checkpoint is None or
                                            len(checkpoint["history"]) <= results["epochs_run"])
        summary = results if finished else _summary_so_far(config, checkpoint)
        row = _row(summary, run_id, where, finished)
        history = (_history_csv(fs, path) if finished else None) or (checkpoint["history"] if checkpoint else [])
        val_exact = not finished or results.get("val_exact", True)
    except (KeyError, TypeError, ValueError, AttributeError, StopIteration, FileNotFoundError) as exc:
        # A file of another program or version, or JSON of another shape.
        raise InputError(f"{where}: not a trainer.train output ({type(exc).__name__}: {exc}; in its {CONFIG}, "
                         f"{RESULTS}, {LATEST} or {HISTORY})") from None
    if not val_exact:
        log.warning("warning: %s: its val accuracy is over %s of %s samples (some could not be read)", run_id,
                    results.get("val_samples_seen"), results.get("val_samples_expected"))
    return Run(row, history)


def _optional_json(fs, path: str) -> Any:
    try:
        return read_json(fs, path, invalid=InputError)
    except FileNotFoundError:
        return None


def _history_csv(fs, path: str) -> list[dict] | None:
    """history.csv's rows with numbers as numbers; None when there is none."""
    with storage_call(fs, f"{path}/{HISTORY}", "read", refused=InputError):
        try:
            text = fs.cat_file(f"{path}/{HISTORY}").decode()
        except FileNotFoundError:
            return None
    return [{key: int(value) if key == "epoch" else float(value) for key, value in row.items()}
            for row in csv.DictReader(io.StringIO(text))]


# --- the table ------------------------------------------------------------------------------------

def rows(runs: list[Run]) -> list[dict]:
    """The runs' rows, best val top-5 first (ties: val top-1, then run id); runs without an epoch yet last."""
    return [run.row for run in sort(runs)]


def sort(runs: list[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: (run.row["val_top5"] is None, -(run.row["val_top5"] or 0),
                                         -(run.row["val_top1"] or 0), run.row["run_id"]))


def _row(s: dict, run_id: str, where: str, finished: bool) -> dict:
    """A row's raw values from results.json's fields (`s`), under results.json's names where it has them."""
    gap = None if s["val_top5"] is None else s["train_top5"] - s["val_top5"]
    return {"run_id": run_id, "model": s["model"],
            "train_top1": s["train_top1"], "train_top5": s["train_top5"],
            "val_top1": s["val_top1"], "val_top5": s["val_top5"], "top5_gap": gap,
            "dropout": s["dropout"], "augmentation": s["augmentation"],
            # Keras' stopped_epoch: the last epoch run, counted from 0 as the logs and history.csv count.
            "early_stopping_epoch": s["epochs_run"] - 1 if s["stopped_early"] else None,
            "workers": s["workers"], "epochs_run": s["epochs_run"], "images_per_second": s["images_per_second"],
            "status": FINISHED if finished else UNFINISHED, "best_epoch": s["best_epoch"], "url": where}


def _row_keys() -> list[str]:
    return list(_row(dict.fromkeys(("model", "train_top1", "train_top5", "val_top1", "val_top5", "dropout",
                                    "augmentation", "epochs_run", "stopped_early", "workers",
                                    "images_per_second", "best_epoch")), "", "", False))


def _fixed(decimals: int) -> Callable[[float], str]:
    return lambda value: f"{value:.{decimals}f}"


def _rates(rates: list[float]) -> str:
    return ",".join(f"{rate:g}" for rate in rates) or "none"


@dataclass(frozen=True)
class Column:
    header: str
    key: str
    text: Callable[[Any], str] = str


# The study's columns in its order, the overfitting gap after the accuracies, then how the run went.
COLUMNS = (
    Column("RunID", "run_id"), Column("Model", "model"),
    Column("TrainAcc", "train_top1", _fixed(4)), Column("TrainTop5Acc", "train_top5", _fixed(4)),
    Column("ValAcc", "val_top1", _fixed(4)), Column("ValTop5Acc", "val_top5", _fixed(4)),
    Column("Top5Gap", "top5_gap", _fixed(4)),
    Column("Dropout", "dropout", _rates), Column("Data Augmentation", "augmentation", lambda on: "yes" if on else "no"),
    Column("Early Stopping Epoch", "early_stopping_epoch"),
    Column("Workers", "workers"), Column("Epochs", "epochs_run"), Column("Images/s", "images_per_second", _fixed(1)),
    Column("Status", "status"),
)
# What an unknown value looks like: an unfinished run's accuracies before its first epoch, the dropout
# rates of a run that kept its model's defaults and has no results yet, an early stop that did not happen.
MISSING = {"markdown": "-", "csv": ""}


def _cells(row: dict, missing: str) -> list[str]:
    return [missing if row[c.key] is None else c.text(row[c.key]) for c in COLUMNS]


def markdown(table: list[dict]) -> str:
    lines = [[c.header for c in COLUMNS], *(_cells(row, MISSING["markdown"]) for row in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    lines.insert(1, ["-" * width for width in widths])
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in lines)


def to_csv(table: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(c.header for c in COLUMNS)
    writer.writerows(_cells(row, MISSING["csv"]) for row in table)
    return text.getvalue().rstrip("\n")


def to_json(table: list[dict]) -> str:
    """Unrounded: a program reading it gets results.json's own numbers."""
    return json.dumps(table, indent=1)


FORMATS: dict[str, Callable[[list[dict]], str]] = {"markdown": markdown, "csv": to_csv, "json": to_json}


def render(table: list[dict], fmt: str = "markdown") -> str:
    return FORMATS[fmt](table)


def report(urls: list[str], fmt: str = "markdown", storage_options: dict[str, Any] | None = None) -> str:
    """The table of every run at or below `urls`, in `fmt` (a key of FORMATS)."""
    return render(rows(load(urls, storage_options)), fmt)


def plot_target(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The filesystem and path of a --plot URL; a directory (or a URL ending in /) is a UsageError (exit 2)."""
    if url.endswith(("/", os.sep)):
        raise UsageError(f"--plot {url}: a directory; give a file name (e.g. {url.rstrip('/' + os.sep)}/val-top5.png)")
    try:
        fs, path = Location(url, storage_options or {}).open()
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--plot {url}: cannot open it: {' '.join(str(exc).split())}") from None
    with storage_call(fs, path, "read", refused=OutputError):
        if fs.isdir(path):
            raise UsageError(f"--plot {url}: a directory; give a file name (e.g. {url}/val-top5.png)")
    return fs, path


def write_plot(runs: list[Run], url: str, storage_options: dict[str, Any] | None = None) -> None:
    """The runs' val top-5 curves as a PNG at `url` (a path or any fsspec URL; not a directory)."""
    from .report_plot import plot

    fs, path = plot_target(url, storage_options)
    write_atomic(fs, path, plot(runs))


# --- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", metavar="URL",
                        help=f"a trainer.train --output, or a prefix holding runs (searched up to {MAX_DEPTH} levels "
                             "down); path or fsspec URL")
    parser.add_argument("--format", choices=list(FORMATS), default="markdown",
                        help="markdown (default; 4 decimals), csv (4 decimals) or json (unrounded, every field)")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the runs' val top-5 per epoch into this PNG "
                                                           "(path or fsspec URL)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for the URLs and --plot, repeatable (e.g. "
                             "endpoint_url=http://127.0.0.1:9000); credentials come from the environment")
    parser.add_argument("--log-level", default="WARNING", choices=cli.LOG_LEVELS,
                        help="logging level (default WARNING)")
    return parser


def _print(text: str) -> None:
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # The reader stopped early (`| head`): not an error. Stdout to /dev/null, or the flush at exit fails again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    from ingest.storage import parse_storage_options

    args, options = cli.parse(build_parser(), argv, lambda a: parse_storage_options(a.storage_option))

    def body() -> None:
        logging.getLogger("trainer").setLevel(args.log_level)
        if args.plot:
            plot_target(args.plot, options)   # a bad --plot before any reading or printing
        runs = load(args.urls, options)
        _print(render(rows(runs), args.format))
        if args.plot:
            write_plot(runs, args.plot, options)
        if not readable(runs):
            raise InputError(f"none of the {len(runs)} runs found could be read (see the warnings above)")

    return cli.run_main(body, args.log_level, kept="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
