"""A trained model as saved by `trainer.train`: `<run>/model.keras` plus `<run>/classes.json`
(index, wnid and name of every class), loadable from any fsspec URL."""
from __future__ import annotations

import json
import os
import tempfile

import keras

from ingest.storage import Location, dump_json, write_atomic

MODEL = "model.keras"
CLASSES = "classes.json"


def save(model: keras.Model, classes: list[dict], output: str) -> None:
    fs, root = Location(output).open()
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, MODEL)
        model.save(local)
        with open(local, "rb") as handle:
            write_atomic(fs, f"{root}/{MODEL}", handle.read())
    write_atomic(fs, f"{root}/{CLASSES}", dump_json(classes))


def load(run: str) -> tuple[keras.Model, list[dict]]:
    """(model, classes) from a run's output URL (the folder holding model.keras)."""
    fs, root = Location(run).open()
    for name in (MODEL, CLASSES):
        if not fs.isfile(f"{root}/{name}"):
            raise FileNotFoundError(f"{run}: no {name} (is this a finished trainer.train output?)")
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, MODEL)
        fs.get_file(f"{root}/{MODEL}", local)
        model = keras.models.load_model(local, compile=False)
    return model, json.loads(fs.cat_file(f"{root}/{CLASSES}"))
