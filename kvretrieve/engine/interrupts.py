"""Ctrl-C and the cache's bookkeeping.

Forward passes stay interruptible: what they write past the committed length is rolled back. A few
updates touch several tables that must agree (commit, truncate, a segment rewritten in cluster
order and its record); cut halfway, they could not be repaired, so they hold Ctrl-C until done.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then deliver it to the handler it would have met.
    Python runs signal handlers in the main thread only, so elsewhere there is nothing to hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # now handled as it would have been
