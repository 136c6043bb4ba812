"""Stopping a training after the step in progress, with a checkpoint of it: what the app's Stop
sends (SIGUSR1). Ctrl-C (SIGINT) still ends a training at once, from its last periodic checkpoint.

Signal handlers exist only in the main thread; a training run elsewhere (a test's thread) is not
stoppable this way and keeps the signal's previous disposition.
"""
from __future__ import annotations

import signal
import threading

STOP_SIGNAL = signal.SIGUSR1


class StopRequest:
    """`with StopRequest() as stop:` ... `if stop.asked:`; true once STOP_SIGNAL has arrived."""

    def __init__(self):
        self.asked = False
        self._before = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._before = signal.signal(STOP_SIGNAL, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        self.asked = True

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            signal.signal(STOP_SIGNAL, self._before)
