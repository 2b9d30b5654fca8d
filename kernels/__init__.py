"""Compiled kernels of memoa-fast (installed as ``memoa_fast.kernels``).

Private to the package: the public API lives in :mod:`memoa_fast`. Every
backend module (``_numba``, ``_cython``, ``_reference``) has the same
in-place functions with the same signatures; the kernels trust their inputs
(C-contiguous float64, int64 labels, shapes checked by the caller).

What the package may use from here is re-exported below: the names of the
small arrays' rows and columns (:mod:`._layout`) and the compilation
settings. Nothing outside ``kernels/`` imports a private module by name;
:mod:`memoa_fast._backends` loads a backend module by its backend's name.

Numba's on-disk cache (``CACHE``) never needs clearing by hand: every jitted
module ends with ``seal(globals())`` (:mod:`._seal`), which ties its cached
code to the contents of its own file and of every file it imports values
from (``_config``, ``_layout``, ``_pipeline_reference``, ...), wherever
Numba keeps the cache.
"""
from . import _seal as _seal  # first: records the state of the files before any module is read from them (_seal.snapshot)
from ._config import CHUNK, FASTMATH, PAD, SQUARE_CAP
from ._layout import (
    GAIN,
    KAPPA,
    MIN_NORMAL,
    MIX_SIGNAL,
    MIX_STATE,
    N_COEF,
    RULE_EG,
    RULE_HEDGE,
    SIGNAL,
    SIGNAL_LIMIT,
    SIZE,
    Layout,
    Q,
    R,
    layout,
    n_chunks,
    next_discount,
    padded,
    used_columns,
    work_shape,
)

__all__ = [
    "CACHE", "CHUNK", "FASTMATH", "PAD", "SQUARE_CAP", "GAIN", "SIGNAL", "Q", "KAPPA", "R", "SIZE", "N_COEF", "MIX_SIGNAL",
    "MIX_STATE", "RULE_EG", "RULE_HEDGE", "SIGNAL_LIMIT", "Layout", "layout", "n_chunks", "padded", "used_columns", "work_shape",
    "MIN_NORMAL", "next_discount",
]


def __getattr__(name: str):
    if name == "CACHE":  # asked when read (it imports Numba): see kernels/_config.py
        from . import _config

        return _config.CACHE
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
