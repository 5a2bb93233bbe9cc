"""`python -m trainer.evaluate --model RUN --data URL`: top-1 and top-5 of a saved model on a split.

The images are preprocessed as the run's own validation was (its config.json: image size and
eval transform), counted by the trainer's own exact evaluation (trainer.evaluation), so on the
run's dataset the val split gives exactly the val accuracy the run reported for its best epoch.
The dataset must have the run's classes, in the same order.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from ingest import cli
from ingest.errors import EXIT_USAGE, IngestError, InputError

if TYPE_CHECKING:
    from .data import Dataset
    from .saved import Run

log = logging.getLogger("trainer.evaluate")


class UsageError(IngestError):
    """A flag argparse accepted that does not fit the dataset (a split it lacks): exit 2 like argparse."""

    exit_code = EXIT_USAGE


def evaluate(run: str, data: str, split: str = "val", batch_size: int | None = None,
             storage_options: dict[str, Any] | None = None) -> dict:
    """{split, samples, samples_expected, exact, top1, top5} of the run's model on the split.
    `batch_size` defaults to the run's."""
    from . import evaluation, saved
    from .shards import StorageGone

    trained = saved.open_run(run, storage_options)
    dataset = open_dataset(data, trained, batch_size or trained.config.batch_size, storage_options)
    check_split(dataset, split)
    check_classes(trained, dataset.manifest["classes"], data)
    step = evaluation.eval_step(trained.load_model())
    try:
        with dataset.reader_errors():
            counts = evaluation.count(step, dataset.evaluate(split))
    except StorageGone as exc:
        raise InputError(f"reading the {split} split of {data}: {exc}") from None
    result = evaluation.accuracy(counts.numpy(), dataset.samples(split))
    if result.seen == 0:
        raise InputError(f"none of the {split} split's {result.expected} samples in {data} could be read "
                         f"(see the warnings above): nothing evaluated")
    if result.non_finite:
        log.warning("warning: the model's outputs on %d of the %d samples are NaN or infinite (a diverged model)",
                    result.non_finite, result.seen)
    if not result.exact:
        log.warning("warning: top-1 and top-5 are over %d of the %s split's %d samples (the rest could not be "
                    "read): not exact", result.seen, split, result.expected)
    return {"split": split, "samples": result.seen, "samples_expected": result.expected, "exact": result.exact,
            "top1": result.top1, "top5": result.top5}


def open_dataset(data: str, trained: Run, batch_size: int, storage_options: dict[str, Any] | None) -> Dataset:
    """The dataset, read with the run's preprocessing (its image size and eval transform)."""
    from .data import Dataset, InputConfig

    inputs = InputConfig(data=data, image_size=trained.config.image_size, batch_size=batch_size,
                         augment=trained.config.augment, storage_options=dict(storage_options or {}))
    try:
        return Dataset(inputs)
    except (ImportError, ValueError) as exc:   # an unknown protocol, a storage library not installed
        raise InputError(f"cannot open the dataset {data}: {' '.join(str(exc).split())}") from None


def check_split(dataset: Dataset, split: str) -> None:
    splits = dataset.manifest["splits"]
    if split not in splits:
        raise UsageError(f"--split {split!r}: not in the dataset (it has {', '.join(splits)})")
    if not splits[split].get("labelled", True):
        raise UsageError(f"--split {split}: the dataset's {split} images have no labels, so nothing to score "
                         f"(labelled splits: {', '.join(s for s in splits if splits[s].get('labelled', True))})")


def check_classes(trained: Run, classes: list[dict], data: str) -> None:
    """The dataset's classes must be the run's, in the same order: labels are indices into them."""
    ours, theirs = [c.get("wnid") for c in trained.classes], [c.get("wnid") for c in classes]
    where = f"{trained.where('classes.json')} vs {data}'s manifest"
    if len(ours) != len(theirs):
        raise InputError(f"the run has {len(ours)} classes, the dataset {len(theirs)} ({where}): not the classes "
                         f"the model was trained on")
    for index, (mine, other) in enumerate(zip(ours, theirs)):
        if mine != other:
            raise InputError(f"class {index} is {mine} in the run but {other} in the dataset ({where}): not the "
                             f"classes the model was trained on, or not in the same order")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trainer.train --output (path or URL holding model.keras, "
                                                       "classes.json and config.json)")
    parser.add_argument("--data", required=True, help="dataset URL (ingest.shard's --output) with the run's classes")
    parser.add_argument("--split", default="val", help="labelled split to evaluate (default val)")
    parser.add_argument("--batch-size", type=cli.positive, help="images per batch (default: the run's)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for --model and --data, repeatable (e.g. "
                             "endpoint_url=http://127.0.0.1:9000); credentials come from the environment")
    parser.add_argument("--log-level", default="WARNING", choices=cli.LOG_LEVELS, help="logging level (default "
                                                                                        "WARNING)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ingest.storage import parse_storage_options

    args, options = cli.parse(build_parser(), argv, lambda a: parse_storage_options(a.storage_option))

    def body() -> None:
        from .quiet import import_tensorflow

        import_tensorflow()
        logging.getLogger("trainer").setLevel(args.log_level)
        print(json.dumps(evaluate(args.model, args.data, args.split, args.batch_size, options)))

    return cli.run_main(body, args.log_level, kept="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
