"""The Dask engine: populations sharded over the workers of a ``dask.distributed`` cluster.

A :class:`DaskPopulation` splits its N agents into shards of whole
``CHUNK``-agent blocks. Each shard lives on one worker for the whole run, as
a Dask actor holding its states, costs, labels, signal buffer, server
log-weights and (optionally) its own signal source; the compiled kernels step
it in place with the same two passes one machine's step runs. Per step the
client sends each shard its signals (or nothing, with a worker-side source)
and the merged mean field (``O(K d)`` numbers), and gathers per-shard partial
rows (``O(K d)`` numbers): agent arrays never cross the network unless you ask
for them (:attr:`DaskPopulation.states`, :attr:`DaskPopulation.costs`, a
checkpoint) or pass the signals from the client.

The API is :class:`~memoa_fast.Population`'s, and :class:`DaskServer` is
:class:`~memoa_fast.Server`'s with its weights sharded beside the states. To
run on Dask, build a :class:`DaskPopulation` (the one way to get one).

Exactness: the kernels reduce over fixed chunks of ``CHUNK`` agents and merge
the chunk partials serially in chunk order; shard boundaries are multiples
of ``CHUNK``. With ``exact=True`` the client gathers one partial row per
chunk and merges them with the kernels' own merge functions, so a sharded run
is bitwise the single-process Numba one. By default each shard folds its
chunks into one row: sums then round differently in the last bit (results
agree to about ``1e-15`` of the summands' magnitudes; the tests require
``1e-12``; a mean that cancels to near 0 may differ by more than itself).

Checkpoints are written by the workers: :meth:`DaskPopulation.save` has
each shard write its own file and the client write a small manifest last,
which makes the set atomic; a restore onto any shard count (or onto a
one-machine :class:`~memoa_fast.Population`) reads the rows each shard needs
from the files that hold them. The client moves ``O(shards)`` bytes
(:mod:`memoa_fast.checkpoint`).

Modules: :mod:`.population` (the client side of a population and its
protocol), :mod:`._shard` (the actor), :mod:`.server` (the sharded mixture),
:mod:`.signals` (worker-side signal sources), :mod:`._comm` (client plumbing).
"""
from ._comm import CommStats, ShardLostError
from .population import DaskPopulation, ShardedStates, shard_bounds
from .server import DaskServer
from .signals import NoisyLastValueSignals

__all__ = [
    "CommStats",
    "DaskPopulation",
    "DaskServer",
    "NoisyLastValueSignals",
    "ShardLostError",
    "ShardedStates",
    "shard_bounds",
]
