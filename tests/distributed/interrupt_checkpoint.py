"""Run trainer.train, but die by SIGKILL in the middle of saving the checkpoint of epoch `KILL_EPOCH`:

  python interrupt_checkpoint.py torn|unnamed KILL_EPOCH TRAIN_ARGS...

torn: half the state file reaches its final name (what a non-atomic store could leave);
unnamed: the whole state file is written, the kill comes before latest.json names it.
"""
import os
import signal
import sys

from trainer import checkpoint, train

mode, kill_epoch, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
real_write = checkpoint.write_atomic


def write_then_die(fs, path, data):
    if path.endswith(f"epoch-{kill_epoch:04d}.npz"):
        if mode == "torn":
            fs.pipe_file(path, data[: len(data) // 2])
        else:
            real_write(fs, path, data)
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(fs, path, data)


checkpoint.write_atomic = write_then_die
sys.exit(train.main(args))
