"""`python -m trainer.evaluate --model RUN --data URL`: top-1 and top-5 of a saved model on a split."""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from .augment import preset_for
from .data import Dataset, InputConfig
from .loop import correct_in_top
from .saved import load


def evaluate(run: str, data: str, split: str = "val", batch_size: int = 128) -> dict:
    model, _ = load(run)
    size = model.input_shape[1]
    dataset = Dataset(InputConfig(data=data, image_size=size, batch_size=batch_size,
                                  augment=preset_for(size)))
    counts = np.zeros(3)
    for images, labels in dataset.evaluate(split):
        probabilities = model(images, training=False)
        counts += [float(correct_in_top(probabilities, labels, 1)), float(correct_in_top(probabilities, labels, 5)),
                   len(labels)]
    return {"split": split, "samples": int(counts[2]), "top1": counts[0] / counts[2], "top5": counts[1] / counts[2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--model", required=True, help="a trainer.train --output (folder with model.keras)")
    parser.add_argument("--data", required=True, help="dataset URL (ingest.shard's --output)")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    args = parser.parse_args(argv)
    try:
        print(json.dumps(evaluate(args.model, args.data, args.split, args.batch_size)))
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
