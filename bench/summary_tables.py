"""Markdown tables for ``bench/README.md`` from a ``bench_kernels.py --bench-summary`` JSON file.

    python -P -m pytest bench/bench_kernels.py -m "not big" -p no:cacheprovider --bench-summary bench/kernels_summary.json
    python3 bench/summary_tables.py bench/kernels_summary.json

Prints the interleaved headline (N = 10^6: every contender against the best
peer of the same run, and its fraction of the same run's STREAM triad), the
K = 16 / K = 1 and Cython / Numba ratios of those same runs, and the grid of
separate cases. Every ratio is of two medians taken in one interleaved run.
"""
from __future__ import annotations

import json
import sys

ENGINES = ("numba-1", "numba-2", "cython-1", "cython-2")


def ms(v) -> str:
    if v is None:
        return "-"
    v *= 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def headline(rows: list) -> list[str]:
    out = ["| N = 10^6 (load) | best peer, ms | NumPy peer ms | JAX peer ms | "
           + " | ".join(f"{e} ms (x best peer, %triad)" for e in ENGINES) + " |",
           "|---|---|---:|---:|" + "---:|" * len(ENGINES)]
    for r in sorted(rows, key=lambda r: (r["group"], r["d"])):
        med = r["median_s"]
        cells = []
        for e in ENGINES:
            if e not in med:
                cells.append("-")
                continue
            cells.append(f"{ms(med[e])} ({r['x_best_peer'][e]:.1f}x, {100 * r['triad_fraction'][e]:.0f}%)")
        name = "step" if r["group"] == "step" else "server round"
        out.append(f"| {name}, d = {r['d']} ({r['load']:.1f}) | {r['best_peer']} {ms(med[r['best_peer']])} | "
                   f"{ms(med.get('numpy'))} | {ms(med.get('jax'))} | " + " | ".join(cells) + " |")
    return out


def ratios(rows: list) -> list[str]:
    out = ["| N = 10^6 | Numba K=16 / K=1, 1T | 2T | Cython K=16 / K=1, 1T | 2T | Cython / Numba, 1T | 2T | "
           "K = 1 new / old kernel, 1T | 2T |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["group"], r["d"])):
        med = r["median_s"]

        def ratio(a, b):
            return f"{med[a] / med[b]:.2f}" if a in med and b in med else "-"

        name = "step" if r["group"] == "step" else "server round"
        out.append(f"| {name}, d = {r['d']} | {ratio('numba-k16-1', 'numba-1')} | {ratio('numba-k16-2', 'numba-2')} | "
                   f"{ratio('cython-k16-1', 'cython-1')} | {ratio('cython-k16-2', 'cython-2')} | "
                   f"{ratio('cython-1', 'numba-1')} | {ratio('cython-2', 'numba-2')} | "
                   f"{ratio('numba-1', 'old-numba-1')} | {ratio('numba-2', 'old-numba-2')} |")
    return out


def grid(rows: list) -> list[str]:
    who = ("reference", "numpy", "jax", "numba-1", "numba-2", "cython-1", "cython-2")
    out = ["| kernel | N | d | " + " | ".join(who) + " | best peer | " + " | ".join(f"{w} x best peer" for w in who[3:]) + " |",
           "|---|---:|---:|" + "---:|" * len(who) + "---|" + "---:|" * len(who[3:])]
    for r in rows:
        n = f"10^{len(str(r['n'])) - 1}"
        kernel = {"step_k16": "step, K = 16"}.get(r["kernel"], r["kernel"])
        times = " | ".join(ms(r.get(w)) for w in who)
        xs = " | ".join(f"{r[f'x_{w}']:.1f}x" if f"x_{w}" in r else "-" for w in who[3:])
        out.append(f"| {kernel} | {n} | {r['d']} | {times} | {r['best_peer']} | {xs} |")
    return out


def main(path: str) -> int:
    data = json.load(open(path))
    print(f"triad at the start: {data['triad_start']} GB/s (threads: GB/s); at the end: {data['triad_end']}; "
          f"load at the end: {data.get('load_end')}\n")
    if data.get("interleaved"):
        print("\n".join(headline(data["interleaved"])) + "\n")
        print("\n".join(ratios(data["interleaved"])) + "\n")
    if data.get("rows"):
        print("\n".join(grid(data["rows"])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench/kernels_summary.json"))
