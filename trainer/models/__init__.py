"""Models: a registry name, `package.module:function` (a user's own) or `keras.applications.NAME`.

Every builder returns an uncompiled Keras network whose output is the softmax over `num_classes`
for `image_size` x `image_size` x 3 float inputs; `build_model` puts it inside the model that is
trained and saved, which takes uint8 images (trainer.models.classifier). Builders are imported when
a model is built, so that the registry (and `--help`) needs no TensorFlow."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from ..errors import UsageError
from .custom import APPLICATION, APPLICATIONS, FUNCTION, reason

MODELS: dict[str, str] = {
    "model1": "trainer.models.seed:model1",
    "model2": "trainer.models.seed:model2",
    "resnet18": "trainer.models.resnet:resnet18",
    "resnet50": "trainer.models.resnet:resnet50",
}


@dataclass(frozen=True)
class ModelConfig:
    # A MODELS name, "package.module:function" or "keras.applications.NAME": config.json keeps it, so a
    # rerun (which must name the same model) and the report know which model it was.
    name: str = "model2"
    # Dropout rates in layer order; None: the model's defaults (model1: one rate, model2: three).
    dropout: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in MODELS and not (FUNCTION.fullmatch(self.name) or APPLICATION.fullmatch(self.name)):
            raise ValueError(f"model {self.name!r} unknown; choose one of {', '.join(MODELS)}, "
                             f"{APPLICATIONS}NAME (e.g. {APPLICATIONS}EfficientNetB0) or package.module:function")
        if self.dropout is not None and not all(0 <= rate < 1 for rate in self.dropout):
            raise ValueError(f"dropout rates {self.dropout} must be in [0, 1)")


def dropout_rates(model) -> list[float]:
    """The dropout rates a built model uses, in layer order, models inside it included (empty for
    models without dropout)."""
    import keras

    rates: list[float] = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            rates += dropout_rates(layer)
        elif isinstance(layer, keras.layers.Dropout):
            rates.append(float(layer.rate))
    return rates


def build_model(config: ModelConfig, num_classes: int, image_size: int):
    """The uncompiled keras.Model that is trained and saved: uint8 images in, float32 probabilities out."""
    from .classifier import classifier

    network = build_network(config, num_classes, image_size)
    images = (None, image_size, image_size, 3)
    declared = _input_shape(network)
    if declared is not None and not _fits(declared, images):
        raise UsageError(f"--model {config.name}: its model takes inputs of shape {declared}, not --image-size "
                         f"{image_size}'s {images}")
    try:
        model = classifier(network, image_size)
    except Exception as exc:   # a network without a declared input that fails on these
        raise UsageError(f"--model {config.name}: its model cannot take inputs of shape {images} (--image-size "
                         f"{image_size}): {reason(exc)}") from None
    if tuple(model.output_shape) != (None, num_classes):
        raise UsageError(f"--model {config.name}: its model answers shape {tuple(model.output_shape)}, not "
                         f"(None, {num_classes}): one probability per class of the dataset")
    _check_probabilities(model, config.name, image_size)
    return model


def _check_probabilities(model, name: str, image_size: int) -> None:
    """The loss and the saved model take the outputs as probabilities: logits (no softmax at the end)
    would train on a wrong loss without a word. Two images of noise, in inference mode (no random state used)."""
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (2, image_size, image_size, 3), dtype=np.uint8)
    outputs = np.asarray(model(images, training=False), dtype=np.float64)
    if not (np.all(np.isfinite(outputs)) and outputs.min() >= 0 and outputs.max() <= 1
            and np.allclose(outputs.sum(axis=1), 1, atol=1e-2)):
        raise UsageError(f"--model {name}: its outputs are not probabilities (each row in 0..1, summing to 1; got "
                         f"sums {np.round(outputs.sum(axis=1), 3).tolist()}): end it with a softmax")


def build_network(config: ModelConfig, num_classes: int, image_size: int):
    """The network alone: float32 images (as trainer.models.classifier scales them) -> probabilities."""
    import keras

    from . import custom

    builder = _registered(config.name) if config.name in MODELS else custom.builder(config.name)
    options = {} if config.dropout is None else {"dropout": config.dropout}
    if options and not _accepts(builder, "dropout"):
        why = "has no dropout layers" if config.name in MODELS else "takes no dropout option"
        raise UsageError(f"--dropout: model {config.name} {why}")
    try:
        network = builder(num_classes, image_size, **options)
    except UsageError:
        raise
    except Exception as exc:
        if FUNCTION.fullmatch(config.name):   # the user's code: what it raises is about their model
            raise UsageError(f"--model {config.name}: called with num_classes={num_classes}, image_size={image_size}"
                             f"{', dropout=' + str(config.dropout) if options else ''}, it raised {reason(exc)}"
                             ) from None
        if not isinstance(exc, ValueError):
            raise
        # Keras: a layer's output would be smaller than one pixel, or too small an input
        raise UsageError(f"--image-size {image_size} does not fit --model {config.name}: its layers cannot be built "
                         f"for that size ({reason(exc)})") from None
    if not isinstance(network, keras.Model):
        raise UsageError(f"--model {config.name}: returned a {type(network).__name__}, not a keras.Model")
    return network


def _input_shape(network) -> tuple | None:
    """The input shape a network declares; None when it has none yet (built on its first call)."""
    try:
        return tuple(network.input_shape)
    except (AttributeError, ValueError):
        return None


def _fits(declared: tuple, shape: tuple) -> bool:
    return len(declared) == len(shape) and all(d is None or d == s for d, s in zip(declared, shape))


def _registered(name: str):
    module, _, function = MODELS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _accepts(builder, option: str) -> bool:
    parameters = inspect.signature(builder).parameters
    return option in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())

