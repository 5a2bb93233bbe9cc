"""Who this process is in the job: rank and size from one small object (Horovod underneath)."""
from __future__ import annotations

from dataclasses import dataclass

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf


@dataclass(frozen=True)
class Workers:
    rank: int
    size: int
    local_rank: int
    local_size: int = 1      # ranks on this node: they share its cores

    @property
    def is_chief(self) -> bool:
        """Rank 0: the only one that writes logs, checkpoints and results."""
        return self.rank == 0


def init() -> Workers:
    """Start Horovod (one process per GPU when there are GPUs) and say who we are."""
    hvd.init()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
        tf.config.experimental.set_memory_growth(gpus[hvd.local_rank() % len(gpus)], True)
    return Workers(hvd.rank(), hvd.size(), hvd.local_rank(), hvd.local_size())


def collective_failure(error: BaseException) -> str | None:
    """Why a Horovod collective failed (another worker died, or its connection broke: gloo's read
    error or Horovod's shutdown notice), as one line; None for any other error."""
    if not isinstance(error, tf.errors.OpError) or "Horovod" not in str(error):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.strip().startswith("[[")]
    return lines[-1][:300]


def average(values: list[tf.Tensor]) -> list[tf.Tensor]:
    """Mean over all ranks (gradients, train metrics); a no-op alone."""
    return hvd.grouped_allreduce(values, op=hvd.Average) if hvd.size() > 1 else values


def total(values: list[tf.Tensor]) -> list[tf.Tensor]:
    """Sum over all ranks (eval counts)."""
    return hvd.grouped_allreduce(values, op=hvd.Sum) if hvd.size() > 1 else values


def broadcast_object(value, name: str):
    """Rank 0's picklable value on every rank (restore on rank 0, then broadcast). `name` must be
    the same on every rank: Horovod matches collectives by name."""
    return hvd.broadcast_object(value, root_rank=0, name=name) if hvd.size() > 1 else value


def gather(array: np.ndarray) -> np.ndarray:
    """Every rank's array stacked in rank order: [size, *array.shape] (for rank 0 to save)."""
    if hvd.size() == 1:
        return array[None]
    gathered = hvd.allgather(tf.constant(array[None]))
    return gathered.numpy()


def broadcast_from_chief(variables: list) -> None:
    """Make every rank start from rank 0's weights and optimizer state."""
    for variable in variables:
        variable.assign(hvd.broadcast(variable.value, 0))
