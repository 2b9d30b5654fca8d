"""Where every number lives in the kernels' small arrays: one place, named.

The population step reads and writes three small arrays besides the agents'
own ``x`` (states), ``s`` (signals), ``J`` (costs) and ``labels`` (classes):

``coef`` (K, ``N_COEF``), float64, read only
    One row per class ``j`` (K = 1 for the single-class game): the policy
    ``u_i = -gain_j (x_i - signal_j s_i - offset_j)`` and the stage-cost weights
    ``q_j, kappa_j, r_j``; column ``SIZE`` is the number of agents in the class.
    Columns: ``GAIN, SIGNAL, Q, KAPPA, R, SIZE``.

``mix`` (2, K, K + 1), float64, read only
    The offset of class ``j`` is linear in the class means and the global means:
    ``offset_j = sum_l mix[MIX_SIGNAL, j, l] sbar_l + mix[MIX_STATE, j, l] m_l
    + mix[MIX_SIGNAL, j, K] sbar + mix[MIX_STATE, j, K] m``, ``l < K``. Column
    ``K`` weighs the means over all agents (``m``, and ``sbar`` over every valid
    signal), which no fixed weighting of the class means gives when the
    classes' sizes or valid counts differ from the game's shares.

``field`` (``Layout.field_rows``, d), float64: the mean field, in rows
    ``class_state + l``: ``m_l(t)``, the mean state of class ``l``;
    ``class_signal + l``: ``sbar_l(t)``, the mean valid signal of class ``l``
    (kept from the last step when the class has no valid signal);
    ``class_next + l``: ``m_l(t+1)``; ``offset + j``: the policy offset of class j;
    ``state``: ``m(t)``, the mean of all states; ``signal``: ``sbar(t)``, the
    mean of all valid signals; ``next_state``: ``m(t+1)``.

``work`` (chunks, ``Layout.width``), float64: per-chunk partials, one row per
    chunk of ``CHUNK`` agents, merged serially in chunk order:
    ``state + l dp``: sums of states of class ``l`` (d values);
    ``signal + l dp``: sums of valid signals of class ``l``; ``mixture``: the
    sum ``sum_i p_i x_i``; ``count + l``: valid-signal count of class ``l``;
    ``max_cost``, ``arg_cost``: the largest cost and its first agent;
    ``lse_top``, ``lse_sum``: the server's log-sum-exp pieces. ``dp`` is ``d``
    rounded up to a cache line, so two chunks never share a line.

Every compiled kernel takes the :class:`Layout` (a named tuple of ints, which
Numba and Cython read as plain integers), so no kernel repeats an offset.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ._config import CHUNK, PAD

# Columns of ``coef``.
GAIN, SIGNAL, Q, KAPPA, R, SIZE = range(6)
N_COEF = 6
# Planes of ``mix``.
MIX_SIGNAL, MIX_STATE = 0, 1

# Server rules (``mixture_update``).
RULE_EG, RULE_HEDGE = 0, 1

# A signal is *valid* when every entry is finite and at most this in
# magnitude; any other signal row is treated like a missing one (the agent
# holds, and the row stays out of the signal means). Squares of valid values
# and of states built from them (<= 4e100) cannot overflow, so the mean field
# is finite for every float64 input.
SIGNAL_LIMIT = 1e50

# The largest |eta * loss| one server update applies: the largest finite
# double, so only a step that overflows is clipped (+-inf to +-STEP_LIMIT, and
# NaN, an inf - inf in eg's dot product, to +STEP_LIMIT). Every finite step is
# applied as it is, so any finite steps keep their order (MODEL.md section 5:
# the smallest step keeps the weight however large all the steps are), and
# ``log p_i - step_i`` stays in [-inf, STEP_LIMIT], never NaN: the largest
# log-weight before a step is >= -log N, so the largest after it is finite.
STEP_LIMIT = 1.7976931348623157e308  # sys.float_info.max

#: The smallest normal double: below it a running product ``discount * gamma`` loses its precision.
MIN_NORMAL = 2.2250738585072014e-308


def next_discount(discount: float, gamma: float, t: int) -> float:
    """``gamma**t`` from ``discount = gamma**(t - 1)``: the running product, or ``pow`` once it is subnormal.

    The product alone stalls: ``k 2**-1074 * gamma`` rounds back to ``k 2**-1074`` once ``k (1 - gamma) < 1/2``,
    so for every ``gamma > 1/2`` the discount stopped at a subnormal (``4.4e-323`` for 0.95, ``2.5e-321`` for 0.999)
    and weighed every later round's cost for ever, while ``gamma**t`` reaches 0. Below :data:`MIN_NORMAL` the
    discount is ``pow(gamma, t)``, which does reach 0; above it the product's bits are kept as they were. The
    engines, the certificates' sums and the pipeline reference call this; the compiled pipeline (``_rounds`` in
    ``_pipeline_numba``) inlines the same two lines.
    """
    discount *= gamma
    if 0.0 < discount < MIN_NORMAL:
        discount = math.pow(gamma, float(t))
    return discount



def padded(d: int) -> int:
    """``d`` rounded up to a whole number of cache lines of doubles."""
    return -(-d // PAD) * PAD


class Layout(NamedTuple):
    """Offsets of the ``work`` columns and ``field`` rows for K classes of dimension d."""

    n_classes: int
    dim: int
    # work columns
    state: int
    signal: int
    mixture: int
    count: int
    max_cost: int
    arg_cost: int
    lse_top: int
    lse_sum: int
    width: int
    # field rows
    class_state: int
    class_signal: int
    class_next: int
    offset: int
    field_state: int
    field_signal: int
    field_next: int
    field_rows: int


# Positions of the Layout's fields. Compiled code receives the layout as a plain
# tuple (``lay[:]``: Numba dispatches a plain tuple in 0.6 us, a NamedTuple in
# 2.4 us) and reads ``lay[LAY_STATE]`` where Python reads ``lay.state``.
(LAY_N_CLASSES, LAY_DIM, LAY_STATE, LAY_SIGNAL, LAY_MIXTURE, LAY_COUNT, LAY_MAX_COST, LAY_ARG_COST, LAY_LSE_TOP,
 LAY_LSE_SUM, LAY_WIDTH, LAY_CLASS_STATE, LAY_CLASS_SIGNAL, LAY_CLASS_NEXT, LAY_OFFSET, LAY_FIELD_STATE,
 LAY_FIELD_SIGNAL, LAY_FIELD_NEXT, LAY_FIELD_ROWS) = range(19)


def layout(n_classes: int, dim: int) -> Layout:
    """The :class:`Layout` of a population with ``n_classes`` classes in dimension ``dim``."""
    K, dp = n_classes, padded(dim)
    count = (2 * K + 1) * dp
    scalars = count + padded(K)
    return Layout(
        n_classes=K, dim=dim,
        state=0, signal=K * dp, mixture=2 * K * dp, count=count,
        max_cost=scalars, arg_cost=scalars + 1, lse_top=scalars + 2, lse_sum=scalars + 3, width=scalars + PAD,
        class_state=0, class_signal=K, class_next=2 * K, offset=3 * K,
        field_state=4 * K, field_signal=4 * K + 1, field_next=4 * K + 2, field_rows=4 * K + 3,
    )


def used_columns(lay: Layout, part: str):
    """The ``work`` columns a part of a step fills, without the cache-line padding (what a shard sends).

    ``part`` is ``"step"`` (class sums of states and valid signals, counts, the
    worst cost: what the signal and move passes leave), ``"mixture"`` or
    ``"lse"``. A Dask shard sends ``work[:, cols]`` and the client scatters it
    back into a zeroed ``work`` of the full width, ``O(K d)`` numbers per row.
    """
    import numpy as np

    dp = padded(lay.dim)
    d, K = lay.dim, lay.n_classes
    if part == "step":
        blocks = [np.arange(start + l * dp, start + l * dp + d) for start in (lay.state, lay.signal) for l in range(K)]
        extra = [np.arange(lay.count, lay.count + K), np.array([lay.max_cost, lay.arg_cost])]
        return np.concatenate(blocks + extra)
    if part == "mixture":
        return np.arange(lay.mixture, lay.mixture + d)
    if part == "lse":
        return np.array([lay.lse_top, lay.lse_sum])
    raise ValueError(f"part must be 'step', 'mixture' or 'lse', got {part!r}")


def n_chunks(n_agents: int) -> int:
    """Chunks of ``CHUNK`` agents (the last one may be short)."""
    return -(-n_agents // CHUNK)


def work_shape(n_agents: int, lay: Layout) -> tuple[int, int]:
    """Shape of the ``work`` array of ``n_agents`` agents."""
    return n_chunks(n_agents), lay.width
