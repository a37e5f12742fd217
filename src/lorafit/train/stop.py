"""Stopping a run cleanly: Ctrl-C / SIGTERM finish the current optimizer step, then the run checkpoints."""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """Ctrl-C / SIGTERM ask the loop to stop after the current optimizer step (then it checkpoints).

    Stopping between steps, never inside one, is what keeps the checkpoint consistent: weights, optimizer,
    RNG and data position all describe the same moment. A second Ctrl-C aborts at once.
    """

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self):
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
