"""Placement of the arrays a kernel streams through together.

A round of the fused pipeline walks client ``k`` through a dozen arrays at
once (states, signals, costs, weights, error records, noise scales, the
forecasters' planes). Where those arrays start is up to the allocator, and
when their elements ``k`` sit at (nearly) the same offset in their 4 KiB
pages, they compete for the same cache-line sets of L1 and a load can wait
behind an unrelated store whose address agrees in its low 12 bits. In one
process here ``np.zeros`` put the ten state arrays of ``Pipeline(131072)``
16 bytes apart, one after the other; placed each on its own cache line of
the page, ``Pipeline.run`` took 0.70-0.86x the time on one thread and
0.73-0.91x on two (six runs of ``bench/bench_fused_pipeline.py
--placement``: the same values, the same bits). :func:`staggered_zeros`
makes the placement a property of the code instead of the allocator's
history.
"""
from __future__ import annotations

import math

import numpy as np

PAGE = 4096
LINE = 64
# Array i starts i * STAGGER bytes past a page boundary (mod PAGE): five cache lines apart, and 5 is prime to the
# 64 lines of a page, so the first 64 arrays start on 64 different lines.
STAGGER = 5 * LINE


def staggered_zeros(shapes) -> list[np.ndarray]:
    """Zeroed C-contiguous float64 arrays of ``shapes``, array ``i`` starting ``i * STAGGER`` bytes (mod 4096) into a page.

    One buffer holds them all (``np.zeros``, so untouched pages cost nothing
    until written); each array is a view of it, disjoint from the others,
    64-byte aligned. The padding is under one page per array.
    """
    sizes = [math.prod(shape) * 8 for shape in shapes]
    offsets = []
    end = 0
    for i, size in enumerate(sizes):
        start = end + ((i * STAGGER) % PAGE - end) % PAGE  # the first position >= end at the wanted page offset
        offsets.append(start)
        end = start + size
    raw = np.zeros(end + PAGE, dtype=np.uint8)
    base = -raw.ctypes.data % PAGE  # the buffer's first page boundary
    return [raw[base + start:base + start + size].view(np.float64).reshape(shape)
            for start, size, shape in zip(offsets, sizes, shapes)]
