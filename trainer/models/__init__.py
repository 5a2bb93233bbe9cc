"""Model registry: name -> builder. Every builder returns an uncompiled Keras model whose
output is the softmax over `num_classes` for `image_size` x `image_size` x 3 inputs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras

from .resnet import resnet18, resnet50
from .seed import model1, model2


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


MODELS: dict[str, Callable[..., keras.Model]] = {
    "model1": model1,
    "model2": model2,
    "resnet18": resnet18,
    "resnet50": resnet50,
}


def build_model(config: ModelConfig, num_classes: int, image_size: int) -> keras.Model:
    options = {} if config.dropout is None else {"dropout": config.dropout}
    return MODELS[config.name](num_classes=num_classes, image_size=image_size, **options)
