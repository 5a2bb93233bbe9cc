"""Shards -> trained Keras model on Horovod workers (see docs/architecture.md)."""
import os

# TensorFlow's C++ INFO/WARNING lines (CPU features, iterator finalisation at exit) drown the
# training log; errors still show, and setting the variable explicitly restores them all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
