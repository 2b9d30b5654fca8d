"""``outlier_bound``'s default: every series we have, run with each bound and with none (the README's "Outliers").

For every series (the 22 of ``results_tables.py``, the other 24 ETT columns
and every other FRED column that loads with ``--missing drop``) and every
bound ``b``: how many values ``run_experiment`` holds, and where it holds
any, the run with ``outlier_bound=b`` against the run with ``None`` (1000
clients, every policy, the hedge mixture, one thread; the scores do not
depend on the thread count). A series where ``b`` holds nothing gives the
very bits of ``None`` (``tests/test_experiment.py`` checks it), so its ratio
is 1 without a run. Each column's ratio ``b / None`` is the geometric mean
over the five policies; the summary is the arithmetic mean over all series,
and the default is the bound with the lowest mean of the three columns.

    python3 bench/outlier_study.py --json bench/outlier_study.json      # about 110 minutes of CPU (one core)
    python3 bench/outlier_study.py --summary bench/outlier_study.json   # the summary of a saved run
    python3 bench/outlier_study.py --merge OUT.json A.json B.json         # runs of other bounds, as one study

With ``--json PATH`` every finished series is also saved to ``PATH.partial``
(replaced whole, never half written), and a run started again with the same
bounds and clients skips the series saved there: a stopped run resumes where
it stopped. The partial file is removed once ``PATH`` is written.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from memoa_fast import run_experiment
from memoa_fast.timeseries.experiment import held_feed
from memoa_fast.timeseries.streams import csv_columns, load_csv_series

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_tables import DATA, series_list  # noqa: E402

COLUMNS = ("worst", "average", "hedge")


def every_series() -> dict[str, np.ndarray]:
    """The 22 series of the README's tables, then every other ETT column and FRED column we have."""
    out = {name: load() for name, _, load in series_list()}
    if not DATA.is_dir():
        return out
    for name in ("ETTh1", "ETTh2", "ETTm1", "ETTm2"):
        path = DATA / "ett" / f"{name}.csv"
        for column in csv_columns(path):
            if column not in ("date", "OT"):
                out[f"{name}/{column}"] = load_csv_series(path, column, max_rows=100_001)
    path = DATA / "exchange_rate" / "fred_h10_daily_1971_2017.csv"
    for column in csv_columns(path):
        if f"FRED/{column}" not in out:
            try:
                out[f"FRED/{column}"] = load_csv_series(path, column, missing="drop")
            except ValueError:  # the date column, and the euro-area columns that end in 1999 (too few rows)
                pass
    return out


def scores(result) -> dict:
    return {p: {"worst": s.worst_client_rmse, "average": s.average_client_rmse, "hedge": s.mixture_rmse["hedge"]}
            for p, s in result.scores.items()}


def load_partial(path: Path, bounds: list[float], n_clients: int) -> dict:
    """The series a stopped run saved to ``path`` (``{}`` if there is none); ValueError if it ran other settings."""
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("bounds") != bounds or saved.get("clients") != n_clients:
        raise ValueError(f"{path} holds a run with bounds={saved.get('bounds')} and clients={saved.get('clients')}, "
                         f"not bounds={bounds} and clients={n_clients}: run with those, or remove the file")
    return saved["series"]


def save_partial(path: Path, bounds: list[float], n_clients: int, series: dict) -> None:
    """Write the finished series to ``path`` through a temporary file and a rename (a kill leaves the old file whole)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"bounds": bounds, "clients": n_clients, "series": series}, indent=1))
    os.replace(tmp, path)


def study(bounds: list[float], n_clients: int, partial: Path | None = None) -> dict:
    out = load_partial(partial, bounds, n_clients) if partial else {}
    if out:
        print(f"resuming: {len(out)} series from {partial}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    series = every_series()
    for name, y in series.items():
        if name in out:
            continue
        y2 = np.ascontiguousarray(np.asarray(y, dtype=np.float64).reshape(len(y), -1))
        burn_in = min(500, (len(y2) - 1) // 5)  # run_experiment's default
        held = {str(b): held_feed(y2, burn_in, b)[1] for b in bounds}
        out[name] = {"rows": len(y2), "held": held}
        touched = [b for b in bounds if held[str(b)]]
        if touched:
            kw = dict(n_clients=n_clients, rules=("hedge",), threads=1)
            out[name]["none"] = scores(run_experiment(y, outlier_bound=None, **kw))
            for b in touched:
                out[name][str(b)] = scores(run_experiment(y, outlier_bound=b, **kw))
        if partial:
            save_partial(partial, bounds, n_clients, out)
        print(f"{name:28s} {time.perf_counter() - start:7.1f} s; held {held}", file=sys.stderr, flush=True)
    return {name: out[name] for name in series}  # every_series()'s order, and only its series


def merge(*runs: dict) -> dict:
    """Saved runs of the same series with other bounds, as one run (its bounds in increasing order).

    The runs must agree wherever they overlap: the same series in the same order with the same rows, and for a bound
    in two runs, or the unbounded run in two, the same numbers (so the same clients and code). ValueError otherwise,
    naming the series and the bound.
    """
    names = list(runs[0])
    for run in runs[1:]:
        if list(run) != names:
            raise ValueError(f"the runs hold other series: {names} against {list(run)}")
    out = {}
    for name in names:
        held, scored = {}, {}
        for run in runs:
            v = run[name]
            if v["rows"] != runs[0][name]["rows"]:
                raise ValueError(f"{name}: {v['rows']} rows in one run, {runs[0][name]['rows']} in another")
            _agree(held, v["held"], name, "values held")
            _agree(scored, {k: s for k, s in v.items() if k not in ("rows", "held")}, name, "scores")
        order = sorted(held, key=float)
        out[name] = {"rows": runs[0][name]["rows"], "held": {b: held[b] for b in order}}
        out[name].update({k: scored[k] for k in ["none", *order] if k in scored})
    return out


def _agree(into: dict, new: dict, name: str, what: str) -> None:
    """Add ``new``'s entries to ``into``; ValueError where a key in both has two values."""
    for key, value in new.items():
        if key in into and into[key] != value:
            raise ValueError(f"{name}: the runs disagree at bound {key} ({what}): {into[key]} against {value}")
        into[key] = value


def summary(results: dict) -> str:
    """Per series where any bound holds a value: held count and worst/average/hedge ratios; then the means over all."""
    bounds = sorted({b for v in results.values() for b in v["held"]}, key=float)
    ratios = {b: {c: [] for c in COLUMNS} for b in bounds}
    lines = ["per series (held values; worst / average / hedge RMSE with the bound over without it, geometric mean over "
             "the policies); series where no bound holds anything are left out:"]
    for name, v in results.items():
        cells = []
        for b in bounds:
            r = {c: 1.0 for c in COLUMNS}
            if b in v and v["held"][b]:
                r = {c: math.exp(np.mean([math.log(v[b][p][c] / v["none"][p][c]) for p in v["none"]])) for c in COLUMNS}
                cells.append(f"b={float(b):g} [{v['held'][b]}] {r['worst']:.3f}/{r['average']:.3f}/{r['hedge']:.3f}")
            for c in COLUMNS:
                ratios[b][c].append(r[c])
        if cells:
            lines.append(f"  {name} ({v['rows']} rows): " + "; ".join(cells))
    lines.append(f"mean over {len(results)} series of the ratio with the bound over without it (lower is better; "
                 "in brackets the smallest and the largest ratio, and the series where a column is more than 1% worse):")
    for b in bounds:
        worse = sum(any(ratios[b][c][i] > 1.01 for c in COLUMNS) for i in range(len(results)))
        touched = sum(bool(v["held"][b]) for v in results.values())
        lines.append(f"  b={float(b):g}: " + ", ".join(
            f"{c} {np.mean(ratios[b][c]):.4f} ({min(ratios[b][c]):.3f}-{max(ratios[b][c]):.3f})" for c in COLUMNS)
            + f"; the three: {np.mean([np.mean(ratios[b][c]) for c in COLUMNS]):.4f}"
            + f"; holds values in {touched} series; {worse} series more than 1% worse")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bounds", help="comma-separated bounds, in burn-in standard deviations (default 1,2,3,4,6,8,12,16,24,32,48,64)")
    ap.add_argument("--clients", type=int, help="clients per run (default 1000)")
    what = ap.add_mutually_exclusive_group()
    what.add_argument("--json", help="write the raw numbers here")
    what.add_argument("--summary", metavar="JSON", help="print the summary of a saved run instead of running")
    what.add_argument("--merge", nargs="+", metavar=("OUT", "RUN"),
                      help="instead of running, write two or more saved runs (RUN RUN ...) as one run to OUT, and print its summary")
    args = ap.parse_args()
    if (args.merge or args.summary) and (args.bounds or args.clients):
        ap.error("--bounds and --clients are for a run, not for --summary or --merge (which read saved runs)")
    if args.merge:
        if len(args.merge) < 3:
            ap.error(f"--merge takes OUT and at least two saved runs, got {args.merge}")
        merged = merge(*(json.loads(Path(p).read_text()) for p in args.merge[1:]))
        Path(args.merge[0]).write_text(json.dumps(merged, indent=1))
        print(summary(merged))
        return 0
    if args.summary:
        print(summary(json.loads(Path(args.summary).read_text())))
        return 0
    partial = Path(args.json + ".partial") if args.json else None
    bounds = args.bounds or "1,2,3,4,6,8,12,16,24,32,48,64"
    results = study([float(b) for b in bounds.split(",")], args.clients or 1000, partial)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        partial.unlink(missing_ok=True)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
