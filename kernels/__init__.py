"""Compiled kernels of memoa-fast (installed as ``memoa_fast.kernels``).

Private: the public API lives in :mod:`memoa_fast`. Every backend module
(``_numba``, ``_cython``, ``_reference``) exposes the same in-place functions
with the same signatures; the kernels trust their inputs (C-contiguous
float64, shapes checked by the caller).

Work arrays: reductions write one row of ``work`` per chunk of ``CHUNK``
agents; see :func:`work_shape` for the row layout.
"""
from ._config import CACHE, CHUNK, FASTMATH, PAD

__all__ = ["CACHE", "CHUNK", "FASTMATH", "PAD", "work_shape", "padded"]


def padded(d: int) -> int:
    """``d`` rounded up to a whole number of cache lines of doubles."""
    return -(-d // PAD) * PAD


def work_shape(n_agents: int, dim: int) -> tuple[int, int]:
    """Shape of the per-chunk work array for ``n_agents`` agents of dimension ``dim``.

    Row ``c`` holds chunk ``c``'s partials: columns ``[0, dim)`` the sum of
    states (or of weighted states for the server), ``[dp, dp + dim)`` the sum of
    finite signals, then ``2 dp + 0`` the count of finite signals, ``+1`` the
    largest cost (or the log-sum-exp maximum), ``+2`` its agent index (or the
    scaled sum of exponentials), with ``dp = padded(dim)``.
    """
    n_chunks = -(-n_agents // CHUNK)
    return n_chunks, 2 * padded(dim) + PAD
