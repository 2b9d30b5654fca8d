"""Compilation settings shared by every Numba kernel, in one place.

``MEMOA_FAST_CACHE=0`` turns Numba's on-disk cache off (it is on by default:
import plus first call then costs milliseconds instead of seconds). For a
read-only install, point ``NUMBA_CACHE_DIR`` at a writable folder; with no
writable folder at all the kernels are compiled in memory, with one
warning (``CACHE`` is then False). The cache never needs clearing: each
jitted module's cached code is tied to the contents of its file and of
every file it imports values from, this one included (:mod:`._seal`), and a
broken cache file is a miss that is compiled and overwritten.
"""
import os

# Numba freezes the values below into the machine code, and its own cache
# checks only each kernel's source file; every jitted module therefore ends
# with ``seal(globals())`` (_seal.py), which makes its cache also check the
# files it imports values from, this one included: after an edit or a git
# checkout the stale code is ignored and recompiled, with no cache to clear.
# A jitted function from another file is not covered (its code is not a
# value): keep every cached jitted call inside one file (Numba cache rule).
#
# CACHE (the ``cache=`` of every kernel) is computed each time a jitted module
# imports it, just before its kernels are decorated: the user's choice
# (MEMOA_FAST_CACHE), and whether Numba finds a writable cache folder for this
# folder's files (_seal.cache_usable; Numba raised at decoration when it found
# none). Asked lazily, so that ``import memoa_fast`` does not import Numba.
WANT_CACHE = os.environ.get("MEMOA_FAST_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def __getattr__(name: str):
    if name == "CACHE":
        if not WANT_CACHE:
            return False
        from ._seal import cache_usable

        return cache_usable(__file__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# No blanket fastmath: 'nnan'/'ninf' would let LLVM delete the isfinite checks
# that keep a bad signal out of the mean field. 'reassoc' is left out so each
# kernel sums in the order the code says (bitwise reproducible, see CHUNK).
FASTMATH = {"nsz", "arcp", "contract"}

# The forecasters' squared features are capped: a lag v enters as (v, min(v^2, SQUARE_CAP), ...). In a run's unit
# (the series z-scored on its burn-in) that is 8 standard deviations: within it the features are the plain squares,
# bit for bit; beyond it the squares, which grow fastest, would dominate |phi|^2, so the NLMS step on the linear weights
# (about mu e / v^2 in forecast units) all but stops and the forecast becomes a quadratic in v fitted at one level, far
# off as soon as the series moves (a series that leaves its burn-in's scale: a pegged currency that moves, a growth).
SQUARE_CAP = 64.0

# Rows per reduction chunk. Every reduction sums each chunk serially, then the
# chunk partials serially in chunk order, so results do not depend on how many
# threads ran the chunks.
CHUNK = 4096
# A prange index reaches its loop body as uint64; the parallel drivers hand each chunk function np.int64(c), the type
# of a serial driver's range index, so that both share one compiled specialisation of it (a second one cost 2-7 s of
# compile each).

# Partial sums of different chunks sit in different 64-byte cache lines
# (8 doubles), so two threads never write the same line (no false sharing).
PAD = 8

# OpenMP threads that finish a parallel region sleep almost at once instead of
# spinning for milliseconds (GNU libgomp's default). On a shared machine a
# spinning thread steals the core another process's thread needs, and a
# parallel region then waits for a descheduled thread: 50-390x slower steps
# with two processes at once (bench/concurrent_threads.py), 2-4x with the
# passive policy.
#
# Waking a sleeping thread is not free either: an empty two-thread region
# takes 45-70 us here when its second thread sleeps (its virtual CPU halts),
# 1.6 us when it is still awake, and a pipeline round on two threads takes
# 0.3-0.6 ms. So a thread first spins SPIN_COUNT turns of libgomp's wait loop
# (under 10 us here: a region entered 10 us after the last found the thread
# asleep; a turn is one pause instruction and a load): long
# enough to catch the region that follows at once (Pipeline.run's next round,
# Pipeline.round's pass B), too short to hold a core another process needs.
# Measured against sleeping at once, in alternating processes (ratios within
# each run; bench_fused_pipeline.py, concurrent_threads.py): Pipeline.run on
# two threads over one, median 1.79 against 1.64 (nine and ten runs, spread
# 1.32-2.03 and 1.46-1.79: the machine's noise is as large as the gain); the
# Pipeline's default over threads=1 at 32768 clients, alone 0.59-0.85 against
# 0.84-0.95, two processes at once 1.13-1.18 against 0.90-1.09 (the limit is
# 1.5); an explicit threads=2 step of 10^4 agents under two processes, 0.07 ms
# against 0.04 (one thread: 0.02). 1000 turns cost up to 1.35 under two
# processes, 3000-10000 turns 1.6-3.3x.
#
# Read by libgomp when it loads (Numba's omp layer, the Cython extension), so
# set here, before any backend. A user who sets either variable gets exactly
# what they set, and the environment their child processes inherit is theirs
# (OMP_WAIT_POLICY=PASSIVE alone: no spinning; GOMP_SPINCOUNT alone: that spin).
SPIN_COUNT = 300
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
