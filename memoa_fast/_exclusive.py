"""One caller at a time: the objects that own compiled state raise instead of racing, or after an interrupted update."""
from __future__ import annotations

import sys
import threading

__all__ = ["Exclusive"]

_getframe = sys._getframe
# The hold names its thread by this thread-local's dictionary, not by threading.get_ident(): an ident is reused by
# the next thread the OS starts once its thread is gone, also in a forked child, where the threads of the parent
# that were inside a call are gone mid-call (their objects possibly half-updated) and a new thread very often gets
# one of their idents. The hold keeps the dictionary alive, so no other thread can ever be given the same one.
_thread = threading.local()


class Exclusive:
    """A non-blocking lock for ``with self._exclusive:`` around every call that writes an object's arrays; reads check it.

    The compiled kernels release the GIL (``nogil``), so two Python threads
    calling one object at once would both write its arrays: a silently
    corrupt state. The second caller gets ``RuntimeError`` instead, at once
    (it never waits: sharing one object between threads is a bug to fix, not
    a queue to join; one object per thread is the supported use).

    Reads. Every public read that returns a value derived from the state (a
    copy or a scalar: ``mean_state``, ``discount``, ``regret``, ``weights``...)
    is made through :meth:`read`, which takes no hold but checks the lock
    before and after the copy: it returns a value of one round, or raises the
    ``RuntimeError`` a second writer gets, while another thread is inside a
    call or if one began meanwhile (never a wait, and never a value of a round
    half taken, such as weights between an update's two passes), and after an
    interrupted update until ``load_state_dict`` (of a state taken before) or
    ``reset`` restores the object. Taking no hold, a read never makes another
    thread's call refuse: a thread monitoring or checkpointing a run cannot
    stop it. The longer reads, ``state_dict()``, copies and pickles (and so
    :func:`~memoa_fast.save_checkpoint`), are checked reads too: one that
    overlapped a call raises (take it again between calls), the call is served.
    An object's own calls hold the lock already and read its private, unlocked
    helpers. Calls that hold another object's lock to read it are writers of
    their own: ``Population.step_predict`` holds its server's (its kernel reads
    the weights while it writes the population, which a check after the fact
    could not undo), and a Dask object's reads that message its shards hold
    its guard (their messages share the one channel of its calls). Two kinds of
    reads are not checked: the read-only views of the live buffers
    (``Population.states``, ``costs``, ``Server.log_weights``...), which
    cannot refuse, so a view read while another thread steps is not a
    snapshot (copy it between calls, or take ``state_dict()``); and the round
    counters (``t``, ``n_updates``, ``n_recorded``...), single values stored
    once a round is complete. Several reads are several snapshots: for values
    of one round together, take ``state_dict()``.

    Interrupts. Python raises an asynchronous exception (``KeyboardInterrupt``
    from Ctrl-C, or a signal handler's) between any two bytecodes, also
    between a kernel's return and the Python bookkeeping after it. Two
    things make that safe:

    - the hold is recorded in one atomic step, ``dict.setdefault`` of
      ``(thread, frame of the caller)``, so a hold left behind by an
      interrupt inside ``__enter__``/``__exit__`` (or the ``with``
      statement's own exit) is recognised: its thread is this one and its
      frame is no longer running. It is taken over (by that very thread
      only, never by a later thread given the same ident) instead of refusing
      every later call as if another thread held it. A call made again
      while the holding frame still runs (a signal handler or a callback
      calling the object from inside one of its calls) is refused.
    - :attr:`interrupted`: a mutating call sets it (a plain attribute
      store) before its first write and clears it after its last, so a call
      cut short in between leaves it set, and every later ``with`` on this
      lock raises ``RuntimeError`` saying so and how to recover. Only
      :attr:`restoring` (used by ``load_state_dict`` and ``reset``) enters
      regardless; those calls clear the mark when they complete.

    Parameters
    ----------
    what : str
        The class name used in the error messages.
    recover : str, default "load_state_dict(...) from a state_dict or checkpoint taken before, or reset()"
        How to recover, for the message after an interrupted update.
    """

    __slots__ = ("_slot", "_what", "_recover", "interrupted", "restoring", "_holds")

    def __init__(self, what: str, recover: str = "load_state_dict(...) from a state_dict or checkpoint taken before, or reset()"):
        self._slot: dict = {}
        self._holds = 0  # how many holds were taken: a read compares it before and after (see read)
        self._what = what
        self._recover = recover
        #: None, or the name of the call that was cut short between its first and last write (see the class docstring).
        self.interrupted: str | None = None
        #: ``with lock.restoring:``: the same lock, entered even after an interrupted update (load_state_dict, reset).
        self.restoring = _Restoring(self)

    def __enter__(self) -> None:
        held = (_thread.__dict__, _getframe(1))
        if self._slot.setdefault(0, held) is not held:
            self._take_over(held)
        self._holds += 1  # by the holder only: no other thread writes it meanwhile
        if self.interrupted is not None:
            self._slot.pop(0, None)
            raise RuntimeError(self.interrupted_message())

    def __exit__(self, *exc) -> None:
        self._slot.pop(0, None)

    def held_here(self):
        """The current hold (an opaque token) if this thread holds the lock, else None.

        For an object whose call makes calls of its own public methods (which take the lock): it lends this token
        to them (:class:`memoa_fast.distributed.DaskPopulation`); a token of an earlier hold never matches a later one.
        """
        owner = self._slot.get(0)
        return owner if owner is not None and owner[0] is _thread.__dict__ else None

    def read(self, fn, *args):
        """``fn(*args)``, a read of the object's state (a copy, a scalar, a state dict), if no call held the lock meanwhile.

        A read takes no hold: it never makes a writer's call refuse (a thread that monitors or checkpoints a run
        must not stop it). It checks instead, before and after ``fn``: ``RuntimeError`` if a call held the lock at
        either moment or began in between (its count of holds moved), with the message a second caller gets, and
        after an interrupted update. So it returns a value of one round or raises, never a mixture (the kernels
        release the GIL: ``fn``'s copy may run beside another thread's kernel); it never waits. An exception ``fn``
        raises while a call began meanwhile becomes that ``RuntimeError`` (it read a state being written). Reads
        nest (one inside another's ``fn``: no hold either). ``fn`` allocates what it returns and nothing more is
        kept: a refused read's copy is garbage at once.
        """
        holds = self._holds
        if self._slot or self.interrupted is not None:  # (the usual read, no hold and no mark, skips the calls)
            self._refuse_read()
        try:
            value = fn(*args)
        except Exception as exc:  # an error of a read that met a state being written is that call's, not the read's
            if self._holds != holds:
                raise RuntimeError(self._busy) from exc
            raise
        # Refused: the copy is dropped first, else this frame, which the error's traceback keeps, keeps it too (a
        # thread that keeps its last error would keep a whole state alive).
        if self._holds != holds:  # a call began (and maybe ended) while fn read
            del value
            raise RuntimeError(self._busy)
        if self._slot or self.interrupted is not None:
            try:
                self._refuse_read()  # (returns for a hold an interrupt left in this thread)
            except RuntimeError:
                del value
                raise
        return value

    def _refuse_read(self) -> None:
        """``RuntimeError`` if a call holds the lock (another thread's, or one of this thread still running), or after an interrupt."""
        owner = self._slot.get(0)
        if owner is not None:
            if owner[0] is not _thread.__dict__:
                raise RuntimeError(self._busy)
            frame = _getframe(2)
            while frame is not None:  # this very thread: refused while the holding call runs (a callback inside it)
                if frame is owner[1]:
                    raise RuntimeError(f"{self._busy}; here by a call of this very thread that has not returned (a "
                                       "signal handler or a callback calling it from inside one of its calls)")
                frame = frame.f_back
            # else a hold an interrupt left behind in this thread, around no write (the mark covers the writes)
        if self.interrupted is not None:
            raise RuntimeError(self.interrupted_message())

    @property
    def _busy(self) -> str:
        return (f"this {self._what} is being used by another thread: a {self._what} is not thread-safe "
                "(use one object per thread)")

    def interrupted_message(self) -> str:
        """The ``RuntimeError`` message of a call refused after an interrupted update."""
        return (f"this {self._what} was interrupted in the middle of {self.interrupted} (KeyboardInterrupt, or another "
                f"exception, between its first and last write): its state may be partly updated, so it refuses every call "
                f"until restored: {self._recover}")

    def _take_over(self, held) -> None:
        """The lock is held: take over a hold left by an interrupt in this thread, else ``RuntimeError``."""
        owner = self._slot.get(0)
        if owner is None:  # released in between
            if self._slot.setdefault(0, held) is held:
                return
            owner = self._slot.get(0)
        busy = self._busy
        if owner is not None and owner[0] is held[0]:  # this very thread (see _thread)
            frame = held[1]
            while frame is not None:
                if frame is owner[1]:
                    raise RuntimeError(f"{busy}; here by a call of this very thread that has not returned (a signal "
                                       "handler or a callback calling it from inside one of its calls: not re-entrant either)")
                frame = frame.f_back
            self._slot[0] = held  # the holding frame has ended: an interrupt left the hold behind (this thread only)
            return
        raise RuntimeError(busy)


class _Restoring:
    """``with exclusive.restoring:``: :class:`Exclusive` without the refusal after an interrupted update."""

    __slots__ = ("_ex",)

    def __init__(self, ex: Exclusive):
        self._ex = ex

    def __enter__(self) -> None:
        ex = self._ex
        held = (_thread.__dict__, _getframe(1))
        if ex._slot.setdefault(0, held) is not held:
            ex._take_over(held)
        ex._holds += 1

    def __exit__(self, *exc) -> None:
        self._ex._slot.pop(0, None)
