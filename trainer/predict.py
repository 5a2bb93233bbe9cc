"""`python -m trainer.predict --model RUN IMAGE...`: the 5 most likely classes of each image.

Each image is turned into what ingest.shard would have stored (an RGB JPEG: RGB JPEGs as they are,
anything else re-encoded) and preprocessed as the run's own validation was (its config.json:
image size and eval transform).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from ingest import cli
from ingest.errors import EXIT_INPUT

if TYPE_CHECKING:
    import keras

    from .config import AugmentConfig

TOP = 5


def top5(model: keras.Model, classes: list[dict], image_bytes: bytes, image_size: int,
         augment: AugmentConfig) -> list[tuple[str, float]]:
    """(class name, probability) of the 5 most likely classes. Raises ingest.images.RejectedImage
    (or a TensorFlow error) for bytes that are not a readable image."""
    import numpy as np

    from ingest.images import normalize

    from .augment import eval_image

    jpeg = normalize(image_bytes, validate="full").data
    probabilities = np.asarray(model(eval_image(jpeg, image_size, augment)[None], training=False))[0]
    best = np.argsort(-probabilities, kind="stable")[:TOP]   # ties: the lower class index first, as top_k
    return [(classes[i]["name"], float(probabilities[i])) for i in best]


def predict(run: str, images: list[str], storage_options: dict[str, Any] | None = None) -> int:
    """Print each image's top 5; an image that cannot be read is one error line, the others go on."""
    import tensorflow as tf

    from ingest.images import RejectedImage

    from . import saved

    trained = saved.open_run(run, storage_options)
    model = trained.load_model()
    status = 0
    for path in images:
        try:
            with open(path, "rb") as handle:
                ranked = top5(model, trained.classes, handle.read(), trained.config.image_size,
                              trained.config.augment)
        except (OSError, RejectedImage, tf.errors.InvalidArgumentError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"error: {path}: not a readable image ({reason})", file=sys.stderr)
            status = EXIT_INPUT
            continue
        print(path)
        for name, probability in ranked:
            print(f"  {probability:.4f}  {name}")
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a trainer.train --output (path or URL holding model.keras, "
                                                       "classes.json and config.json)")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, GIF, BMP, WebP or TIFF)")
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for --model, repeatable; credentials come from the environment")
    parser.add_argument("--log-level", default="WARNING", choices=cli.LOG_LEVELS, help="logging level (default "
                                                                                        "WARNING)")
    return parser


def main(argv: list[str] | None = None) -> int:
    from ingest.storage import parse_storage_options

    args, options = cli.parse(build_parser(), argv, lambda a: parse_storage_options(a.storage_option))

    def body() -> int:
        from .quiet import import_tensorflow

        import_tensorflow()
        logging.getLogger("trainer").setLevel(args.log_level)
        return predict(args.model, args.images, options)

    return cli.run_main(body, args.log_level, kept="nothing was written")


if __name__ == "__main__":
    sys.exit(main())
