"""W workers of batch B take the steps one worker takes with a W x B batch (SGD, no dropout, no
BatchNorm: nothing random, nothing per rank). Run alone with B = 16 and under
`horovodrun -np 2` with B = 8: rank r trains on rows [8r, 8r + 8) of the same 16 images.
Writes the weights after 3 steps to the given .npz (rank 0)."""
import sys

import numpy as np
import tensorflow as tf

from trainer import dist
from trainer.config import from_preset
from trainer.loop import Trainer
from trainer.models import ModelConfig

data, output = sys.argv[1], sys.argv[2]
workers = dist.init()
batch = 16 // workers.size
# The flag is per worker; SGD scales it linearly: 0.1 x 1 alone, 0.05 x 2 on two ranks.
config = from_preset("seed-model1", data, "unused", model=ModelConfig("model1", (0.0,)), optimizer="sgd",
                     lr=0.1 / workers.size, warmup_epochs=0, batch_size=batch)
trainer = Trainer(config, workers)
trainer.broadcast()
rng = np.random.default_rng(0)
images = rng.integers(0, 256, size=(3, 16, 64, 64, 3)).astype(np.uint8)   # what the pipeline feeds the model
labels = rng.integers(0, 10, size=(3, 16)).astype(np.int32)
mine = slice(workers.rank * batch, (workers.rank + 1) * batch)
for step in range(3):
    trainer.train_step(images[step, mine], labels[step, mine], tf.zeros([2]), tf.zeros([2], tf.int64))   # no stop, checkpoint
if workers.is_chief:
    np.savez(output, *trainer.model.get_weights())
