"""Compile the fused Pipeline's kernels into Numba's on-disk cache (CI runs this beside ``memoa run``).

``memoa run`` (the default job) compiles its kernels on one core; this fills the other with the one large kernel file
the job never touches (``kernels/_pipeline_numba.py``, about 40 s of CPU), so that the tests load it from the cache
instead of compiling it in one of their two workers. Only that file's kernels: two processes compiling the same
kernel at once would each compile it. It runs the public ``Pipeline`` on a few clients, one round and one short run,
on one thread and on the default threads, which are the specialisations the tests use; the results are discarded.
"""
import time

import numpy as np

from memoa_fast import Pipeline

start = time.perf_counter()
for threads in (1, None):
    pipe = Pipeline(64, 2, threads=threads)
    pipe.round(np.full(2, 0.1))
    pipe.run(np.full((3, 2), 0.1))
print(f"ci: the Pipeline's kernels compiled (or loaded) in {time.perf_counter() - start:.0f} s", flush=True)
