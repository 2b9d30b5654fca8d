"""The one thread-count guard of every Numba kernel module (plain Python, no JIT)."""
import os

import numba

# The process whose parallel kernels started Numba's OpenMP threads (0: none yet). A forked child inherits it, and
# a parallel region there would be fatal (see Threads.__enter__).
_STARTED = [0]


class Threads:
    """Run a parallel Numba kernel on exactly ``threads`` threads, restoring the global setting after.

    ``with Threads(2): kernel_parallel(...)``. Changing Numba's thread count is
    process-global, so the previous value is put back in ``__exit__`` even when
    the kernel raises.

    In a process forked after this one's parallel kernels started (GNU OpenMP,
    Numba's ``omp`` layer, is not fork-safe: Numba would end the child with
    SIGTERM), ``__enter__`` raises ``RuntimeError`` instead. The objects never
    get there: they ask ``memoa_fast._backends.usable_threads``, which gives 1
    (the serial kernels) in such a child.
    """

    __slots__ = ("threads", "previous")

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        pid = os.getpid()
        if _STARTED[0] != pid:
            if _STARTED[0]:
                raise RuntimeError(
                    "a parallel Numba kernel was called in a process forked after Numba's OpenMP threads had started "
                    "in its parent; GNU OpenMP cannot run there (Numba would kill the process). Call it with threads=1, "
                    "or use multiprocessing's 'spawn' or 'forkserver' start method")
            _STARTED[0] = pid
        self.previous = numba.get_num_threads()
        if self.previous != self.threads:
            numba.set_num_threads(self.threads)

    def __exit__(self, *exc):
        if self.previous != self.threads:
            numba.set_num_threads(self.previous)


def max_threads():
    """Threads Numba was started with (``NUMBA_NUM_THREADS``)."""
    return numba.config.NUMBA_NUM_THREADS
