"""Training configuration: typed dataclasses, named presets, JSON round trip.

The CLI parses flags into a `TrainConfig` (starting from a preset when one is named) and saves
the resolved config as `<output>/config.json`; library code only ever sees the dataclass.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .models import ModelConfig

CROPS = ("pad", "resized", "none")


@dataclass(frozen=True)
class AugmentConfig:
    enabled: bool = True                  # False: training images get the eval transform
    crop: str = "pad"                     # pad: pad + random crop (TinyImageNet); resized: random-resized-crop (ImageNet)
    pad: int = 4                          # pixels of reflection padding for crop="pad"
    area_range: tuple[float, float] = (0.08, 1.0)     # crop="resized": fraction of the image area
    aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True                     # random horizontal flip
    color_jitter: float = 0.0             # 0: off; else brightness/contrast/saturation strength (e.g. 0.4)
    eval_crop: float = 1.0                # eval: central fraction kept before resizing (0.875 for ImageNet)

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop {self.crop!r} unknown; choose one of {', '.join(CROPS)}")
        if self.pad < 0 or not 0 <= self.color_jitter <= 1 or not 0 < self.eval_crop <= 1:
            raise ValueError(f"pad {self.pad} must be >= 0, color_jitter {self.color_jitter} in 0..1, "
                             f"eval_crop {self.eval_crop} in (0, 1]")


# Named presets: the two data sets the project trains on.
AUGMENT_PRESETS = {
    "tinyimagenet": AugmentConfig(crop="pad", pad=4, flip=True),
    "imagenet": AugmentConfig(crop="resized", flip=True, eval_crop=0.875),
    "none": AugmentConfig(enabled=False),
}


def preset_for(image_size: int) -> AugmentConfig:
    """The default augmentation for an input size: TinyImageNet's up to 64 px, ImageNet's above."""
    return AUGMENT_PRESETS["tinyimagenet" if image_size <= 64 else "imagenet"]


# What --lr-scaling and --weight-decay default to, per optimizer (trainer.optim builds them).
OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "adam": {"lr_scaling": "sqrt", "weight_decay": 0.0},    # a weight decay with Adam is AdamW
    "adamw": {"lr_scaling": "sqrt", "weight_decay": 0.01},
    "sgd": {"lr_scaling": "linear", "weight_decay": 0.0},   # Nesterov momentum 0.9
}
OPTIMIZERS = tuple(OPTIMIZER_DEFAULTS)
LR_SCHEDULES = ("constant", "cosine", "step")   # the keys of trainer.optim.SCHEDULES
LR_SCALINGS = ("linear", "sqrt", "none")        # the keys of trainer.optim.SCALINGS
# Settings a rerun may change and still resume: extend a run, change when it stops early, where it
# serves metrics, how its output and data are spelt or where they moved (the checkpoint checks that
# the dataset is the same one: its manifest's plan id), how much it reads ahead (the order does not
# depend on it) and whether XLA compiles the step.
RESUMABLE = frozenset({"epochs", "early_stopping_patience", "metrics_port", "output", "storage_options", "data",
                       "stall_timeout", "checkpoint_every", "log_every_steps", "read_ahead_mb",
                       "jit_compile"})


@dataclass
class TrainConfig:
    data: str                                   # dataset URL (ingest.shard's --output)
    output: str                                 # where config, checkpoints, model and results go
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=lambda: AUGMENT_PRESETS["tinyimagenet"])
    image_size: int = 64
    epochs: int = 30
    batch_size: int = 128                       # per worker
    optimizer: str = "adam"
    lr: float = 1e-3                            # for one worker; scaled by the worker count
    warmup_epochs: int = 2                      # linear ramp to the scaled rate (large batches need it)
    lr_schedule: str = "constant"               # after the warm-up: constant, cosine (to 0 at the end), step
    lr_decay_epochs: tuple[int, ...] = ()       # step: the rate x0.1 from each of these epochs on
    lr_scaling: str | None = None               # with the worker count: linear, sqrt, none; None: the optimizer's
    weight_decay: float | None = None           # decoupled, kernels only; None: the optimizer's (adamw 0.01, else 0)
    label_smoothing: float = 0.0
    early_stopping_patience: int | None = None  # epochs without a better val top-5
    shuffle_mb: int = 128                       # shuffle buffer per rank, MB of samples
    read_ahead_mb: int = 128                    # shards read ahead per rank, MB (none when one is bigger)
    jit_compile: bool = False                   # XLA for the step's augmentation, forward and backward pass
    mixed_precision: bool = False
    seed: int = 0                               # of weights, data order, augmentation and dropout
    deterministic: bool = False                 # same seed -> same weights and metrics (slower)
    metrics_port: int | None = None             # this port + the local rank, one per process
    stall_timeout: float = 300.0                # seconds without progress before a rank gives up; 0: never
    checkpoint_every: float = 0.0               # minutes between mid-epoch checkpoints; 0: at epoch ends only
    log_every_steps: int = 50                   # TensorBoard's step loss and rate every this many steps; 0: never
    storage_options: dict[str, Any] = field(default_factory=dict)   # fsspec's, for data and output; no secrets

    def __post_init__(self) -> None:
        defaults = OPTIMIZER_DEFAULTS.get(self.optimizer, OPTIMIZER_DEFAULTS["adam"])
        self.lr_scaling = defaults["lr_scaling"] if self.lr_scaling is None else self.lr_scaling
        self.weight_decay = defaults["weight_decay"] if self.weight_decay is None else self.weight_decay
        self.lr_decay_epochs = decay = tuple(self.lr_decay_epochs)   # a list from JSON
        checks = [
            (self.optimizer in OPTIMIZERS, f"optimizer {self.optimizer!r} unknown; choose one of {OPTIMIZERS}"),
            (self.epochs >= 1, f"epochs {self.epochs} must be >= 1"),
            (self.batch_size >= 1, f"batch size {self.batch_size} must be >= 1"),
            (0 < self.lr < math.inf, f"learning rate {self.lr} must be a finite number > 0"),
            (0 <= self.stall_timeout < math.inf, f"stall timeout {self.stall_timeout} must be a finite number >= 0"),
            (0 <= self.checkpoint_every < math.inf,
             f"checkpoint every {self.checkpoint_every} minutes must be a finite number >= 0"),
            (self.warmup_epochs >= 0, f"warmup epochs {self.warmup_epochs} must be >= 0"),
            (self.log_every_steps >= 0, f"log every steps {self.log_every_steps} must be >= 0 (0: never)"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr schedule {self.lr_schedule!r} unknown; choose one of {LR_SCHEDULES}"),
            (all(isinstance(e, int) and e >= 1 for e in decay) and list(decay) == sorted(set(decay)),
             f"lr decay epochs {list(decay)} must be increasing whole epochs >= 1 (e.g. 30,60,80)"),
            (self.lr_schedule == "step" or not decay,
             f"lr decay epochs {list(decay)} are for the step schedule only; lr schedule is {self.lr_schedule!r}"),
            (self.lr_schedule != "step" or decay, "lr schedule 'step' needs lr decay epochs (e.g. 30,60,80)"),
            (self.lr_scaling in LR_SCALINGS, f"lr scaling {self.lr_scaling!r} unknown; choose one of {LR_SCALINGS}"),
            (0 <= self.weight_decay < 1, f"weight decay {self.weight_decay} must be in [0, 1)"),
            (self.optimizer != "adam" or self.weight_decay == 0,
             f"weight decay {self.weight_decay} with adam: Adam with decoupled weight decay is 'adamw'; "
             f"choose optimizer adamw, or weight decay 0"),
            (0 <= self.label_smoothing < 1, f"label smoothing {self.label_smoothing} must be in [0, 1)"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             f"early stopping patience {self.early_stopping_patience} must be >= 1"),
            (self.image_size >= 8, f"image size {self.image_size} must be >= 8"),
            (self.shuffle_mb >= 1, f"shuffle buffer {self.shuffle_mb} MB must be >= 1"),
            (self.read_ahead_mb >= 1, f"read-ahead {self.read_ahead_mb} MB must be >= 1"),
            (self.metrics_port is None or 1 <= self.metrics_port <= 65535,
             f"metrics port {self.metrics_port} must be in 1..65535"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """The settings, as 'name: saved -> now', in which this config differs from a checkpoint's
        (the JSON of its config), ignoring those a resumed run may change."""
        now, before = _flatten(self.to_json()), _flatten(TrainConfig.from_json(saved).to_json())
        # Cosine reaches 0 at the last epoch: more epochs would raise the rate again mid-run.
        resumable = RESUMABLE - {"epochs"} if self.lr_schedule == "cosine" else RESUMABLE
        return [f"{_SHOWN.get(name, name.replace('_', '-'))} {before.get(name)} -> {now.get(name)}"
                for name in sorted(now.keys() | before.keys())
                if name.split(".")[0] not in resumable and now.get(name) != before.get(name)]

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        values.setdefault("lr_scaling", "linear")   # saved before --lr-scaling: every optimizer's was linear
        # Saved before buffers were sized in MB: their sample counts have no equivalent.
        values.pop("shuffle_buffer", None)
        values.pop("interleave", None)
        model = values.pop("model", {})
        augment = values.pop("augment", {})
        if model.get("dropout") is not None:
            model["dropout"] = tuple(model["dropout"])
        for key in ("area_range", "aspect_range"):
            if key in augment:
                augment[key] = tuple(augment[key])
        return cls(model=ModelConfig(**model), augment=AugmentConfig(**augment), **values)


_SHOWN = {"model.name": "model", "model.dropout": "dropout", "augment.enabled": "augment"}


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


# The study's four runs (model x augmentation, its dropouts, early stopping on val top-5).
PRESETS: dict[str, dict[str, Any]] = {
    "seed-model1": {"model": ModelConfig("model1", (0.5,)), "augment": AUGMENT_PRESETS["none"]},
    "seed-model1-aug": {"model": ModelConfig("model1", (0.5,)), "augment": AUGMENT_PRESETS["tinyimagenet"]},
    "seed-model2": {"model": ModelConfig("model2", (0.5, 0.5, 0.75)), "augment": AUGMENT_PRESETS["none"],
                    "epochs": 100, "early_stopping_patience": 10},
    "seed-model2-aug": {"model": ModelConfig("model2", (0.5, 0.5, 0.75)),
                        "augment": AUGMENT_PRESETS["tinyimagenet"], "epochs": 100, "early_stopping_patience": 10},
    "resnet18-tinyimagenet": {"model": ModelConfig("resnet18"), "augment": AUGMENT_PRESETS["tinyimagenet"],
                              "optimizer": "sgd", "lr": 0.05, "epochs": 60},
    # Goyal et al. 2017 ("Accurate, Large Minibatch SGD"): 0.1 per 256 images of global batch, so 0.1 x 64 / 256
    # = 0.025 per worker of 64, scaled linearly (sgd's default; N workers: 0.025 N = 0.1 x 64 N / 256); 5 warm-up
    # epochs; x0.1 at epochs 30, 60, 80 of 90; momentum 0.9; their L2 1e-4 through momentum 0.9 as decoupled
    # decay 1e-3 (trainer.optim). Label smoothing 0.1: He et al. 2019 ("Bag of Tricks").
    "resnet50-imagenet": {"model": ModelConfig("resnet50"), "augment": AUGMENT_PRESETS["imagenet"],
                          "image_size": 224, "optimizer": "sgd", "lr": 0.025, "batch_size": 64,
                          "epochs": 90, "warmup_epochs": 5, "lr_schedule": "step",
                          "lr_decay_epochs": (30, 60, 80), "weight_decay": 1e-3, "label_smoothing": 0.1},
}


def from_preset(name: str, data: str, output: str, **overrides: Any) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} unknown; choose one of {', '.join(PRESETS)}")
    return TrainConfig(data=data, output=output, **{**PRESETS[name], **overrides})
