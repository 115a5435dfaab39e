"""One use of an LLM's cache at a time (LLM holds a Turns; every call takes the turn for its length).

Another thread waits for its turn (calls on a shared LLM run one after the other); the thread that
holds the turn (an unfinished stream() generator) is refused at once, since waiting would never end.

Ctrl-C can cut the holder at any line, and at some lines nothing gives the lock back: on Python 3.11 a
KeyboardInterrupt delivered at the line event of a `try:`, or of a `with` statement's exit, leaves the
frame without running the `finally` or the `__exit__` that follow (a hang found by
tests/test_hardening.py, whose cuts land on such lines as the code around them changes). So the
holder also keeps a token alive for as long as it holds the turn: a turn whose token is gone was left
behind by a cut frame, and the next caller gives it back on the cut frame's behalf.
"""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

from .errors import BusyError

# How often a waiting caller looks for a turn left behind (seconds).
_POLL_S = 0.05


class _Token:
    """Alive exactly as long as the frame that took the turn (weakref-able, unlike object())."""


class Turns:
    def __init__(self):
        self._lock = threading.Lock()
        self._reclaim = threading.Lock()
        self._holder: tuple[int, weakref.ref] | None = None  # (thread id, its token) while taken

    @contextmanager
    def __call__(self, what: str):
        me, token = threading.get_ident(), _Token()
        holder = self._holder
        if holder is not None and holder[0] == me and holder[1]() is not None:
            raise BusyError(f"{what} while a stream() of this LLM is still open in this thread; iterate it to the "
                            "end or close() it first (or use a second LLM)")
        # Taking the lock and naming its holder share a line, as do the two steps of giving it back: a cut
        # lands before both or after both (setattr, not a method of ours, has no lines to cut).
        while not (self._lock.acquire(timeout=_POLL_S) and not setattr(self, "_holder", (me, weakref.ref(token)))):
            self._give_back_if_left(self._holder)
        try:
            yield
        finally:
            self._holder = None; self._lock.release()  # noqa: E702

    def _give_back_if_left(self, holder) -> None:
        if holder is None or holder[1]() is not None:
            return
        with self._reclaim:  # two waiters finding it left behind give it back once
            if self._holder is holder:
                self._holder = None; self._lock.release()  # noqa: E702
