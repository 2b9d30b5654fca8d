"""Write the saved states of tests/test_checkpoint.py's old-format test with the code of main 99c2a56.

The signal sources of that version saved no settings (no ``seed``, ``noise_range``, ``mu``, ``block_size``,
``low``, ``high`` in their state's ``"shared"`` part); these files are what a user saved then, and they must
load exactly as before. Regenerate (only if the file formats change on purpose) with that version's package
first on ``sys.path``::

    git archive 99c2a56 | tar -x -C /tmp/main && cp -r /tmp/main/kernels /tmp/main/memoa_fast/kernels
    cd tests/data/old_sources && PYTHONPATH=/tmp/main python make_old_sources.py

The runs are those of ``tests/test_checkpoint.py`` (``_old_run_*``), cut after ``T_SAVED`` rounds.
"""
import functools
import pickle
import shutil
from pathlib import Path

import numpy as np
from distributed import Client, LocalCluster

from memoa_fast import ClientForecasters, Game, Population, Server, save_checkpoint
from memoa_fast.distributed import DaskPopulation, DaskServer, NoisyLastValueSignals

GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
T_SAVED = 3
TARGETS = np.sin(0.7 * np.arange(12.0))[:, None] * np.array([1.0, -0.5])  # (T, 2)
HERE = Path(__file__).parent


def forecasters():
    return ClientForecasters(6, 2, lags=2, noise_range=(0.1, 2.0), mu=0.3, seed=2**63 - 1, block_size=4, backend="numpy",
                             threads=1)


def main():
    pop, server, source = Population(GAME, 6, 2, threads=1), Server(6, 2, rule="hedge", eta=0.5, alpha=0.01, threads=1), forecasters()
    for t in range(T_SAVED):
        pop.step(source.observe(TARGETS[t]))
        server.update(pop.states, TARGETS[t + 1])
    save_checkpoint(HERE / "forecasters.npz", pop, server, source=source)
    (HERE / "forecasters.pkl").write_bytes(pickle.dumps(source, protocol=4))

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
    client = Client(cluster)
    try:
        factory = functools.partial(NoisyLastValueSignals, low=0.1, high=3.0)
        dpop = DaskPopulation(GAME, 50, 1, client=client, n_shards=1, exact=True, signals=factory, seed=5)
        dserver = DaskServer(dpop, rule="eg", eta=0.5, alpha=0.01)
        for t in range(T_SAVED):
            dpop.observe(TARGETS[t, :1])
            x = dpop.step()
            dserver.update(x, TARGETS[t + 1, :1])
        shutil.rmtree(HERE / "noisy.ckpt.shards", ignore_errors=True)
        dpop.save(HERE / "noisy.ckpt", dserver)
        dpop.close()
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
