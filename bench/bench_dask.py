"""Sharded populations on a two-worker LocalCluster against one process.

Measures, in one run:

1. agent-steps per second at N (default 10^7) of one round of the
   time-series loop (``observe`` the stream, ``step``, server ``predict`` and
   ``update``, rule hedge), for a single-process ``Population`` + ``Server``
   (1 and 2 threads) and a ``DaskPopulation`` + ``DaskServer`` on a
   LocalCluster of two worker processes with one thread each (per-shard and
   exact per-chunk partials). Two signal sources, generated where the agents
   live: ``held`` (a fixed buffer: the engine and its messages only) and
   ``noisy`` (``NoisyLastValueSignals``: every client draws a fresh noisy
   observation each round). Repeats are interleaved, so the ratios are
   measured under the same machine load;
2. bytes exchanged per round against N: the payload the client sends and
   receives (``DaskPopulation.comm``) and what the client process's Dask
   TCP comms really wrote and read (every frame, all of Dask's traffic
   included: framing, heartbeats; see ``WireCounter``);
3. the latency floor: one empty round trip to every shard;
4. for contrast, signals sent from the client (N x d numbers per round);
5. (``--checkpoint-only``) checkpoint save and restore at N: each shard
   writing and reading its own file against everything gathered through the
   client into one file (wall time, client payload and socket bytes).

Run from the repository root (with the package installed)::

    python -P bench/bench_dask.py                 # N = 10^7, about 5 minutes here
    python -P bench/bench_dask.py --n 1000000 --steps 5 --json out.json
    python -P bench/bench_dask.py --checkpoint-only --repeats 3   # 5. below, about a minute

or as a pytest-benchmark suite (N = 10^6, noisy worker-side signals; agent-steps
per second and payload bytes per round in ``extra_info``)::

    python -P -m pytest bench/bench_dask.py -p no:cacheprovider

Results and their reading: ``bench/README.md``, section "Sharded on Dask".
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import numpy as np
import pytest

from memoa_fast import Game, Population, Server
from memoa_fast.distributed import DaskPopulation, DaskServer, NoisyLastValueSignals

GAME = Game(q=1.0, kappa=3.0, r=0.1, gamma=0.9)


class HeldSignals:
    """A worker-side source that returns the same noisy signals every round (no generation cost).

    Defined in ``__main__``: Dask ships it to the workers by value (cloudpickle).
    """

    def __init__(self, lo, hi, seed, dim=1):
        self.buffer = NoisyLastValueSignals(lo, hi, seed, dim=dim).next().copy()

    def next(self):
        return self.buffer


class WireCounter:
    """Bytes this process's Dask TCP comms write and read: every frame, headers included.

    Wraps ``distributed.comm.tcp.TCP.write`` (which returns the bytes it
    queued) and ``read_bytes_rw`` (plus the 8-byte length prefix of each
    message). Counts all of the client's traffic: scheduler heartbeats too.
    """

    written = 0
    read = 0

    @classmethod
    def install(cls):
        from distributed.comm import tcp

        write, read, read_bytes_rw = tcp.TCP.write, tcp.TCP.read, tcp.read_bytes_rw

        async def counting_write(self, *args, **kwargs):
            n = await write(self, *args, **kwargs)
            cls.written += n
            return n

        async def counting_read(self, *args, **kwargs):
            msg = await read(self, *args, **kwargs)
            cls.read += 8
            return msg

        async def counting_read_bytes_rw(stream, n):
            cls.read += n
            return await read_bytes_rw(stream, n)

        tcp.TCP.write, tcp.TCP.read, tcp.read_bytes_rw = counting_write, counting_read, counting_read_bytes_rw


def _io():
    return WireCounter.written, WireCounter.read


def _stream(steps, dim):
    t = np.arange(steps + 1)
    return np.stack([np.sin(0.3 * t + k) for k in range(dim)], axis=1)


# --------------------------------------------------------------------------- single process
class Single:
    def __init__(self, n, dim, threads, source):
        self.label = f"single process, {threads} thread{'s' if threads > 1 else ''}"
        self.pop = Population(GAME, n, dim, threads=threads)
        self.server = Server(n, dim, rule="hedge", eta=2.0, alpha=0.01, threads=threads)
        if source == "held":
            self.source = HeldSignals(0, n, 1, dim)
        else:
            self.source = NoisyLastValueSignals(0, n, 1, dim=dim, threads=threads)

    def round(self, y, y_next):
        if hasattr(self.source, "observe"):
            self.source.observe(y)
        x = self.pop.step(self.source.next())
        self.server.predict(x)
        self.server.update(x, y_next)

    def sync(self):
        pass

    def close(self):
        pass


# --------------------------------------------------------------------------- dask
class Sharded:
    def __init__(self, n, dim, client, source, exact):
        self.label = "dask, 2 workers x 1 thread" + (", exact" if exact else "")
        if source == "held":
            factory = functools.partial(HeldSignals, dim=dim)
        else:
            factory = functools.partial(NoisyLastValueSignals, dim=dim)
        self.pop = DaskPopulation(GAME, n, dim, client=client, signals=factory, seed=1, exact=exact, threads=1)
        self.server = DaskServer(self.pop, rule="hedge", eta=2.0, alpha=0.01)

    def round(self, y, y_next):
        self.pop.observe(y)
        x = self.pop.step()
        self.server.predict(x)
        self.server.update(x, y_next)

    def sync(self):
        self.pop.flush()

    def close(self):
        self.pop.close()


def _time_rounds(engine, ys, steps):
    engine.round(ys[0], ys[1])  # warm: JIT, first-touch of the buffers
    engine.sync()
    t0 = time.perf_counter()
    for t in range(steps):
        engine.round(ys[t], ys[t + 1])
    engine.sync()
    return (time.perf_counter() - t0) / steps


def throughput(client, n, dim, steps, repeats, sources):
    ys = _stream(steps + 1, dim)
    rows = []
    for source in sources:
        makers = [
            lambda: Single(n, dim, 1, source),
            lambda: Single(n, dim, 2, source),
            lambda: Sharded(n, dim, client, source, exact=False),
            lambda: Sharded(n, dim, client, source, exact=True),
        ]
        times = {}
        for _ in range(repeats):  # interleaved: every engine sees the same load
            for make in makers:
                engine = make()
                seconds = _time_rounds(engine, ys, steps)
                times.setdefault(engine.label, []).append(seconds)
                engine.close()
                del engine
        base = statistics.median(times["single process, 2 threads"])
        for label, ts in times.items():
            med = statistics.median(ts)
            rows.append(dict(source=source, engine=label, seconds_per_round=med, agent_steps_per_s=n / med,
                             vs_single_2_threads=base / med, all_seconds=ts))
    return rows


# --------------------------------------------------------------------------- pytest-benchmark
@pytest.fixture(scope="module")
def cluster_client():
    pytest.importorskip("distributed", reason="the Dask benchmark needs the 'dask' extra")
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0", timeout=60)
    client = Client(cluster, timeout=60)
    try:
        yield client
    finally:
        client.close(timeout=60)
        cluster.close(timeout=60)


@pytest.mark.parametrize("engine", ["single process, 2 threads", "dask, 2 workers x 1 thread"])
def test_round_throughput(benchmark, cluster_client, engine):
    """One time-series round (observe, step, predict, update) at N = 10^6, signals drawn where the agents live."""
    n, dim, steps = 10**6, 1, 5
    ys = _stream(steps + 1, dim)
    sharded = engine.startswith("dask")
    runner = Sharded(n, dim, cluster_client, "noisy", exact=False) if sharded else Single(n, dim, 2, "noisy")
    try:
        runner.round(ys[0], ys[1])  # JIT and first touch
        runner.sync()
        if sharded:
            runner.pop.comm.reset()

        def rounds():
            for t in range(steps):
                runner.round(ys[t], ys[t + 1])
            runner.sync()

        benchmark.pedantic(rounds, rounds=3, iterations=1)
        benchmark.extra_info["agent_steps_per_s"] = n * steps / benchmark.stats["median"]
        if sharded:
            comm, total = runner.pop.comm, 3 * steps
            benchmark.extra_info["payload_bytes_out_per_round"] = comm.bytes_sent / total
            benchmark.extra_info["payload_bytes_in_per_round"] = comm.bytes_received / total
            assert comm.bytes_sent / total < 4096  # O(d) per step, not O(N)
    finally:
        runner.close()


def bytes_per_round(client, sizes, dim, steps):
    rows = []
    ys = _stream(steps + 2, dim)
    for n in sizes:
        engine = Sharded(n, dim, client, "held", exact=False)
        engine.round(ys[0], ys[1])
        engine.sync()
        engine.pop.comm.reset()
        w0, r0 = _io()
        for t in range(steps):
            engine.round(ys[t], ys[t + 1])
        engine.sync()
        w1, r1 = _io()
        c = engine.pop.comm
        rows.append(dict(
            n=n, shards=engine.pop.n_shards, payload_sent=c.bytes_sent / steps, payload_received=c.bytes_received / steps,
            round_trips=c.round_trips / steps, socket_written=(w1 - w0) / steps, socket_read=(r1 - r0) / steps,
        ))
        engine.close()
    return rows


def latency_floor(client, repeats=300):
    pop = DaskPopulation(GAME, 2 * 4096, 1, client=client, threads=1)
    for _ in range(20):
        pop.info()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pop._call(("info", ()))
        ts.append(time.perf_counter() - t0)
    pop.close()
    return dict(median_ms=1e3 * statistics.median(ts), p10_ms=1e3 * np.percentile(ts, 10), p90_ms=1e3 * np.percentile(ts, 90))


def client_signals(client, n, dim, steps):
    rng = np.random.default_rng(0)
    signals = rng.normal(size=(n, dim))
    pop = DaskPopulation(GAME, n, dim, client=client, threads=1)
    pop.step(signals)
    pop.flush()
    pop.comm.reset()
    w0, _ = _io()
    t0 = time.perf_counter()
    for _ in range(steps):
        pop.step(signals)
    pop.flush()
    seconds = (time.perf_counter() - t0) / steps
    w1, _ = _io()
    out = dict(n=n, seconds_per_step=seconds, agent_steps_per_s=n / seconds, payload_sent=pop.comm.bytes_sent / steps,
               socket_written=(w1 - w0) / steps)
    pop.close()
    return out


def checkpoint_io(client, n, dim, repeats, folder):
    """Save and restore at N: worker-written (sharded) against client-gathered (one file), interleaved.

    A population on the cluster's two workers with worker-side noisy signals and
    a hedge server, after two rounds. Per repeat, in this order: sharded save,
    one-file save (``sharded=False``), sharded restore in place
    (``restore_checkpoint``), one-file restore in place, sharded restore onto
    new shards (``DaskPopulation.restore``). Wall time, the client's payload
    bytes (``DaskPopulation.comm``) and its socket bytes (``WireCounter``).
    """
    from memoa_fast.checkpoint import restore_checkpoint, save_checkpoint

    pop = DaskPopulation(GAME, n, dim, client=client, signals=functools.partial(NoisyLastValueSignals, dim=dim), seed=1,
                         threads=1)
    server = DaskServer(pop, rule="hedge", eta=2.0, alpha=0.01)
    ys = _stream(3, dim)
    for t in range(2):
        pop.observe(ys[t])
        x = pop.step()
        server.predict(x)
        server.update(x, ys[t + 1])
    pop.flush()
    sharded, single = os.path.join(folder, "bench.ckpt"), os.path.join(folder, "bench.npz")
    ops = {
        "save, worker-written (sharded)": lambda: pop.save(sharded, server),
        "save, client-gathered (one file)": lambda: save_checkpoint(single, pop, server, sharded=False),
        "restore in place, worker-read (sharded)": lambda: restore_checkpoint(sharded, pop, server),
        "restore in place, client-read (one file)": lambda: restore_checkpoint(single, pop, server),
        "restore onto new shards, worker-read (sharded)": lambda: pop.restore(sharded, server),
    }
    samples = {label: [] for label in ops}
    for _ in range(repeats):  # interleaved: each op sees the same load
        for label, op in ops.items():
            pop.flush()
            pop.comm.reset()
            w0, r0 = _io()
            t0 = time.perf_counter()
            op()
            seconds = time.perf_counter() - t0
            w1, r1 = _io()
            samples[label].append((seconds, pop.comm.bytes_sent + pop.comm.bytes_received, (w1 - w0) + (r1 - r0)))
    on_disk = {"sharded": os.path.getsize(sharded) + sum(
        os.path.getsize(os.path.join(sharded + ".shards", f)) for f in os.listdir(sharded + ".shards")),
        "one file": os.path.getsize(single)}
    pop.close()
    rows = []
    for label, s in samples.items():
        rows.append(dict(op=label, seconds=statistics.median(x[0] for x in s), payload_bytes=statistics.median(x[1] for x in s),
                         wire_bytes=statistics.median(x[2] for x in s), all_seconds=[x[0] for x in s]))
    return dict(n=n, dim=dim, repeats=repeats, bytes_on_disk=on_disk, rows=rows)


def _print_checkpoint(ck):
    print(f"\ncheckpoints at N = {ck['n']:.0e}, d = {ck['dim']} (states, costs, log-weights: "
          f"{ck['bytes_on_disk']['one file'] / 1e6:.0f} MB in one file, {ck['bytes_on_disk']['sharded'] / 1e6:.0f} MB "
          f"sharded), medians of {ck['repeats']}")
    print(f"{'operation':<48} {'seconds':>8} {'client payload B':>17} {'client wire B':>14}")
    for r in ck["rows"]:
        print(f"{r['op']:<48} {r['seconds']:>8.2f} {r['payload_bytes']:>17,.0f} {r['wire_bytes']:>14,.0f}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=float, default=1e7, help="agents for the throughput runs (default 1e7)")
    parser.add_argument("--dim", type=int, default=1, help="state dimension d (default 1)")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds per measurement (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per engine (default 3)")
    parser.add_argument("--sources", default="held,noisy", help="signal sources to run (default held,noisy)")
    parser.add_argument("--bytes-sizes", default="1e5,1e6,1e7", help="N values for the bytes-per-round table")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="only measure checkpoint save and restore at N (worker-written against client-gathered)")
    parser.add_argument("--folder", default=None, help="where the checkpoint runs write (default: a temporary folder)")
    args = parser.parse_args(argv)

    from distributed import Client, LocalCluster

    WireCounter.install()
    n = int(args.n)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address="127.0.0.1:0", worker_dashboard_address="127.0.0.1:0")
    client = Client(cluster)
    try:
        results = dict(n=n, dim=args.dim, steps=args.steps, repeats=args.repeats, cpu_count=os.cpu_count(),
                       load_before=os.getloadavg())
        print(f"N = {n:.0e}, d = {args.dim}, {args.steps} rounds x {args.repeats} interleaved repeats; "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        if args.checkpoint_only:
            import tempfile

            with tempfile.TemporaryDirectory(dir=args.folder) as folder:
                results["checkpoint"] = ck = checkpoint_io(client, n, args.dim, args.repeats, folder)
            _print_checkpoint(ck)
            results["load_after"] = os.getloadavg()
            print(f"\nload average after: {os.getloadavg()[0]:.1f}")
            return _finish(results, args)
        results["latency_floor"] = lat = latency_floor(client)
        print(f"\nempty round trip to both shards: median {lat['median_ms']:.2f} ms "
              f"(p10 {lat['p10_ms']:.2f}, p90 {lat['p90_ms']:.2f})", flush=True)

        results["bytes"] = rows = bytes_per_round(client, [int(float(s)) for s in args.bytes_sizes.split(",")], args.dim, 10)
        print("\nbytes per round (observe + step + predict + update), held signals")
        print(f"{'N':>10} {'shards':>6} {'payload out':>12} {'payload in':>11} {'round trips':>12} {'wire out':>11} {'wire in':>10}")
        for r in rows:
            print(f"{r['n']:>10.0e} {r['shards']:>6} {r['payload_sent']:>12.0f} {r['payload_received']:>11.0f} "
                  f"{r['round_trips']:>12.1f} {r['socket_written']:>11.0f} {r['socket_read']:>10.0f}", flush=True)

        cs_n = min(n, 10**6)
        results["client_signals"] = cs = client_signals(client, cs_n, args.dim, 5)
        print(f"\nsignals sent from the client instead, N = {cs_n:.0e}: {cs['payload_sent'] / 1e6:.1f} MB payload per step, "
              f"{cs['socket_written'] / 1e6:.1f} MB on the wire, {cs['agent_steps_per_s'] / 1e6:.1f} M agent-steps/s", flush=True)

        results["throughput"] = rows = throughput(client, n, args.dim, args.steps, args.repeats, args.sources.split(","))
        print(f"\nthroughput at N = {n:.0e} (one round = observe + step + predict + update)")
        print(f"{'source':<7} {'engine':<34} {'s/round':>8} {'M agent-steps/s':>16} {'vs 1 proc x 2 thr':>18}")
        for r in rows:
            print(f"{r['source']:<7} {r['engine']:<34} {r['seconds_per_round']:>8.3f} {r['agent_steps_per_s'] / 1e6:>16.1f} "
                  f"{r['vs_single_2_threads']:>18.2f}", flush=True)
        results["load_after"] = os.getloadavg()
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        client.close()
        cluster.close()
    return _finish(results, args)


def _finish(results, args):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
