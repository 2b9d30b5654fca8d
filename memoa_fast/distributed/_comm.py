"""Client-side plumbing of the Dask engine: the client, message sizes, lost-worker detection."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
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


def close_own_client(client, timeout: float) -> None:
    """Close a client a population opened itself (never one it was given), when the population is collected.

    The finalizer of a :class:`DaskPopulation` dropped without ``close()``: left open, that client stays
    connected and, once its cluster closes, keeps reconnecting from its event-loop thread in the background.
    The garbage collector runs the finalizer in whatever thread it runs in, also an event loop's (the client's
    own included, where a blocking close would wait for the very loop it blocks): there a short thread of its
    own closes the client instead. Errors are ignored (there is no caller to give them to).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no event loop runs in this thread: close here
        _close_quietly(client, timeout)
    else:
        threading.Thread(target=_close_quietly, args=(client, timeout), name="memoa-close-client", daemon=True).start()


def _close_quietly(client, timeout: float) -> None:
    try:
        client.close(timeout=timeout)
    except Exception:  # noqa: BLE001 - in a finalizer: nobody to report to
        pass


def is_loss(exc, worker_alive: bool) -> bool:
    """Whether this failure came from a lost or silent worker (rather than from the shard's own code)."""
    from distributed.comm.core import CommClosedError

    if isinstance(exc, (CommClosedError, TimeoutError)):
        return True
    if isinstance(exc, RuntimeError) and "Worker holding Actor was lost" in str(exc):
        return True
    return isinstance(exc, OSError) and (not worker_alive or "Unable to contact Actor's worker" in str(exc))
