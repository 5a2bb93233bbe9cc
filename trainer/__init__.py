"""Shards -> trained Keras model on Horovod workers (built in the trainer issues)."""
