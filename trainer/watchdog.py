"""The stall watchdog: a rank that completes no step for `timeout` seconds exits, naming what it
waited for.

A peer that vanishes without a TCP reset (its node gone) leaves the others blocked in a collective
that may never return, and Gloo's own timeout (HOROVOD_GLOO_TIMEOUT_SECONDS) must stay long enough
for pods that start minutes apart. So training has its own bound: this thread, which ends the
process with `os._exit` (a thread blocked in a collective cannot be interrupted), and the Job then
replaces the pods, which resume from the last checkpoint.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from .errors import EXIT_STALLED


class Watchdog:
    def __init__(self, timeout: float, rank: int):
        self.timeout, self.rank = timeout, rank
        self.waiting_for = "the start of training"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)

    def start(self) -> Watchdog:
        if self.timeout:
            self._last = time.monotonic()
            self._thread.start()
        return self

    def beat(self, waiting_for: str) -> None:
        """Progress was made; from now on the rank waits for `waiting_for`."""
        self._last, self.waiting_for = time.monotonic(), waiting_for

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 10)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                print(f"error: rank {self.rank}: no progress for {idle:.0f} s (--stall-timeout {self.timeout:g}) while "
                      f"waiting for {self.waiting_for}; a peer is probably gone or frozen: rerun (or let the Job "
                      f"retry) to resume from the last checkpoint", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)
