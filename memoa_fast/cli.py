"""The ``memoa`` command: run the time-series experiment from a shell.

``memoa run`` with no options runs the built-in default (logistic map,
4000 clients, 3000 rounds) and prints the table; ``memoa run --help``
explains every option. Bad options exit with status 2 and a message naming
the option, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from . import __version__

STREAMS = ("logistic", "periodic", "concept", "concept-drift", "csv")
DEFAULTS = dict(stream="logistic", clients=4000, steps=3000, q=1.0, kappa=1.0, r=0.1, gamma=0.9, eta=0.5, alpha=0.01,
                seed=0, lags=2, noise=(0.02, 1.0), mu=0.1, warmup=500)

DESCRIPTION = """\
Run the MEMOA time-series experiment (MODEL.md section 6) and print a table.

Each of N clients sees the stream plus its own noise (noise scales spread
log-uniformly, so some clients are weak), runs its own online forecaster and
publishes a forecast of the next value. The clients are coupled through the
mean field by a policy: 'memoa' (the mean-field Nash policy) and the greedy
baselines 'greedy', 'local' and 'consensus' all run on the same stream, the
same clients and the same noise. A server mixes the published forecasts with
online weights (rules 'eg' and 'hedge').

Table columns (root-mean-square errors after the burn-in, lower is better):
  mixture eg/hedge  the server's weighted mixture forecast
  uniform mean      the plain average of the clients' forecasts
  worst client      the largest per-client RMSE (the under-performer)
  average client    the mean of the per-client RMSEs
  max_i J_i         the worst client's discounted online cost of the game
"""

EPILOG = """\
examples:
  memoa run                                  # default: logistic map, 4000 clients, 3000 rounds
  memoa run --stream concept-drift --clients 1000 --steps 5000 --kappa 3
  memoa run --csv ../shared/datasets/ett/ETTh1.csv --column OT --clients 1000
  memoa run --json results.json --plot results.png
  memoa run --json | python -m json.tool     # JSON on stdout instead of the table
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as ``memoa run: error: ...`` with exit status 2."""


def _number(kind, *, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type`` checking a number's range; the message says what is accepted."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        ok_lo = low is None or (value > low if low_open else value >= low)
        ok_hi = high is None or (value < high if high_open else value <= high)
        if not (ok_lo and ok_hi):
            if high is None:
                need = f"{'>' if low_open else '>='} {low:g}"
            else:
                need = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memoa", description="memoa-fast: massive mixtures of online agents (MEMOA).",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run `memoa run --help` for the experiment's options.")
    parser.add_argument("--version", action="version", version=f"memoa-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run the time-series experiment and print the table",
                         description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    D = DEFAULTS
    pos_int = _number(int, low=1)

    g = run.add_argument_group("stream")
    g.add_argument("--stream", choices=STREAMS, default=None,
                   help=f"which series to forecast (default {D['stream']}; 'csv' needs --csv and --column). "
                        "Synthetic streams are seeded by --seed and z-scored.")
    g.add_argument("--csv", metavar="PATH", type=Path, help="a CSV file with a header row (implies --stream csv)")
    g.add_argument("--column", metavar="NAME", help="the CSV column to forecast, e.g. OT (ETT) or CAD (exchange rate)")
    g.add_argument("--warmup", type=_number(int, low=2), default=D["warmup"], metavar="ROWS",
                   help=f"CSV only: rows the z-score is fitted on, no look-ahead (default {D['warmup']})")
    g.add_argument("--steps", type=pos_int, default=None, metavar="T",
                   help=f"rounds to run: forecasts of y(1)..y(T), from a stream of T + 1 values "
                        f"(default {D['steps']} for synthetic streams; for CSV every row: rows - 1)")

    g = run.add_argument_group("clients")
    g.add_argument("--clients", type=pos_int, default=D["clients"], metavar="N",
                   help=f"number of clients (default {D['clients']})")
    g.add_argument("--noise", type=_number(float, low=0.0, low_open=True), nargs=2, metavar=("LOW", "HIGH"),
                   default=D["noise"], help="range of the clients' noise scales, log-uniform, in units of the "
                                            f"stream's standard deviation (default {D['noise'][0]} {D['noise'][1]})")
    g.add_argument("--lags", type=pos_int, default=D["lags"], metavar="P",
                   help=f"past values in each client's forecaster: features lags, lags^2, 1 (default {D['lags']})")
    g.add_argument("--mu", type=_number(float, low=0.0, high=2.0, low_open=True, high_open=True), default=D["mu"],
                   help=f"step size of the clients' normalised LMS, in (0, 2) (default {D['mu']})")

    g = run.add_argument_group("game (cost q|x-s|^2 + kappa|x-m|^2 + r|u|^2, discount gamma)")
    g.add_argument("--q", type=_number(float, low=0.0), default=D["q"],
                   help=f"weight on following the client's own forecast, >= 0 (default {D['q']:g})")
    g.add_argument("--kappa", type=_number(float, low=0.0), default=D["kappa"],
                   help=f"weight on staying near the population mean, >= 0 (default {D['kappa']:g})")
    g.add_argument("--r", type=_number(float, low=0.0, low_open=True), default=D["r"],
                   help=f"weight on the size of each move, > 0 (default {D['r']:g})")
    g.add_argument("--gamma", type=_number(float, low=0.0, high=1.0, low_open=True), default=D["gamma"],
                   help=f"discount factor, in (0, 1] (default {D['gamma']:g})")
    g.add_argument("--policies", default="memoa,greedy,local,consensus", metavar="LIST",
                   help="comma-separated policies to compare (default memoa,greedy,local,consensus)")

    g = run.add_argument_group("server")
    g.add_argument("--rule", choices=("both", "eg", "hedge"), default="both",
                   help="mixture rule(s) to score: 'eg' (exponentiated gradient on the mixture's loss), "
                        "'hedge' (weights by each client's own loss) or both (default)")
    g.add_argument("--eta", type=_number(float, low=0.0), default=D["eta"],
                   help=f"server learning rate, >= 0 (default {D['eta']:g})")
    g.add_argument("--alpha", type=_number(float, low=0.0, high=1.0), default=D["alpha"],
                   help=f"fixed share in [0, 1], lets the weights follow drift (default {D['alpha']:g})")

    g = run.add_argument_group("run")
    g.add_argument("--seed", type=_number(int, low=0), default=D["seed"], help="seed of the stream and the clients' noise (default 0)")
    g.add_argument("--burn-in", type=_number(int, low=0), default=None, metavar="ROUNDS",
                   help="rounds left out of the scores (default min(500, rounds/5))")
    g.add_argument("--threads", type=pos_int, default=None,
                   help=f"threads for the kernels, 1..{os.cpu_count()} (default all; small populations use one)")
    g.add_argument("--backend", choices=("numba", "cython", "numpy"), default="numba",
                   help="kernels: numba (default), cython (needs the compiled extension), numpy (slow reference)")
    g.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the results as JSON to PATH; without PATH, print JSON instead of the table")
    g.add_argument("--plot", type=Path, default=None, metavar="PNG",
                   help="write a figure: per-client RMSE distribution per policy, rolling error over time")
    g.add_argument("--quiet", action="store_true", help="no progress bar (it is off anyway when stderr is not a terminal)")
    parser.run_parser = run
    return parser


def _resolve(run: argparse.ArgumentParser, args: argparse.Namespace):
    """Check option combinations and load the stream; calls ``run.error`` (exit 2) on bad input."""
    from .game import POLICIES
    from .streams import CsvSeriesError, load_csv_series, make_stream

    stream = args.stream or ("csv" if args.csv is not None else DEFAULTS["stream"])
    if stream == "csv":
        if args.csv is None:
            run.error("--stream csv needs --csv PATH (a CSV file with a header row) and --column NAME")
        if args.column is None:
            columns = _header(args.csv)
            run.error("--csv needs --column NAME, the column to forecast" + (f"; {args.csv} has columns {columns}" if columns else ""))
    else:
        if args.csv is not None:
            run.error(f"--csv is only for --stream csv, not --stream {stream}")
        if args.column is not None:
            run.error("--column is only for CSV streams (give --csv PATH)")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies or len(set(policies)) != len(policies):
        run.error(f"argument --policies: expected distinct names among {', '.join(POLICIES)}, got {args.policies!r}")
    if args.q + args.kappa <= 0:
        run.error("arguments --q and --kappa: q + kappa must be > 0 (a client must care about something)")
    lo, hi = args.noise
    if hi < lo:
        run.error(f"argument --noise: LOW must be <= HIGH, got {lo:g} {hi:g}")
    if args.threads is not None and args.threads > (os.cpu_count() or 1):
        run.error(f"argument --threads: must be in [1, {os.cpu_count()}] (the cores this machine has), got {args.threads}")
    for option, target in (("--json", args.json), ("--plot", args.plot)):
        if target not in (None, "-"):
            folder = Path(target).resolve().parent
            if not folder.is_dir():
                run.error(f"argument {option}: folder {folder} does not exist (for {target})")
            if Path(target).is_dir():
                run.error(f"argument {option}: {target} is a folder, give a file name")
    if args.backend == "cython":
        try:
            import memoa_fast.kernels._cython as cy  # noqa: F401
        except ImportError as exc:
            run.error(f"argument --backend: cython needs the compiled extension, which is missing ({exc}); use --backend numba")
    if stream == "csv":
        if args.steps is not None and args.steps < args.warmup + 1:
            run.error(f"argument --steps: a CSV stream needs more rounds than the z-score warm-up "
                      f"(--warmup {args.warmup}), got --steps {args.steps}; lower --warmup or raise --steps")
        try:
            series = load_csv_series(args.csv, args.column, warmup=args.warmup,
                                     max_rows=None if args.steps is None else args.steps + 1)
        except FileNotFoundError as exc:
            run.error(f"argument --csv: {exc}")
        except (CsvSeriesError, UnicodeDecodeError, OSError) as exc:
            run.error(f"argument --csv/--column: {exc}")
        if args.steps is not None and len(series) < args.steps + 1:
            run.error(f"argument --steps: {args.csv} has {len(series)} rows in column {args.column!r}, "
                      f"enough for {len(series) - 1} rounds, asked for {args.steps}")
        name = f"{args.csv.name}:{args.column}"
    else:
        series = make_stream(stream, (args.steps or DEFAULTS["steps"]) + 1, seed=args.seed)
        name = stream
    n_rounds = len(series) - 1
    if args.burn_in is not None and args.burn_in >= n_rounds:
        run.error(f"argument --burn-in: must be smaller than the number of rounds ({n_rounds}), got {args.burn_in}")
    return series, name, policies


def _header(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return fh.readline().strip()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memoa`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nmemoa: error: choose a command (run)", file=sys.stderr)
        return 2
    run = parser.run_parser
    series, name, policies = _resolve(run, args)

    from .experiment import plot_result, run_experiment

    rules = ("eg", "hedge") if args.rule == "both" else (args.rule,)
    progress = not args.quiet and sys.stderr.isatty()
    try:
        result = run_experiment(
            series, stream=name, n_clients=args.clients, q=args.q, kappa=args.kappa, r=args.r, gamma=args.gamma,
            policies=policies, rules=rules, eta=args.eta, alpha=args.alpha, seed=args.seed, lags=args.lags,
            noise_range=tuple(args.noise), mu=args.mu, burn_in=args.burn_in, backend=args.backend,
            threads=args.threads, progress=progress,
        )
    except KeyboardInterrupt:
        print("memoa: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        run.error(f"argument --clients: not enough memory for {args.clients} clients; use fewer clients or fewer --policies")
    payload = result.to_dict()
    payload["command"] = shlex.join(["memoa", *(sys.argv[1:] if argv is None else argv)])
    if args.json == "-":
        print(json.dumps(payload, indent=2))
    else:
        print(result.table())
        if args.json is not None:
            try:
                Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
            except OSError as exc:
                print(f"memoa: error: argument --json: cannot write {args.json}: {exc}", file=sys.stderr)
                return 2
    if args.plot is not None:
        try:
            plot_result(result, args.plot)
        except OSError as exc:
            print(f"memoa: error: argument --plot: cannot write {args.plot}: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
