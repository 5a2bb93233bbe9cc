"""One Horovod rank for tests/test_trainer_rendezvous.py: initialises (the Gloo rendezvous), prints
{"rank", "size"} as one JSON line, then allreduces every 0.1 s until the file argv[1] exists on any
rank (the ranks agree through the allreduce, so all stop at the same step) and exits 0."""
import json
import sys
import time
from pathlib import Path

import horovod.tensorflow as hvd
import tensorflow as tf

hvd.init()
print(json.dumps({"rank": hvd.rank(), "size": hvd.size()}), flush=True)
stop = Path(sys.argv[1])
while not hvd.allreduce(tf.constant(float(stop.exists())), op=hvd.Sum).numpy():
    time.sleep(0.1)
