"""Model registry: name -> "module:builder". Every builder returns an uncompiled Keras model whose
output is the softmax over `num_classes` for `image_size` x `image_size` x 3 inputs. Builders are
imported when a model is built, so that the registry (and `--help`) needs no TensorFlow."""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

from ..errors import UsageError


@dataclass(frozen=True)
class ModelConfig:
    name: str = "model2"
    # Dropout rates in layer order; None: the model's defaults (model1: one rate, model2: three).
    dropout: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.name not in MODELS:
            raise ValueError(f"model {self.name!r} unknown; choose one of {', '.join(MODELS)}")
        if self.dropout is not None and not all(0 <= rate < 1 for rate in self.dropout):
            raise ValueError(f"dropout rates {self.dropout} must be in [0, 1)")


MODELS: dict[str, str] = {
    "model1": "trainer.models.seed:model1",
    "model2": "trainer.models.seed:model2",
    "resnet18": "trainer.models.resnet:resnet18",
    "resnet50": "trainer.models.resnet:resnet50",
}


def dropout_rates(model) -> list[float]:
    """The dropout rates a built model uses, in layer order (empty for models without dropout)."""
    import keras

    return [float(layer.rate) for layer in model.layers if isinstance(layer, keras.layers.Dropout)]


def build_model(config: ModelConfig, num_classes: int, image_size: int):
    """The uncompiled keras.Model."""
    module, _, name = MODELS[config.name].partition(":")
    builder = getattr(importlib.import_module(module), name)
    options = {} if config.dropout is None else {"dropout": config.dropout}
    if options and "dropout" not in inspect.signature(builder).parameters:
        raise UsageError(f"--dropout: model {config.name} has no dropout layers")
    try:
        return builder(num_classes=num_classes, image_size=image_size, **options)
    except UsageError:
        raise
    except ValueError as exc:   # Keras: a layer's output would be smaller than one pixel, or too small an input
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())[:300]
        raise UsageError(f"--image-size {image_size} does not fit --model {config.name}: its layers cannot be built "
                         f"for that size ({reason or type(exc).__name__})") from None
