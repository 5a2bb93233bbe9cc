"""Every random stream of a rank, derived from (seed, rank, what it is for).

Weights start equal on every rank (rank 0's, broadcast), but each rank's dropout masks must be its
own: W ranks with batch B are then one model trained on a W x B batch, as with one worker. Keras 3
keeps a layer's random state in `seed_generator_state` variables ([seed, counter], int64); they are
never broadcast, and are reseeded here from (seed, rank) so that a run is repeatable.
"""
from __future__ import annotations

import hashlib

import keras
import numpy as np


def derive(seed: int, rank: int, stream: str) -> int:
    """A 62-bit seed for one stream of one rank (stable across processes, unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{rank}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def seed_state_variables(model: keras.Model) -> list:
    """The model's random-state variables (dropout's seed generators), in a stable order."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights and "seed_generator" in v.path]


def seed_per_rank(model: keras.Model, seed: int, rank: int) -> None:
    """Give each random layer of this rank its own stream: [derive(seed, rank, layer i), 0]."""
    for index, variable in enumerate(seed_state_variables(model)):
        variable.assign(np.array([derive(seed, rank, f"layer-{index}"), 0], np.int64))


def get_states(model: keras.Model) -> np.ndarray:
    """[generators, 2] int64: what a checkpoint keeps of this rank's random state."""
    return np.array([np.asarray(v.value) for v in seed_state_variables(model)], np.int64).reshape(-1, 2)


def set_states(model: keras.Model, states: np.ndarray) -> None:
    for variable, value in zip(seed_state_variables(model), states, strict=True):
        variable.assign(value)
