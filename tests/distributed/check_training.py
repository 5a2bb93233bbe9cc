"""Run under `horovodrun -np 2 --gloo`: train a little through the real Trainer, then check
that every rank holds identical weights, that distributed eval equals rank 0 evaluating
the whole split alone, and that each rank draws its own dropout masks. Prints one JSON line per rank."""
import json
import sys

import horovod.tensorflow as hvd
import numpy as np
import tensorflow as tf

from trainer import dist
from trainer.config import from_preset
from trainer.loop import Trainer

data, output = sys.argv[1], sys.argv[2]
workers = dist.init()
config = from_preset("seed-model2-aug", data, output, epochs=2, batch_size=16, lr=0.001)
trainer = Trainer(config, workers)
trainer.broadcast()
# The same input through dropout: each rank's own random state gives its own masks.
outputs = trainer.model(tf.ones([8, 64, 64, 3]), training=True)
outputs = hvd.allgather(tf.reshape(outputs, [1, -1])).numpy()
trainer.start_stream()
for epoch in range(2):
    result = trainer.run_epoch(epoch)
checksum = tf.constant([float(np.sum([np.sum(np.abs(w)) for w in trainer.model.get_weights()]))])
checksums = hvd.allgather(checksum).numpy().tolist()
distributed = trainer.evaluate()
distributed = [distributed.top1, distributed.top5]
alone = None
if workers.is_chief:
    counts = np.zeros(4)
    for images, labels in trainer.data.evaluate("val", 0, 1):
        counts += trainer.eval_step(images, labels).numpy()
    alone = [counts[0] / counts[2], counts[1] / counts[2]]
print(json.dumps({"rank": workers.rank, "size": workers.size, "checksums": checksums,
                  "distributed_eval": distributed, "alone_eval": alone, "val_top5": result.val_top5,
                  "dropout_outputs_differ": not np.allclose(outputs[0], outputs[1])}))
