"""Backend selection: which kernel module runs a population or a server.

Modules are imported on first use, so ``import memoa_fast`` pays neither
Numba's import nor any JIT, and the Cython backend never touches Numba.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

from ._validation import available_threads, check_backend, check_threads

_MODULES = {"numba": "memoa_fast.kernels._numba", "cython": "memoa_fast.kernels._cython", "numpy": "memoa_fast.kernels._reference"}

# Below this many agents one thread beats two: a parallel region costs about
# 10 us of fork/join per call, and a population of fewer than two CHUNKs has
# only one chunk to give. Measured crossover of the fused step on 2 cores:
# between 4096 and 8192 agents (bench/README.md, "Parallel threshold").
PARALLEL_THRESHOLD = 8_192

# The default thread choice (threads=None) uses more than one thread only when
# one parallel region has at least this many values (N x d) to go through.
# Below it, on a shared machine, two threads lose: a region then takes well
# under a millisecond, and waiting for a second thread that another process
# holds costs more than the region itself. Measured with
# bench/concurrent_threads.py (two processes at once, each stepping N = 1e4 and
# 1e5 agents with d = 1 and 4): with two threads by default, each step was
# 2-4x slower than on one thread even with OMP_WAIT_POLICY=PASSIVE, and 50-390x
# slower with libgomp's default spin-then-sleep wait. An explicit threads=k is
# always honoured (above parallel_threshold agents).
DEFAULT_PARALLEL_WORK = 1 << 20

# The same for the fused pipeline round (Pipeline): its default uses every
# thread from 2**15 values (N x d) per round. A round is compute-bound (the
# exp, the normals, the NLMS update: about 8 ns per client on one core, 4-6x a
# step's time per value), so two processes at once cost it little where they
# cost the memory-bound step 2-4x. Measured on 2 cores, Pipeline.round and
# Pipeline.run, time on two threads over time on one: alone 0.7-0.9 at 32768
# clients and 0.5-0.7 at 10^5; two processes at once 1.03-1.14 at both
# (within the 1.5 the guard allows); at 16384 clients two threads lost alone
# (1.27), at 8192 by 1.5-2.2x. bench/concurrent_threads.py checks it.
PIPELINE_PARALLEL_WORK = 1 << 15


SOURCE_TREE_HINT = (
    "memoa_fast.kernels is missing: this memoa_fast was imported from a source checkout, where the "
    "kernels live in the top-level kernels/ folder and only become memoa_fast.kernels once installed. "
    "Install with `python3 -m pip install .` and run outside the checkout, or with `python3 -P` "
    "(which keeps the current folder off sys.path)."
)


__all__ = ["DEFAULT_PARALLEL_WORK", "PARALLEL_THRESHOLD", "PIPELINE_PARALLEL_WORK", "available_threads", "load", "load_noise",
           "resolve_threads", "usable_threads"]


def load(backend: str) -> ModuleType:
    """Return the kernel module of ``backend`` ("numba", "cython" or "numpy")."""
    backend = check_backend(backend)
    try:
        return importlib.import_module(_MODULES[backend])
    except ImportError as exc:
        if getattr(exc, "name", None) == "memoa_fast.kernels":
            raise ImportError(SOURCE_TREE_HINT) from exc
        if backend == "cython":
            raise ImportError(
                "backend='cython' needs the compiled extension memoa_fast.kernels._cython, which is missing: "
                "install memoa-fast with `pip install .` from a checkout (a C compiler is needed), "
                f"or use backend='numba'. ({exc})"
            ) from exc
        raise


def load_noise() -> ModuleType:
    """The counter-based noise kernels of worker-side signal sources (Numba)."""
    return importlib.import_module("memoa_fast.kernels._noise")


def resolve_threads(threads, n_agents: int, parallel_threshold: int = PARALLEL_THRESHOLD,
                    dim: int = 1, default_work: int = DEFAULT_PARALLEL_WORK) -> tuple[int, int]:
    """Return ``(threads_requested, threads_used)`` for kernels over ``n_agents`` x ``dim`` values.

    ``threads=None`` (the default) asks for every thread this process may use
    (its CPU affinity, capped by Numba's limit) but uses them only for a
    region of at least ``default_work`` values (:data:`DEFAULT_PARALLEL_WORK`
    for the population step and the server, :data:`PIPELINE_PARALLEL_WORK`
    for the fused pipeline); an explicit ``threads`` is used as given for at least
    ``parallel_threshold`` agents. Fewer agents than ``parallel_threshold``
    always run on one thread.
    """
    requested = check_threads(threads)
    if n_agents < parallel_threshold:
        return requested, 1
    if threads is None and n_agents * dim < default_work:
        return requested, 1
    return requested, usable_threads(requested)


# --------------------------------------------------------------------------- fork safety
# GNU OpenMP (libgomp) runs every parallel kernel here: Numba's default threading layer on Linux is "omp" (no TBB),
# and the Cython kernels are built with -fopenmp. It cannot run a parallel region in a child forked after its
# threads started: Numba's layer kills the child (SIGTERM, "Terminating: fork() called from a process already using
# GNU OpenMP, this is unsafe."), and the Cython kernels' region waits forever for threads the child does not have.
# multiprocessing's default start method on Linux is fork, so a pool of workers started after a parallel step would
# die or hang. Every thread count a kernel gets goes through usable_threads: in such a child it is 1, which gives the
# same bits (the kernels reduce in a fixed chunk order, whatever the thread count) on one core.
_OPENMP = {"started": False, "forked": False}


def _after_fork_in_child() -> None:
    if _OPENMP["started"]:
        _OPENMP["forked"] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def usable_threads(threads: int) -> int:
    """The threads a kernel call may run on: ``threads``, or 1 in a process forked after OpenMP threads started.

    An object calls this with its thread count (:func:`resolve_threads` at
    construction, and again at every call, so that an object inherited through
    ``fork`` also runs on one thread in the child). A count above 1 marks this
    process as one whose OpenMP threads may have started (so an object that
    will run parallel kernels marks it when it is built: a child forked after
    that runs on one thread even if no parallel kernel ran yet; the results are
    the same). A child warns once (``RuntimeWarning``): for parallel kernels
    in worker processes, use the ``"spawn"`` or ``"forkserver"`` start method
    of :mod:`multiprocessing`.
    """
    if threads > 1:
        if _OPENMP["forked"]:
            if not _OPENMP.get("warned"):
                _OPENMP["warned"] = True
                warnings.warn(
                    "memoa_fast: this process was forked after OpenMP threads had started in its parent, and GNU OpenMP "
                    "cannot run in such a child: its kernels run on one thread (the same results). For parallel "
                    "kernels in worker processes, use multiprocessing's 'spawn' or 'forkserver' start method.",
                    RuntimeWarning, stacklevel=3)
            return 1
        _OPENMP["started"] = True
    return threads
