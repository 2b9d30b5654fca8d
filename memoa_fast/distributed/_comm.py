"""Client-side plumbing of the Dask engine: the client, message sizes, lost-worker detection."""
from __future__ import annotations

import dataclasses
import os
import queue
import threading
import weakref
from dataclasses import dataclass

import numpy as np

DEFAULT_TIMEOUT = 600.0


class ShardLostError(RuntimeError):
    """A shard's worker was lost (or stopped answering); the population must be restored.

    Attributes
    ----------
    shard : int
        Index of the (first) lost shard.
    lo, hi : int
        Its agents, ``[lo, hi)``.
    worker : str
        Address of the worker that held it.
    step : int
        The population's step counter when the loss was seen.
    checkpoint : str or None
        The last checkpoint this population saved or restored, if any.
    """

    def __init__(self, message, *, shard, lo, hi, worker, step, checkpoint):
        super().__init__(message)
        self.shard, self.lo, self.hi, self.worker = shard, lo, hi, worker
        self.step, self.checkpoint = step, checkpoint


@dataclass
class CommStats:
    """What the client exchanged with the shards: payload sizes (array bytes + 8 per scalar).

    ``bytes_sent`` counts the ops' arguments, ``bytes_received`` the results,
    ``round_trips`` the messages that waited for an answer from every shard.
    The wire adds Dask's framing (a few hundred bytes per message).
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    round_trips: int = 0

    def reset(self) -> None:
        """Zero the counters."""
        self.bytes_sent = self.bytes_received = self.round_trips = 0


def payload_nbytes(obj) -> int:
    """Array bytes plus 8 per scalar of a message (lists, tuples and dicts are walked)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(payload_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(payload_nbytes(k) + payload_nbytes(v) for k, v in obj.items())
    if isinstance(obj, (str, bytes)):
        return len(obj)
    if isinstance(obj, os.PathLike):
        return len(os.fspath(obj))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    if obj is None:
        return 0
    return 8


def default_client(client):
    """``client`` checked, or the current default Dask client."""
    try:
        from distributed import Client, get_client
    except ImportError as exc:  # pragma: no cover - exercised only without dask
        raise ImportError(
            "DaskPopulation needs dask.distributed: install memoa-fast with the 'dask' extra "
            "(pip install 'memoa-fast[dask]')"
        ) from exc
    if client is None:
        try:
            return get_client()
        except ValueError:
            raise ValueError(
                "no Dask client: pass client=dask.distributed.Client(...) (or create one first, it becomes the default)"
            ) from None
    if not isinstance(client, Client):
        raise TypeError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    return client


def direct_client(client, timeout):
    """A client on ``client``'s scheduler that calls the workers directly."""
    from distributed import Client

    return Client(
        client.scheduler.address, direct_to_workers=True, security=client.security, set_as_default=False,
        timeout=timeout,
    )


# The clients of populations collected without close(), to be closed by a thread of ours (see closes_when_collected).
# Items are (client, timeout, close): close=False only hands a registration back (the population closed it itself).
_to_close: queue.SimpleQueue = queue.SimpleQueue()
_closer_lock = threading.Lock()
_closer: threading.Thread | None = None
# id(client) -> client for every client whose population may still be collected. Kept by identity, not counted: an
# item handled twice, or one of an interrupted registration, changes nothing (a count drifted, and the thread then
# ended while a client was still registered, leaving it open for good). Strong references keep the ids unique.
_registered: dict = {}


def _after_fork_in_child() -> None:
    """A forked child starts the closing machinery afresh: a new lock, queue and registry, no thread.

    The fork may have copied ``_closer_lock`` held by a thread the child lacks (its first registration then waited
    for good). And the parent's clients are the parent's: the finalizers of the populations the child copied put
    their clients on the parent's queue, which no thread of the child reads, so the child never closes a copy of a
    client (whose connections it shares with the parent).
    """
    global _closer_lock, _closer, _to_close, _registered
    _closer_lock = threading.Lock()
    _closer = None
    _to_close = queue.SimpleQueue()
    _registered = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def closes_when_collected(owner, client, timeout: float) -> weakref.finalize:
    """Close ``client`` (one ``owner`` opened itself, never one it was given) once ``owner`` is garbage-collected.

    Left open, such a client stays connected and, once its cluster closes, keeps reconnecting from its event-loop
    thread in the background. The collector runs a finalizer in whatever thread happens to allocate, in the middle
    of whatever that thread is doing: its client's own event loop (where a blocking close would wait for the loop
    it blocks), or distributed's ``Client(...)`` holding ``LoopRunner._lock``, which ``Client.close`` takes again
    (a blocking close there waits for itself for good). So the finalizer only puts the client on a
    :class:`queue.SimpleQueue` (reentrant: made for finalizers); a daemon thread ``memoa-close-client``, started
    here (never from a finalizer: starting a thread takes a lock of ``threading``), closes it, and ends once no
    registered client is left and nothing is queued. Not at interpreter exit (``atexit`` off: no close while it
    shuts down). The owner's own close must call :func:`release_closer` after closing the client itself.

    The finalizer exists before the registration: an interrupt between the two leaves a client that is still closed
    when its owner is collected (by this thread, or by the next one started), never a registration without one.
    """
    global _closer
    closer = weakref.finalize(owner, _to_close.put, (client, timeout, True))
    closer.atexit = False
    with _closer_lock:
        _registered[id(client)] = client
        if _closer is None or not _closer.is_alive():  # (not alive: gone with its process in a forked child)
            _closer = threading.Thread(target=_close_collected, name="memoa-close-client", daemon=True)
            _closer.start()  # set first: a start cut short leaves a thread not alive, replaced next time
    return closer


def release_closer(closer: weakref.finalize) -> None:
    """The owner closed its client itself: its registration is handed back (first) and its finalizer dropped."""
    info = closer.peek()
    if info is not None:
        client = info[2][0][0]
        _to_close.put((client, 0.0, False))
        closer.detach()


def _close_collected() -> None:
    """The ``memoa-close-client`` thread: close the queued clients until none is registered and none is queued."""
    global _closer
    while True:
        client, timeout, close = _to_close.get()
        if close:
            _close_quietly(client, timeout)
        with _closer_lock:
            if _registered.get(id(client)) is client:
                del _registered[id(client)]
            del client
            if not _registered and _to_close.empty():
                if _closer is threading.current_thread():
                    _closer = None
                return


def _close_quietly(client, timeout: float) -> None:
    try:
        client.close(timeout=timeout)
    except Exception:  # noqa: BLE001 - of a collected object: nobody to report to
        pass


def is_loss(exc, worker_alive: bool) -> bool:
    """Whether this failure came from a lost or silent worker (rather than from the shard's own code)."""
    from distributed.comm.core import CommClosedError

    if isinstance(exc, (CommClosedError, TimeoutError)):
        return True
    if isinstance(exc, RuntimeError) and "Worker holding Actor was lost" in str(exc):
        return True
    return isinstance(exc, OSError) and (not worker_alive or "Unable to contact Actor's worker" in str(exc))
