"""`python -m trainer.predict --model RUN IMAGE...`: the 5 most likely classes of each image."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import tensorflow as tf

from .augment import eval_image, preset_for
from .saved import load


def top5(model, classes: list[dict], image_bytes: bytes) -> list[tuple[str, float]]:
    size = model.input_shape[1]
    augment = preset_for(size)
    jpeg = tf.io.encode_jpeg(tf.io.decode_image(image_bytes, channels=3, expand_animations=False))
    probabilities = model(eval_image(jpeg, size, augment)[None], training=False).numpy()[0]
    best = np.argsort(probabilities)[::-1][:5]
    return [(classes[i]["name"], float(probabilities[i])) for i in best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("--model", required=True, help="a trainer.train --output (folder with model.keras)")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF or BMP)")
    args = parser.parse_args(argv)
    try:
        model, classes = load(args.model)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    status = 0
    for path in args.images:
        try:
            with open(path, "rb") as handle:
                ranked = top5(model, classes, handle.read())
        except (OSError, tf.errors.InvalidArgumentError) as exc:
            print(f"error: {path}: not a readable image ({type(exc).__name__})", file=sys.stderr)
            status = 3
            continue
        print(path)
        for name, probability in ranked:
            print(f"  {probability:.4f}  {name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
