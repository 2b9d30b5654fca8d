"""The one thread-count guard of every Numba kernel module (plain Python, no JIT)."""
import numba


class Threads:
    """Run a parallel Numba kernel on exactly ``threads`` threads, restoring the global setting after.

    ``with Threads(2): kernel_parallel(...)``. Changing Numba's thread count is
    process-global, so the previous value is put back in ``__exit__`` even when
    the kernel raises.
    """

    __slots__ = ("threads", "previous")

    def __init__(self, threads):
        self.threads = threads

    def __enter__(self):
        self.previous = numba.get_num_threads()
        if self.previous != self.threads:
            numba.set_num_threads(self.threads)

    def __exit__(self, *exc):
        if self.previous != self.threads:
            numba.set_num_threads(self.previous)


def max_threads():
    """Threads Numba was started with (``NUMBA_NUM_THREADS``)."""
    return numba.config.NUMBA_NUM_THREADS
