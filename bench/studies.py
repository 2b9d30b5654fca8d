"""Scaling and memory studies behind ``bench/README.md``.

Studies (each can be run alone with ``--only``):

``scaling``   time per ``Population.step`` against N (d = 4) for Numba on one
              and two threads and the NumPy reference; fitted exponent over
              10^4..10^7; the one-versus-two-thread crossover; PNG plot.
``rss``       peak RSS at N = 10^7, d = 4 per backend, in fresh processes,
              against the bare arrays (states, signals, costs, log-weights).
``peers_rss`` the same for 5 steps of memoa and of the NumPy and JAX peers
              (``peers.py``), the peak reset after the set-up.
``alloc``     tracemalloc over 100 steps (and 100 server rounds).
``latency``   import + first step in a fresh process: Numba with a cold cache
              (``NUMBA_CACHE_DIR`` pointing at an empty folder), with a warm
              cache, and Cython (which must not import Numba at all).
``nash``      the exact N-player Nash solver for N = 5..50 beside one
              mean-field step at N = 10^6.

Run from the repository root, against the installed package::

    python -P bench/studies.py                      # all, about 8 minutes
    python -P bench/studies.py --only latency rss   # some
    python -P bench/studies.py --json bench/studies.json --plot bench/scaling.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TWO = 2 if (os.cpu_count() or 1) >= 2 else 1


def _backends():
    """The backends to study: Cython only once its extension has the kernel API of this tree (``signal_pass``)."""
    out = ["numba"]
    try:
        from memoa_fast.kernels import _cython
    except ImportError:
        _cython = None
    if _cython is not None and hasattr(_cython, "signal_pass"):
        out.append("cython")
    else:
        print("cython: skipped (extension missing, or still built with the old kernel API)")
    return out + ["numpy"]


def _median_time(fn, min_reps=3, budget=1.0, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


# --------------------------------------------------------------------------- scaling
def study_scaling(plot_path: Path | None):
    from memoa_fast import Game, Population

    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    d = 4
    sizes = [10**3, 3 * 10**3, 10**4, 3 * 10**4, 10**5, 3 * 10**5, 10**6, 3 * 10**6, 10**7]
    variants = {
        "numba, 1 thread": dict(backend="numba", threads=1),
        f"numba, {TWO} threads": dict(backend="numba", threads=TWO, parallel_threshold=1),
        "numpy reference": dict(backend="numpy", threads=1),
    }
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        signals = rng.standard_normal((2, n, d))
        for name, kw in variants.items():
            if kw["backend"] == "numpy" and n > 3 * 10**6:
                budget = 0.1
            else:
                budget = 1.0
            pop = Population(game, n, d, **kw)
            k = [0]

            def step():
                pop.step(signals[k[0] & 1])
                k[0] += 1

            t, reps = _median_time(step, budget=budget)
            rows.append({"variant": name, "n": n, "d": d, "seconds": t, "reps": reps, "ns_per_agent": t / n * 1e9})
            print(f"scaling {name:<18} N={n:>9} {t * 1e3:10.3f} ms  {t / n * 1e9:7.2f} ns/agent", flush=True)
            del pop
        del signals
    fits = {}
    for name in variants:
        pts = [(r["n"], r["seconds"]) for r in rows if r["variant"] == name and 10**4 <= r["n"] <= 10**7]
        logn, logt = np.log10([p[0] for p in pts]), np.log10([p[1] for p in pts])
        slope, intercept = np.polyfit(logn, logt, 1)
        fits[name] = {"exponent": float(slope), "intercept": float(intercept)}
        print(f"scaling fit {name}: t ~ N^{slope:.3f} over 10^4..10^7")

    # One versus two threads around the parallel threshold (fused kernel through the public API).
    crossover = []
    for n in [2**k for k in range(10, 18)]:
        signals = rng.standard_normal((2, n, d))
        times = {}
        for threads in (1, TWO):
            pop = Population(game, n, d, threads=threads, parallel_threshold=1)
            k = [0]

            def step():
                pop.step(signals[k[0] & 1])
                k[0] += 1

            times[threads], _ = _median_time(step, min_reps=50, budget=0.5)
        crossover.append({"n": n, "one": times[1], "two": times[TWO]})
        print(f"threshold N={n:>7}: 1 thread {times[1] * 1e6:9.1f} us, {TWO} threads {times[TWO] * 1e6:9.1f} us", flush=True)

    if plot_path is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in variants:
            pts = [r for r in rows if r["variant"] == name]
            ns = np.array([r["n"] for r in pts])
            ts = np.array([r["seconds"] for r in pts])
            fit = fits[name]
            ax1.loglog(ns, ts, "o-", label=f"{name} (N^{fit['exponent']:.2f})")
            ax2.semilogx(ns, ts / ns * 1e9, "o-", label=name)
        ax1.set_xlabel("agents N")
        ax1.set_ylabel("seconds per step")
        ax1.set_title(f"Population.step, d = {d} (exponent fitted on 1e4..1e7)")
        ax1.grid(True, which="both", alpha=0.3)
        ax1.legend(fontsize=8)
        ax2.set_xlabel("agents N")
        ax2.set_ylabel("ns per agent-step")
        ax2.set_yscale("log")
        ax2.set_title("time per agent")
        ax2.grid(True, which="both", alpha=0.3)
        ax2.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot_path, dpi=110)
        print(f"plot written to {plot_path}")
    return {"rows": rows, "fits": fits, "crossover": crossover}


# --------------------------------------------------------------------------- peak RSS
_RSS_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    import psutil
    from memoa_fast import Game, Population, Server
    backend, n, d, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    # Warm up on a tiny population (JIT or cache load), so that compilation is not in the peak.
    small = Population(game, 4096, d, backend=backend)
    small_server = Server(4096, d, backend=backend, alpha=0.01)
    for _ in range(2):
        small.step_predict(np.ones((4096, d)), small_server)
        small_server.update(small.states, np.zeros(d))
    proc = psutil.Process()
    base = proc.memory_info().rss
    signals = np.random.default_rng(0).standard_normal((n, d))
    pop = Population(game, n, d, backend=backend)
    bare = signals.nbytes + pop.states.nbytes + pop.costs.nbytes + pop._work.nbytes
    server = None
    if mode == "round":
        server = Server(n, d, backend=backend, alpha=0.01)
        bare += server.log_weights.nbytes + server._work.nbytes
    t0 = time.perf_counter()
    for t in range(5):
        if server is None:
            pop.step(signals)
        else:
            pop.step_predict(signals, server)
            server.update(pop.states, np.zeros(d))
    seconds = (time.perf_counter() - t0) / 5
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "bare": bare, "peak": peak, "seconds": seconds}))
    """
)


def study_rss(n=10**7, d=4):
    out = []
    for backend in _backends():
        for mode in ("step", "round"):
            res = subprocess.run([sys.executable, "-P", "-c", _RSS_CHILD, backend, str(n), str(d), mode],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                print(f"rss {backend} {mode}: failed\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            r.update(backend=backend, mode=mode, excess=r["peak"] - r["base"] - r["bare"])
            out.append(r)
            mib = 2.0**20
            print(f"rss {backend:<7}{mode:<6} base {r['base'] / mib:7.0f} MiB, bare arrays {r['bare'] / mib:7.0f} MiB, "
                  f"peak {r['peak'] / mib:7.0f} MiB, excess {r['excess'] / mib:7.0f} MiB, "
                  f"{r['seconds'] * 1e3:.0f} ms per round", flush=True)
    return out


# --------------------------------------------------------------------------- peak RSS of the peers
_PEER_RSS_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[4])
    import peers
    from memoa_fast import Game, Population
    who, n, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def make(x0):
        if who == "memoa":
            return Population(game, initial_states=x0, threads=1)
        if who == "numpy":
            return peers.NumpyPopulation(x0, **peers.coefficients(game))
        return peers.jax_population(x0, **peers.coefficients(game))

    small = make(np.zeros((4096, d)))  # JIT or cache load outside the peak (XLA compiles per shape: not all)
    for _ in range(2):
        small.step(np.ones((4096, d)))
    base = status("VmRSS")
    signals = np.random.default_rng(0).standard_normal((n, d))
    x0 = np.zeros((n, d))
    pop = make(x0)
    del x0
    bare = signals.nbytes + n * d * 8 + n * 8  # signals, states, costs
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) after the set-up copies
    t0 = time.perf_counter()
    for _ in range(5):
        pop.step(signals)
    seconds = (time.perf_counter() - t0) / 5
    peak = status("VmHWM")
    print(json.dumps({"base": base, "bare": bare, "peak": peak, "seconds": seconds}))
    """
)


def study_peers_rss(n=10**7, d=4):
    """Peak RSS of 5 population steps at N = 10^7, d = 4: memoa (Numba, 1 thread), the NumPy and JAX peers.

    Fresh process each; the peak is reset (``/proc/self/clear_refs``) after the
    set-up, so it covers the steps only; ``excess = peak - RSS before allocating
    - bare arrays`` (signals, states, costs). The signals are NumPy arrays, as a
    user has them (JAX copies them in).
    """
    out = []
    for who in ("memoa", "numpy", "jax"):
        if who == "jax":
            sys.path.insert(0, str(HERE))
            import peers

            if not peers.have_jax():
                print("peers_rss jax: skipped (JAX not installed)")
                continue
        res = subprocess.run([sys.executable, "-P", "-c", _PEER_RSS_CHILD, who, str(n), str(d), str(HERE)],
                             capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(f"peers_rss {who}: failed\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r.update(who=who, n=n, d=d, excess=r["peak"] - r["base"] - r["bare"])
        out.append(r)
        mib = 2.0**20
        print(f"peers_rss {who:<6} bare arrays {r['bare'] / mib:6.0f} MiB, peak {r['peak'] / mib:6.0f} MiB, "
              f"excess {r['excess'] / mib:6.0f} MiB, {r['seconds'] * 1e3:.0f} ms per step", flush=True)
    return out


# --------------------------------------------------------------------------- tracemalloc
def study_alloc(n=10**5, d=4, steps=100):
    import gc
    import tracemalloc

    from memoa_fast import Game, Population, Server

    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    signals = np.random.default_rng(1).standard_normal((2, n, d))
    out = []
    for backend in _backends():
        pop = Population(game, n, d, backend=backend)
        server = Server(n, d, backend=backend, alpha=0.01)
        cases = {
            "Population.step": lambda t: pop.step(signals[t & 1]),
            "step_predict + Server.update": lambda t: (pop.step_predict(signals[t & 1], server), server.update(pop.states, np.zeros(d))),
            "Server.predict + update": lambda t: (server.predict(pop.states), server.update(pop.states, np.zeros(d))),
        }
        for name, fn in cases.items():
            for t in range(3):
                fn(t)
            gc.collect()
            tracemalloc.start()
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            for t in range(steps):
                fn(t)
            gc.collect()
            after, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            r = {"backend": backend, "case": name, "net": after - before, "peak": peak - before, "n": n, "d": d, "steps": steps}
            out.append(r)
            print(f"alloc {backend:<7}{name:<30} net {r['net']:>10} B, peak {r['peak']:>10} B over {steps} calls", flush=True)
    return out


# --------------------------------------------------------------------------- first-call latency
_LATENCY_CHILD = textwrap.dedent(
    """
    import time
    t0 = time.perf_counter()
    import sys
    import numpy as np
    import memoa_fast
    t1 = time.perf_counter()
    backend, n = sys.argv[1], int(sys.argv[2])
    pop = memoa_fast.Population(memoa_fast.Game(), n, 4, backend=backend)
    pop.step(np.ones((n, 4)))
    t2 = time.perf_counter()
    print(t1 - t0, t2 - t1, "numba" in sys.modules)
    """
)


def _latency_once(backend, n, env):
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-P", "-c", _LATENCY_CHILD, backend, str(n)], capture_output=True,
                         text=True, env=env, check=True)
    wall = time.perf_counter() - t0
    imp, first, numba_loaded = res.stdout.split()
    return {"import": float(imp), "first_step": float(first), "total": float(imp) + float(first), "wall": wall,
            "numba_imported": numba_loaded == "True"}


def study_latency(repeats=5):
    out = []
    warm = Path(tempfile.mkdtemp(prefix="memoa-warm-"))
    for n in (1000, 100_000):
        kinds = ("numba cold cache", "numba warm cache") + (("cython",) if "cython" in _backends() else ())
        for kind in kinds:
            runs = []
            for _ in range(repeats if kind != "numba cold cache" else 3):
                env = dict(os.environ)
                if kind == "numba cold cache":
                    env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="memoa-cold-")
                elif kind == "numba warm cache":
                    env["NUMBA_CACHE_DIR"] = str(warm)
                    if not runs:
                        _latency_once("numba", n, env)  # populate (this size's drivers)
                runs.append(_latency_once("cython" if kind == "cython" else "numba", n, env))
            r = {k: statistics.median(run[k] for run in runs) for k in ("import", "first_step", "total", "wall")}
            r.update(kind=kind, n=n, runs=len(runs), numba_imported=any(run["numba_imported"] for run in runs))
            out.append(r)
            print(f"latency N={n:>6} {kind:<17} import {r['import']:.3f} s + first step {r['first_step']:.3f} s "
                  f"= {r['total']:.3f} s (process wall {r['wall']:.3f} s; numba imported: {r['numba_imported']})", flush=True)
    return out


# --------------------------------------------------------------------------- Nash vs mean field
def study_nash():
    from memoa_fast import Game, Population
    from memoa_fast.certificates import nash_equilibrium

    game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
    out = {"nash": [], "mean_field": []}
    for n in (5, 10, 20, 30, 40, 50):
        s = np.linspace(-1.0, 1.0, n)[:, None]
        t, reps = _median_time(lambda: nash_equilibrium(game, n, s), min_reps=1 if n >= 30 else 3, budget=2.0, warmup=1)
        out["nash"].append({"n": n, "seconds": t, "reps": reps})
        print(f"nash N={n:>3}: {t:.4f} s", flush=True)
    n = 10**6
    signals = np.random.default_rng(2).standard_normal((2, n, 1))
    for threads in (1, TWO):
        pop = Population(game, n, 1, threads=threads)
        k = [0]

        def step():
            pop.step(signals[k[0] & 1])
            k[0] += 1

        t, _ = _median_time(step, min_reps=20)
        out["mean_field"].append({"n": n, "threads": threads, "seconds": t})
        print(f"mean-field step N=10^6, {threads} thread(s): {t * 1e3:.3f} ms", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", default=None, choices=["scaling", "rss", "peers_rss", "alloc", "latency", "nash"])
    parser.add_argument("--json", type=Path, default=HERE / "studies.json")
    parser.add_argument("--plot", type=Path, default=HERE / "scaling.png")
    args = parser.parse_args(argv)
    chosen = args.only or ["latency", "alloc", "nash", "rss", "peers_rss", "scaling"]
    results = json.loads(args.json.read_text()) if args.json.exists() else {}
    for name in chosen:
        if name == "scaling":
            results[name] = study_scaling(args.plot)
        else:
            results[name] = globals()[f"study_{name}"]()
        args.json.write_text(json.dumps(results, indent=1))
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
