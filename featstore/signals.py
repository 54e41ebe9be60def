"""Stopping a build cleanly on SIGINT (Ctrl-C), SIGTERM and SIGHUP.

Batch schedulers and service managers (SLURM at the time limit, `timeout`, systemd,
Kubernetes, torchrun) stop jobs with SIGTERM and follow with SIGKILL after a grace
period. While a `StopRequest` handles signals, the first of these signals only records
itself: the runner stops taking batches, the writers commit what was encoded, and
`build` raises `BuildInterrupted`. The previous handlers are put back at once, so a
second signal acts as it would have without featstore (Ctrl-C twice raises
KeyboardInterrupt, a second SIGTERM ends the process; the outputs stay crash-safe).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """A flag the runner checks between batches; set by a signal or by `request()`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        if self.signum is None:
            self.signum = signum

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request(signum)
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextmanager
    def handling_signals(self) -> Iterator[StopRequest]:
        """Route the stop signals to this request (only possible in the main thread)."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        try:
            yield self
        finally:
            self._restore()
