"""Importing TensorFlow without its C++ start-up lines.

TensorFlow 2.21 writes absl's "All log messages before absl::InitializeLog()" notice, the oneDNN
notice and the CPU-feature notice straight to file descriptor 2 while it loads, before
TF_CPP_MIN_LOG_LEVEL can apply. They would open every run's log (once per rank), so the import
runs with descriptor 2 captured and everything but those lines is written back. Setting
TF_CPP_MIN_LOG_LEVEL=0 shows them all.
"""
from __future__ import annotations

import os
import sys
import tempfile

NOISE = ("All log messages before absl::InitializeLog()", "oneDNN custom operations are on",
         "cpu_feature_guard.cc", "To enable the following instructions:")


def import_tensorflow() -> None:
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow  # noqa: F401
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not any(noise in line for noise in NOISE):
                    sys.stderr.write(line)
