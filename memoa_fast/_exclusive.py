"""One caller at a time: the objects that own compiled state raise instead of racing."""
from __future__ import annotations

import threading

__all__ = ["Exclusive"]


class Exclusive:
    """A non-blocking lock for ``with self._exclusive:`` around every call that writes an object's arrays.

    The compiled kernels release the GIL (``nogil``), so two Python threads
    calling one object at once would both write its arrays: a silently
    corrupt state. The second caller gets ``RuntimeError`` instead, at once
    (it never waits: sharing one object between threads is a bug to fix, not
    a queue to join; one object per thread is the supported use).

    Parameters
    ----------
    what : str
        The class name used in the error message.
    """

    __slots__ = ("_lock", "_what")

    def __init__(self, what: str):
        self._lock = threading.Lock()
        self._what = what

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"this {self._what} is being used by another thread: a {self._what} is not thread-safe "
                               "(use one object per thread)")

    def __exit__(self, *exc) -> None:
        self._lock.release()
