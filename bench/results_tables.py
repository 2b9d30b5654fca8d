"""The README's result tables: ``memoa run`` (its defaults, 1000 clients) on every stream and real series.

    python3 bench/results_tables.py --out bench/results.md        # about 10 minutes on 2 cores
    python3 bench/results_tables.py --only logistic,concept       # a subset

Each row is exactly what the printed command gives (``run_experiment`` with
the command line's defaults). Real series are read from ``../shared/datasets``
and skipped where it is absent. The summary counts, per column, on how many
series memoa-trust is within 10% of the best policy, and its worst client
against MEMOA's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from memoa_fast.timeseries.experiment import run_experiment
from memoa_fast.timeseries.streams import load_csv_series, make_stream

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
D = "../shared/datasets"
SYNTHETIC = ("logistic", "periodic", "concept", "concept-drift")
README_SERIES = ("logistic", "periodic", "concept", "concept-drift", "ETTh1/OT", "exchange/CAD")


def series_list():
    out = [(name, f"memoa run --stream {name} --clients 1000", lambda name=name: make_stream(name, 3001, seed=0))
           for name in SYNTHETIC]
    if not DATA.is_dir():
        return out
    for name in ("ETTh1", "ETTh2", "ETTm1", "ETTm2"):
        path = DATA / "ett" / f"{name}.csv"
        out.append((f"{name}/OT", f"memoa run --csv {D}/ett/{name}.csv --column OT --clients 1000",
                    lambda path=path: load_csv_series(path, "OT", max_rows=100_001)))
    for col in ("AUD", "GBP", "CAD", "CHF", "CNY", "JPY", "NZD", "SGD"):
        path = DATA / "exchange_rate" / "exchange_rate.csv"
        out.append((f"exchange/{col}", f"memoa run --csv {D}/exchange_rate/exchange_rate.csv --column {col} --clients 1000",
                    lambda path=path, col=col: load_csv_series(path, col)))
    path = DATA / "airline_passengers" / "airline-passengers.csv"
    out.append(("airline", f"memoa run --csv {D}/airline_passengers/airline-passengers.csv --column Passengers "
                           "--warmup 24 --clients 1000",
                lambda path=path: load_csv_series(path, "Passengers", warmup=24)))
    for col in ("Australia", "Canada", "Japan", "Switzerland", "United Kingdom"):
        path = DATA / "exchange_rate" / "fred_h10_daily_1971_2017.csv"
        out.append((f"FRED/{col}", f"memoa run --csv {D}/exchange_rate/fred_h10_daily_1971_2017.csv "
                                   f"--column '{col}' --missing drop --clients 1000",
                    lambda path=path, col=col: load_csv_series(path, col, missing="drop")))
    return out


COLS = ("worst_client_rmse", "average_client_rmse", "hedge")


def value(score, col):
    return score.mixture_rmse["hedge"] if col == "hedge" else getattr(score, col)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown here")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--only", help="comma-separated series names")
    args = ap.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    md, raw = [], {}
    summary = {c: 0 for c in COLS}
    n_series, worst_ratio = 0, []
    for name, command, load in series_list():
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        y = load()
        res = run_experiment(y, stream=name, n_clients=1000)
        s = res.scores
        best = {c: min(value(s[p], c) for p in s if p != "memoa-trust") for c in COLS}
        within = {c: value(s["memoa-trust"], c) <= 1.1 * best[c] for c in COLS}
        for c in COLS:
            summary[c] += within[c]
        n_series += 1
        worst_ratio.append(s["memoa-trust"].worst_client_rmse / s["memoa"].worst_client_rmse)
        raw[name] = res.to_dict()
        md.append(f"### {name} ({len(y)} values)\n\n    {command}\n")
        md.append("| policy | mixture hedge | mixture eg | uniform mean | worst client | average client | max_i J_i |")
        md.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for p, sc in s.items():
            cells = [value(sc, "hedge"), sc.mixture_rmse["eg"], sc.uniform_rmse, sc.worst_client_rmse,
                     sc.average_client_rmse]
            bold = [value(sc, c) == min(value(s[q], c) for q in s) for c in COLS]
            fmt = [f"{v:.4f}" for v in cells]
            for k, c in ((0, 2), (3, 0), (4, 1)):  # bold the best of each scored column
                if bold[c]:
                    fmt[k] = f"**{fmt[k]}**"
            md.append(f"| {p} | " + " | ".join(fmt) + f" | {sc.max_cost:.4g} |")
        md.append("")
        print(f"{name}: {time.perf_counter() - t0:.1f} s; memoa-trust within 10% of the best on "
              + ", ".join(f"{c}: {within[c]}" for c in COLS), flush=True)
    md.append(f"memoa-trust within 10% of the best other policy, over {n_series} series: worst client "
              f"{summary['worst_client_rmse']}, average client {summary['average_client_rmse']}, hedge mixture "
              f"{summary['hedge']}; its worst client / MEMOA's: median {statistics.median(worst_ratio):.2f}, "
              f"largest {max(worst_ratio):.2f}; at most 0.75x on {sum(r <= 0.75 for r in worst_ratio)} of {n_series}.")
    text = "\n".join(md)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
