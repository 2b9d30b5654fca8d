"""Backend selection: which kernel module runs a population or a server.

Modules are imported on first use, so ``import memoa_fast`` pays neither
Numba's import nor any JIT, and the Cython backend never touches Numba.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ._validation import check_backend, check_threads

_MODULES = {"numba": "memoa_fast.kernels._numba", "cython": "memoa_fast.kernels._cython", "numpy": "memoa_fast.kernels._reference"}

# Below this many agents one thread beats two: a parallel region costs about
# 10 us of fork/join per call, and a population of fewer than two CHUNKs has
# only one chunk to give. Measured crossover of the fused step on 2 cores:
# between 4096 and 8192 agents (bench/README.md, "Parallel threshold").
PARALLEL_THRESHOLD = 8_192


SOURCE_TREE_HINT = (
    "memoa_fast.kernels is missing: this memoa_fast was imported from a source checkout, where the "
    "kernels live in the top-level kernels/ folder and only become memoa_fast.kernels once installed. "
    "Install with `python3 -m pip install .` and run outside the checkout, or with `python3 -P` "
    "(which keeps the current folder off sys.path)."
)


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


def available_threads() -> int:
    """Threads this process may use by default (see :func:`memoa_fast._validation.check_threads`)."""
    return check_threads(None)


def resolve_threads(threads, n_agents: int, parallel_threshold: int = PARALLEL_THRESHOLD) -> tuple[int, int]:
    """Return ``(threads_requested, threads_used)``; small populations run on one thread."""
    requested = check_threads(threads)
    return requested, (1 if n_agents < parallel_threshold else requested)
