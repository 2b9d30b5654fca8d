"""Compilation settings shared by every Numba kernel, in one place.

``MEMOA_FAST_CACHE=0`` turns Numba's on-disk cache off (it is on by default:
import plus first call then costs milliseconds instead of seconds). For a
read-only install, point ``NUMBA_CACHE_DIR`` at a writable folder.
"""
import os

# Numba's cache checks only each kernel's own source file: a kernel compiled
# with an old value of a constant below (or with an old version of a jitted
# function from another file) is not recompiled by itself. After changing
# this file, clear the caches (``__pycache__/*.nbi``, ``*.nbc``) or touch the
# kernel files; and keep every cached jitted call inside one file (_numba.py).
CACHE = os.environ.get("MEMOA_FAST_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")

# No blanket fastmath: 'nnan'/'ninf' would let LLVM delete the isfinite checks
# that keep a bad signal out of the mean field. 'reassoc' is left out so each
# kernel sums in the order the code says (bitwise reproducible, see CHUNK).
FASTMATH = {"nsz", "arcp", "contract"}

# Rows per reduction chunk. Every reduction sums each chunk serially, then the
# chunk partials serially in chunk order, so results do not depend on how many
# threads ran the chunks.
CHUNK = 4096

# Partial sums of different chunks sit in different 64-byte cache lines
# (8 doubles), so two threads never write the same line (no false sharing).
PAD = 8

# OpenMP threads that finish a parallel region sleep at once instead of
# spinning (GNU libgomp spins first by default). On a shared machine a
# spinning thread steals the core another process's thread needs, and a
# parallel region then waits for a descheduled thread: 50-390x slower steps
# with two processes at once (bench/concurrent_threads.py), 2-4x with the
# passive policy. Read by libgomp when it loads (Numba's omp layer, the Cython
# extension), so it is set here, before any backend; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
