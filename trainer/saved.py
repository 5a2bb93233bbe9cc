"""A trained model as saved by `trainer.train`, loadable from any fsspec URL:

- `<run>/model.keras`: the best epoch's weights, a self-contained model: uint8 RGB images of the
  run's size in, class probabilities out (the scaling inside it as built-in Keras layers), so
  `keras.models.load_model(path)(images)` needs no project code;
- `<run>/saved_model/`: the same model as a TensorFlow SavedModel for TF Serving: its
  `serving_default` signature takes `images` (uint8 [batch, size, size, 3]) and returns
  `probabilities` (float32 [batch, classes]);
- `<run>/classes.json`: index, wnid and name of every class (the dataset manifest's classes);
- `<run>/config.json`: the run's settings, which fix how its images are prepared (image size,
  the augmentation's eval transform): evaluation and prediction use them, never a default.

What a user can get wrong (a URL that is not a finished run, files missing or damaged) is an
`InputError` naming the object; Keras and TensorFlow are imported only to save or load a model.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ingest.errors import InputError
from ingest.storage import Location, display, dump_json, read_json, storage_call, write_atomic

if TYPE_CHECKING:
    import fsspec
    import keras

    from .config import TrainConfig

MODEL = "model.keras"
SAVED_MODEL = "saved_model"
CLASSES = "classes.json"
CONFIG = "config.json"
INPUT, OUTPUT = "images", "probabilities"   # the SavedModel's signature's names


def save(model: keras.Model, classes: list[dict], output: str, storage_options: dict[str, Any] | None = None) -> None:
    """model.keras, saved_model/ and classes.json, each written locally first (Keras and TensorFlow write
    only to local files), then uploaded through fsspec to any URL."""
    fs, root = Location(output, storage_options or {}).open()
    with tempfile.TemporaryDirectory() as directory:
        local = os.path.join(directory, MODEL)
        model.save(local)
        with open(local, "rb") as handle:
            write_atomic(fs, f"{root}/{MODEL}", handle.read())
        export(model, os.path.join(directory, SAVED_MODEL))
        upload_tree(fs, os.path.join(directory, SAVED_MODEL), f"{root}/{SAVED_MODEL}")
    write_atomic(fs, f"{root}/{CLASSES}", dump_json(classes))


def export(model: keras.Model, path: str) -> None:
    """The SavedModel for TF Serving: `serving_default` maps {images: uint8} to {probabilities: float32}."""
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda images: {OUTPUT: model(images, training=False)},
                         input_signature=[tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8, name=INPUT)])
    archive.write_out(path, verbose=False)   # its first endpoint is also `serving_default`


def upload_tree(fs: fsspec.AbstractFileSystem, local: str, remote: str) -> None:
    """A local directory's files to `remote`, replacing what was there (a previous attempt's export)."""
    with storage_call(fs, remote, "write"):
        if fs.exists(remote):
            fs.rm(remote, recursive=True)
    for folder, _, files in os.walk(local):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                write_atomic(fs, f"{remote}/{os.path.relpath(path, local)}", handle.read())


@dataclass
class Run:
    """A finished run's settings and classes; `load_model()` reads its model."""

    url: str
    config: TrainConfig
    classes: list[dict]
    fs: fsspec.AbstractFileSystem
    root: str

    def where(self, name: str) -> str:
        return display(self.fs, f"{self.root}/{name}")

    def load_model(self) -> keras.Model:
        """The run's model: uint8 images of the run's size in, probabilities out."""
        import keras

        from .models.classifier import classifier
        from .models.custom import import_module_of

        missing = import_module_of(self.config.model.name)   # the custom layers of a user's model, if any
        path = f"{self.root}/{MODEL}"
        with tempfile.TemporaryDirectory() as directory:
            local = os.path.join(directory, MODEL)
            with storage_call(self.fs, path, "read", refused=InputError):
                try:
                    self.fs.get_file(path, local)
                except FileNotFoundError:
                    raise InputError(f"{self.where(MODEL)}: missing") from None
            try:
                model = keras.models.load_model(local, compile=False)
            except Exception as exc:   # Keras raises many kinds for a file that is not a model
                hint = (f"; it was trained with --model {self.config.model.name}: if that has layers of its own, "
                        f"module {missing} must be importable (PYTHONPATH)") if missing else ""
                raise InputError(f"{self.where(MODEL)}: not a loadable Keras model ({type(exc).__name__}: "
                                 f"{_one_line(exc)}){hint}") from None
        size, classes = self.config.image_size, len(self.classes)
        if tuple(model.input_shape[1:3]) != (size, size) or model.output_shape[-1] != classes:
            raise InputError(f"{self.where(MODEL)}: takes {model.input_shape[1:3]} px images into "
                             f"{model.output_shape[-1]} classes, but {CONFIG} says {size} px and {CLASSES} lists "
                             f"{classes} classes: not the model of this run")
        if model.inputs[0].dtype != "uint8":   # saved before models took images: it takes them scaled
            model = classifier(model, size)
        return model


def open_run(url: str, storage_options: dict[str, Any] | None = None) -> Run:
    """A finished run's config and classes from its output URL (the folder holding model.keras);
    its model is loaded only when asked for."""
    from .config import TrainConfig

    try:
        fs, root = Location(url, storage_options or {}).open()
    except (ImportError, ValueError) as exc:   # an unknown protocol, a storage library not installed
        raise InputError(f"cannot open the model location {url}: {_one_line(exc)}") from None
    with storage_call(fs, root, "read", refused=InputError):
        if not fs.isfile(f"{root}/{MODEL}"):
            raise InputError(f"{display(fs, f'{root}/{MODEL}')}: missing (not a finished trainer.train output)")
    classes, values = (_read(fs, root, name) for name in (CLASSES, CONFIG))
    if not isinstance(classes, list) or not all(isinstance(c, dict) and "wnid" in c and "name" in c
                                                for c in classes):
        raise InputError(f"{display(fs, f'{root}/{CLASSES}')}: not a list of classes with wnid and name")
    try:
        config = TrainConfig.from_json(values)
    except (TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{display(fs, f'{root}/{CONFIG}')}: not a trainer.train config ({_one_line(exc)})") from None
    return Run(url, config, classes, fs, root)


def _read(fs: fsspec.AbstractFileSystem, root: str, name: str) -> Any:
    path = f"{root}/{name}"
    try:
        return read_json(fs, path, invalid=InputError)
    except FileNotFoundError:
        raise InputError(f"{display(fs, path)}: missing (trainer.train writes it; without it the run's "
                         f"{'preprocessing' if name == CONFIG else 'class list'} is unknown)") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
