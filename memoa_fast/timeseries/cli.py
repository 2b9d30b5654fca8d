"""The ``memoa`` command: run the time-series experiment from a shell.

``memoa run`` with no options runs the built-in default (logistic map,
4000 clients, 3000 rounds) and prints the table; ``memoa run --help``
explains every option and its accepted range (:data:`RANGES`).

Guarantees: every bad option, option combination, input file or output
path exits with status 2 and one line on stderr naming the option, the value
and what is accepted, never a traceback, and **before** the run starts.
Output files (``--json PATH``, ``--plot PATH``) are written to a temporary
file in the same folder and renamed into place only when the run and every
output succeeded, so a failure leaves no partial file; an existing file is
replaced (keeping its permissions), and a symbolic link is followed (the file
it points to is replaced, the link kept). JSON output is strict
(no ``NaN``/``Infinity``; a non-finite score would be ``null``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import select
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import _backends
from .._validation import SEED_MAX, gib
from .._version import __version__
from ..checkpoint import _new_temporary, _remove_stale_temporaries, special_file
from . import experiment
from .experiment import DEFAULT_CLASSES, DEFAULT_RECLASS, PLOT_FORMATS, POLICIES, require_matplotlib
from .streams import OUTLIER_BOUND, CsvSeriesError, _csv_names, _csv_series, column_list, csv_columns, load_csv_series, make_stream
from .trust import MINIMAX_POWERS, TRUST_RULES

STREAMS = ("logistic", "periodic", "concept", "concept-drift", "csv")
DEFAULTS = dict(stream="logistic", clients=4000, rounds=3000, q=1.0, kappa=3.0, r=0.1, gamma=0.9, eta=0.5, alpha=0.01,
                seed=0, lags=2, noise=(0.02, 1.0), mu=0.1, warmup=500, missing="error", decimal=".", reclass=DEFAULT_RECLASS,
                trust_rule="minimax", outlier_bound=OUTLIER_BOUND)

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
  memoa run --stream concept-drift --clients 1000 --rounds 5000 --kappa 3
  memoa run --csv ETTh1.csv --column OT --clients 1000   # a downloaded copy of the ETT data
  zcat ETTh1.csv.gz | memoa run --csv - --column OT      # the CSV text on standard input (or --csv <(zcat ...))
  memoa run --json results.json --plot results.png
  memoa run --json | python -m json.tool     # JSON on stdout instead of the table
"""


#: Accepted range of every numeric option: (low, high, low_open, high_open). Checked before the run.
RANGES = {
    "--clients": (1, 10**7, False, False),
    "--rounds": (1, 10**7, False, False),
    "--warmup": (2, 10**6, False, False),
    "--noise": (1e-6, 1e3, False, False),
    "--lags": (1, 64, False, False),
    "--mu": (0.0, 2.0, True, True),
    "--outlier-bound": (0.0, 1e6, True, False),  # or "none"
    "--q": (0.0, 1e4, False, False),
    "--kappa": (0.0, 1e4, False, False),
    "--r": (1e-4, 1e4, False, False),
    "--gamma": (0.0, 1.0, True, False),
    "--eta": (0.0, 1e3, False, False),
    "--alpha": (0.0, 1.0, False, False),
    "--seed": (0, SEED_MAX, False, False),
    "--burn-in": (0, 10**7, False, False),
    "--threads": (1, 1024, False, False),  # and at most the CPUs this process may use
    "--classes": (1, 1024, False, False),  # and at most --clients
    "--reclass": (1, 10**7, False, False),
}
_INT = re.compile(r"[+-]?[0-9]+")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _short(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _interval(option: str) -> str:
    low, high, low_open, high_open = RANGES[option]
    text = [str(v) if isinstance(v, int) else f"{v:g}" for v in (low, high)]
    return f"{'(' if low_open else '['}{text[0]}, {text[1]}{')' if high_open else ']'}"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``memoa run: error: ...``, with exit status 2."""

    def error(self, message: str):  # noqa: D102
        message = " ".join(str(message).split())
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind, option: str):
    """An argparse ``type`` accepting a plain decimal number in ``RANGES[option]``; the message says what is."""
    low, high, low_open, high_open = RANGES[option]
    pattern = _INT if kind is int else _FLOAT

    def parse(text: str):
        word = "an integer" if kind is int else "a number"
        if not pattern.fullmatch(text.strip()):
            if text.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
                raise argparse.ArgumentTypeError(f"must be finite, got {_short(text)}; accepted: {_interval(option)}")
            raise argparse.ArgumentTypeError(f"expected {word} in {_interval(option)}, got {_short(text)}")
        value = kind(text)
        ok_lo = value > low if low_open else value >= low
        ok_hi = value < high if high_open else value <= high
        if not (ok_lo and ok_hi):
            raise argparse.ArgumentTypeError(f"must be in {_interval(option)}, got {_short(text)}")
        return value

    parse.__name__ = "integer" if kind is int else "number"
    return parse


def _bound_or_none(text: str):
    """``--outlier-bound``: a number in its range, or ``none`` (feed the series as it is)."""
    if text.strip().lower() == "none":
        return None
    try:
        return _number(float, "--outlier-bound")(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number in {_interval('--outlier-bound')} or 'none', got {_short(text)}") from None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    """The ``memoa`` argument parser (``run`` is its one command)."""
    parser = _Parser(prog="memoa", description="memoa-fast: massive mixtures of online agents (MEMOA).",
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run `memoa run --help` for the experiment's options.")
    parser.add_argument("--version", action="version", version=f"memoa-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="run the time-series experiment and print the table",
                         description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    D = DEFAULTS
    iv = _interval

    g = run.add_argument_group("stream")
    g.add_argument("--stream", choices=STREAMS, default=None,
                   help=f"which series to forecast (default {D['stream']}; 'csv' needs --csv and --column). "
                        "Synthetic streams are seeded by --seed and z-scored.")
    g.add_argument("--csv", metavar="PATH", type=_csv_source,
                   help="a UTF-8 CSV file with a header row, delimited by ',', tab, ';' or '|' (implies --stream "
                        "csv), read once: a pipe serves too (<(zcat ETTh1.csv.gz), a named pipe), and '-' reads "
                        "standard input (./- names a file '-'); see the README for the "
                        "public datasets (ETT, exchange rates) and where to download them")
    g.add_argument("--column", metavar="NAME", help="the CSV column to forecast, e.g. OT (ETT) or CAD (exchange rate)")
    g.add_argument("--missing", choices=("error", "drop"), default=None,
                   help="CSV only: an empty cell, a missing-value marker (NA, nan, NULL, '.', '?', ...) or a "
                        "spreadsheet's error value (#DIV/0!, #VALUE!, ...) is an error "
                        "(default) or a row to drop (FRED's holidays)")
    g.add_argument("--decimal", choices=(".", ","), default=None,
                   help="CSV only: the numbers' decimal mark (default '.'); with ',' (12,5) the delimiter is tab, ';' or "
                        "'|', never ','")
    g.add_argument("--warmup", type=_number(int, "--warmup"), default=None, metavar="ROWS",
                   help=f"CSV only: rows the z-score is fitted on, no look-ahead, in {iv('--warmup')} "
                        f"(default {D['warmup']})")
    g.add_argument("--rounds", "--steps", dest="rounds", type=_number(int, "--rounds"), default=None, metavar="T",
                   help=f"rounds to run, in {iv('--rounds')}: forecasts of y(1)..y(T), from a stream of T + 1 "
                        f"values (default {D['rounds']} for synthetic streams; for CSV every row: rows - 1). "
                        "--steps is an alias")

    g = run.add_argument_group("clients")
    g.add_argument("--clients", type=_number(int, "--clients"), default=D["clients"], metavar="N",
                   help=f"number of clients, in {iv('--clients')} (default {D['clients']})")
    g.add_argument("--noise", type=_number(float, "--noise"), nargs=2, metavar=("LOW", "HIGH"),
                   default=D["noise"], help="range of the clients' noise scales, log-uniform, in units of the "
                                            f"stream's standard deviation, each in {iv('--noise')} "
                                            f"(default {D['noise'][0]:g} {D['noise'][1]:g})")
    g.add_argument("--lags", type=_number(int, "--lags"), default=D["lags"], metavar="P",
                   help=f"past values in each client's forecaster: features lags, lags^2, 1; in {iv('--lags')} "
                        f"(default {D['lags']})")
    g.add_argument("--mu", type=_number(float, "--mu"), default=D["mu"],
                   help=f"step size of the clients' normalised LMS, in {iv('--mu')} (default {D['mu']:g})")
    g.add_argument("--outlier-bound", type=_bound_or_none, default=D["outlier_bound"], metavar="SD",
                   help="what learns (the clients' forecasters, the servers, memoa-trust's classes) is fed each value held "
                        "within SD standard deviations of the burn-in beyond the range of the values fed before it, a reach "
                        "doubled each row it holds (spikes, sentinel values; from row 20, and only with a burn-in of 19 "
                        "rounds or more); every score is against "
                        f"the series as it is. In {iv('--outlier-bound')}, or 'none' (default {D['outlier_bound']:g})")

    g = run.add_argument_group("game (cost q|x-s|^2 + kappa|x-m|^2 + r|u|^2, discount gamma)")
    g.add_argument("--q", type=_number(float, "--q"), default=D["q"],
                   help=f"weight on following the client's own forecast, in {iv('--q')}, > 0 with memoa-trust (default {D['q']:g})")
    g.add_argument("--kappa", type=_number(float, "--kappa"), default=D["kappa"],
                   help=f"weight on staying near the population mean, in {iv('--kappa')} (default {D['kappa']:g})")
    g.add_argument("--r", type=_number(float, "--r"), default=D["r"],
                   help=f"weight on the size of each move, in {iv('--r')} (default {D['r']:g})")
    g.add_argument("--gamma", type=_number(float, "--gamma"), default=D["gamma"],
                   help=f"discount factor, in {iv('--gamma')} (default {D['gamma']:g})")
    g.add_argument("--policies", default=",".join(POLICIES), metavar="LIST",
                   help=f"comma-separated policies to compare (default {','.join(POLICIES)})")

    g = run.add_argument_group("memoa-trust (K quantile classes by each client's measured error, MODEL.md section 7)")
    g.add_argument("--classes", type=_number(int, "--classes"), default=None, metavar="K",
                   help=f"trust classes K, in {iv('--classes')} and at most --clients (default 8, or --clients "
                        "if that is smaller)")
    g.add_argument("--reclass", type=_number(int, "--reclass"), default=None, metavar="R",
                   help=f"rounds between two re-formings of the classes, in {iv('--reclass')} and below the number of rounds "
                        f"(default {D['reclass']})")
    betas = ", ".join(f"{p:g}" for p in MINIMAX_POWERS)
    g.add_argument("--trust-rule", choices=TRUST_RULES, default=None,
                   help="memoa-trust's class weights q_j = q (median v / mean_j v)^beta: 'error' uses beta = 1.5; "
                        f"'minimax' (default) runs one population per beta in {betas} and publishes the one whose "
                        "worst class has the lowest measured cost, chosen again at every re-forming (see the README)")
    g.add_argument("--trust-feedforward", action="store_true",
                   help="keep memoa-trust's feed-forward term C (m_l - m_l*) (off by default: see the README)")

    g = run.add_argument_group("server")
    g.add_argument("--rule", choices=("both", "eg", "hedge"), default="both",
                   help="mixture rule(s) to score: 'eg' (exponentiated gradient on the mixture's loss), "
                        "'hedge' (weights by each client's own loss) or both (default)")
    g.add_argument("--eta", type=_number(float, "--eta"), default=D["eta"],
                   help=f"server learning rate, in {iv('--eta')} (default {D['eta']:g})")
    g.add_argument("--alpha", type=_number(float, "--alpha"), default=D["alpha"],
                   help=f"fixed share, in {iv('--alpha')}; lets the weights follow drift (default {D['alpha']:g})")

    g = run.add_argument_group("run")
    g.add_argument("--seed", type=_number(int, "--seed"), default=D["seed"],
                   help="seed of the stream and the clients' noise, an integer in [0, 2**63 - 1] (default 0)")
    g.add_argument("--burn-in", type=_number(int, "--burn-in"), default=None, metavar="ROUNDS",
                   help="rounds left out of the scores, smaller than the rounds (default min(500, rounds/5); with --csv "
                        "at least --warmup - 1, so that no scored target is a row the z-score was fitted on)")
    g.add_argument("--threads", type=_number(int, "--threads"), default=None,
                   help=f"threads for the kernels, 1..{usable_cpus()} (the CPUs this process may use; "
                        "default all; small populations use one)")
    g.add_argument("--backend", choices=("numba", "cython", "numpy"), default="numba",
                   help="kernels: numba (default), cython (needs the compiled extension; never imports Numba), "
                        "numpy (slow reference)")
    g.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="also write the results as strict JSON to PATH (an existing file is replaced once the run succeeded; "
                        "a symbolic link is followed); without PATH, print JSON instead of the table")
    g.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="write a figure (.png, .pdf, .svg, ...; needs the plot extra: pip install \"memoa-fast[plot]\"): "
                        "per-client RMSE distribution, rolling mixture error, worst client and max_i J_i over time (an existing "
                        "file is replaced once the run succeeded)")
    g.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is off anyway when stderr is not a terminal or tqdm is not installed)")
    parser.run_parser = run
    return parser


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def memory_estimate(n_clients: int, n_rounds: int, n_policies: int, n_rules: int, lags: int, dim: int = 1,
                    extra_populations: int = 0) -> tuple[int, int]:
    """Rough bytes the run holds: ``(per-client part, per-round part)``.

    Per client: forecasters ``8 d (3 p + 4)``; per policy a population, its
    servers and its scorer, ``8 d (8 + 2 rules)``; ``8 d 6`` for each extra
    population (memoa-trust's minimax rule runs one per exponent). Per
    round: the stream and ``rules + 4`` recorded numbers per policy.
    """
    per_client = 8 * dim * ((3 * lags + 4) + n_policies * (8 + 2 * n_rules) + 6 * extra_populations)
    per_round = 8 * dim + 8 * n_policies * (n_rules + 4)
    return n_clients * per_client, (n_rounds + 1) * per_round


def _gib(n: float) -> str:
    return f"{gib(n)} GiB"


def _check_output(run, option: str, target) -> Path:
    """Check an output path before the run: its folder exists and takes a new file; returns it.

    The folder is the one of the file written: a symbolic link's target's (see :class:`_PendingFile`).
    """
    path = Path(target)
    if path.is_dir():
        run.error(f"argument {option}: {str(path)!r} is a folder, give a file name")
    kind = special_file(path)
    if kind:  # the result is renamed into place: /dev/null (as root) or a named pipe would be replaced by a file
        run.error(f"argument {option}: {str(path)!r} is {kind}, not a regular file; the result is written to a new file "
                  "and renamed into place, which would replace it: give a file name"
                  + (" (or --json without PATH to print the JSON)" if option == "--json" else ""))
    folder = Path(os.path.realpath(path)).parent
    if not folder.is_dir():
        run.error(f"argument {option}: folder {str(folder)!r} does not exist (for {str(path)!r})")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".memoa-probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        run.error(f"argument {option}: cannot create a file in folder {str(folder)!r}: {exc.strerror or exc}")
    if path.exists() and not os.access(path, os.W_OK):
        run.error(f"argument {option}: {str(path)!r} exists and is not writable")
    return path


def same_file(a, b) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard and symbolic links), else the same resolved path."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _csv_source(text: str):
    """``--csv``'s value: ``STDIN`` for ``-`` (standard input), else a path (``./-`` is a file named ``-``)."""
    return STDIN if text == STDIN else Path(text)


#: ``--csv -``: the CSV text is read from standard input, named ``STDIN_NAME`` in messages.
STDIN, STDIN_NAME = "-", "<stdin>"


def _csv_label(csv) -> str:
    """The --csv source as messages name it."""
    return STDIN_NAME if csv == STDIN else str(csv)


def _stdin(run):
    """Standard input's binary stream, for ``--csv -``, its reads blocking; exit 2 when the process has none (it was closed).

    A non-blocking standard input (its file description is shared: a parent, a terminal, an event loop may have left
    it so) ends a read early whenever the pipe is empty for a moment, which the reader took for the end of the data.
    It is read through :class:`_WaitingReader` then, and left as it is (making it blocking would change it for the
    other processes that share it).
    """
    if sys.stdin is None:
        run.error("argument --csv: '-' reads standard input, and this process has none (it is closed)")
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream a caller put there (io.StringIO): its text, as the UTF-8 a file would hold
        return io.BytesIO(sys.stdin.read().encode("utf-8", "surrogateescape"))
    try:
        blocking = os.get_blocking(stream.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor behind it (a stream a caller put there)
        return stream
    return stream if blocking else io.BufferedReader(_WaitingReader(stream.fileno()))


class _WaitingReader(io.RawIOBase):
    """The non-blocking file descriptor ``fd`` read as a blocking one; closing it leaves ``fd`` open.

    A read that would block waits for data (or the end) instead.
    """

    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer) -> int:
        while True:
            try:
                data = os.read(self._fd, len(buffer))
            except BlockingIOError:
                if hasattr(select, "poll"):
                    poller = select.poll()
                    poller.register(self._fd, select.POLLIN)
                    poller.poll()  # wakes at data, the writer's close or an error (then the read says which)
                else:  # pragma: no cover - Windows: a non-blocking pipe, and no poll for it
                    time.sleep(0.01)
                continue
            buffer[: len(data)] = data
            return len(data)


def _stdin_is(target) -> bool:
    """Whether standard input is the file ``target`` (``--csv - < out.json``), by its inode."""
    try:
        return os.path.samestat(os.fstat(sys.stdin.fileno()), os.stat(target))
    except (OSError, ValueError, AttributeError):  # no such file yet, or no standard input with a file behind it
        return False


def _not_the_input(run, option: str, target, csv_path) -> None:
    """Refuse an output path that names the input CSV file (writing the result would replace the user's data)."""
    if csv_path is not None and (_stdin_is(target) if csv_path == STDIN else same_file(target, csv_path)):
        given = "'-' (standard input)" if csv_path == STDIN else repr(str(csv_path))
        run.error(f"argument {option}: {str(target)!r} is the input file --csv {given}; writing the result "
                  "there would replace the data: give another file name")


def _resolve(run: argparse.ArgumentParser, args: argparse.Namespace):
    """Check every option and combination and load the stream; ``run.error`` (exit 2) on bad input."""
    stream = args.stream or ("csv" if args.csv is not None else DEFAULTS["stream"])
    if stream == "csv":
        if args.csv is None:
            run.error("--stream csv needs --csv PATH (a CSV file with a header row) and --column NAME")
        if args.column is None:
            decimal = args.decimal or DEFAULTS["decimal"]
            try:
                columns = column_list(_csv_names(_stdin(run), STDIN_NAME, decimal) if args.csv == STDIN
                                      else csv_columns(args.csv, decimal=decimal))
            except (CsvSeriesError, OSError) as exc:
                run.error(f"--csv needs --column NAME, the column to forecast; and argument --csv: {exc}")
            run.error(f"--csv needs --column NAME, the column to forecast; {_csv_label(args.csv)} has columns {columns}")
    else:
        if args.csv is not None:
            run.error(f"--csv is only for --stream csv, not --stream {stream}")
        if args.column is not None:
            run.error("--column is only for CSV streams (give --csv PATH)")
        csv_only = (("--warmup", args.warmup), ("--missing", args.missing), ("--decimal", args.decimal))
        for option, value in csv_only:  # not silently ignored
            if value is not None:
                run.error(f"{option} is only for CSV streams (give --csv PATH); --stream {stream} is z-scored whole "
                          "and has no gaps")
    args.warmup = DEFAULTS["warmup"] if args.warmup is None else args.warmup
    args.missing = args.missing or DEFAULTS["missing"]
    args.decimal = args.decimal or DEFAULTS["decimal"]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies or len(set(policies)) != len(policies):
        run.error(f"argument --policies: expected distinct names among {', '.join(POLICIES)}, got {_short(args.policies)}")
    if "memoa-trust" not in policies:  # its options would be ignored without a word, as --column without --csv
        given = [option for option, value in (("--classes", args.classes), ("--reclass", args.reclass),
                                              ("--trust-rule", args.trust_rule), ("--trust-feedforward", args.trust_feedforward or None))
                 if value is not None]
        if given:
            run.error(f"{given[0]} is only for the policy memoa-trust, which --policies {_short(args.policies)} leaves out; "
                      f"add memoa-trust to --policies or drop {given[0]}")
    if args.classes is None:
        args.classes = min(DEFAULT_CLASSES, args.clients)
    # --reclass stays None when not given: run_experiment takes its default (DEFAULTS["reclass"]) and notes below the
    # table when it never re-forms; a --reclass given that never re-forms is an error (below, once the rounds are known)
    args.trust_rule = args.trust_rule or DEFAULTS["trust_rule"]
    if "memoa-trust" in policies and args.classes > args.clients:
        run.error(f"argument --classes: must be at most --clients={args.clients}, got {args.classes}")
    if args.q + args.kappa <= 0:
        run.error("arguments --q and --kappa: q + kappa must be > 0 (a client must care about something)")
    if "memoa-trust" in policies and args.q == 0:
        run.error("argument --q: memoa-trust needs q > 0 (its class weights are q (median v / mean_j v)^beta), got "
                  f"{args.q:g}; give --q > 0, or leave memoa-trust out of --policies")
    lo, hi = args.noise
    if hi < lo:
        run.error(f"argument --noise: LOW must be <= HIGH, got {lo:g} {hi:g}")
    cpus = usable_cpus()
    if args.threads is not None and args.threads > cpus:
        run.error(f"argument --threads: must be in [1, {cpus}] (the CPUs this process may use), got {args.threads}")
    rules = ("eg", "hedge") if args.rule == "both" else (args.rule,)

    # Outputs first: nothing runs if a result could not be written, and no output may replace an input.
    if args.json not in (None, "-"):
        _check_output(run, "--json", args.json)
        _not_the_input(run, "--json", args.json, args.csv)
    if args.plot is not None:
        suffix = args.plot.suffix.lower().lstrip(".")
        if suffix not in PLOT_FORMATS:
            run.error(f"argument --plot: the file name must end in one of {', '.join('.' + f for f in PLOT_FORMATS)}, "
                      f"got {_short(str(args.plot))}")
        _check_output(run, "--plot", args.plot)
        _not_the_input(run, "--plot", args.plot, args.csv)
        if args.json not in (None, "-") and same_file(args.json, args.plot):
            run.error(f"arguments --json and --plot: give two different files, got {str(args.plot)!r} for both")
        try:
            require_matplotlib()
        except ImportError as exc:
            run.error(f"argument --plot: {exc}")
    if args.backend == "cython":
        try:
            _backends.load("cython")
        except ImportError as exc:
            run.error(f"argument --backend: cython needs the compiled extension, which is missing ({exc}); use --backend numba")

    # Sizes: the largest run that fits in memory, checked before anything is allocated.
    planned_rounds = args.rounds or DEFAULTS["rounds"]
    if stream == "csv" and args.rounds is None:
        planned_rounds = 0  # the file decides; checked again once it is read
    _check_memory(run, args, planned_rounds, policies, len(rules))

    if stream == "csv":
        if args.rounds is not None and args.rounds < args.warmup + 1:
            run.error(f"argument --rounds: a CSV stream needs more rounds than the z-score warm-up "
                      f"(--warmup {args.warmup}), got --rounds {args.rounds}; lower --warmup or raise --rounds")
        limit = RANGES["--rounds"][1]
        max_rows = (limit if args.rounds is None else args.rounds) + 1
        label = _csv_label(args.csv)
        try:
            if args.csv == STDIN:  # read once, as a file is (the options are checked: argparse did)
                series, _, _, dropped = _csv_series(_stdin(run), STDIN_NAME, args.column, args.warmup, max_rows,
                                                    args.missing == "drop", args.decimal)
            else:
                series, dropped = load_csv_series(args.csv, args.column, warmup=args.warmup, missing=args.missing,
                                                  max_rows=max_rows, return_dropped=True, decimal=args.decimal)
        except FileNotFoundError as exc:
            run.error(f"argument --csv: {exc}")
        except (CsvSeriesError, OSError) as exc:
            run.error(f"argument --csv/--column: {exc}")
        if args.rounds is not None and len(series) < args.rounds + 1:
            run.error(f"argument --rounds: {label} has {len(series)} rows in column {args.column!r}, "
                      f"enough for {len(series) - 1} rounds, asked for {args.rounds}")
        if dropped:  # asked for, but never silent: the series is shorter, and its rows no longer equally spaced
            print(f"memoa: note: --missing drop dropped {dropped} of {dropped + len(series)} rows read from {label} "
                  f"(an empty cell, a missing-value marker, a spreadsheet's error value or a blank line in column "
                  f"{args.column!r}); the series has the "
                  f"other {len(series)} values, in order", file=sys.stderr)
        if args.rounds is None and len(series) == limit + 1:
            print(f"memoa: note: --csv has more rows than the largest run; using the first {limit + 1} "
                  f"({limit} rounds)", file=sys.stderr)
        name = f"{label if args.csv == STDIN else args.csv.name}:{args.column}"
        source = {"csv": str(args.csv), "column": args.column, "warmup": args.warmup, "missing": args.missing,
                  "decimal": args.decimal, "rows": len(series), "rows_dropped": dropped}
    else:
        series = make_stream(stream, planned_rounds + 1, seed=args.seed)
        name = stream
        source = {"stream": stream, "length": len(series), "seed": args.seed}
    n_rounds = len(series) - 1
    _check_memory(run, args, n_rounds, policies, len(rules))
    if args.burn_in is not None and args.burn_in >= n_rounds:
        run.error(f"argument --burn-in: must be smaller than the number of rounds ({n_rounds}), got {args.burn_in}")
    if args.reclass is not None and "memoa-trust" in policies and args.reclass >= n_rounds:  # the default: a note under the table
        run.error(f"argument --reclass: memoa-trust re-forms its classes every R rounds, the first time after round R; "
                  f"with --reclass {args.reclass} and {n_rounds} rounds it never would (it would run as MEMOA with equal "
                  f"classes): " + experiment.reclass_range(n_rounds, "give --reclass", ", or more rounds"))
    return series, name, policies, rules, source


def _check_memory(run, args, n_rounds: int, policies: list, n_rules: int) -> None:
    available = _available_memory()
    if available is None:
        return
    n_policies = len(policies)
    extra = len(MINIMAX_POWERS) - 1 if args.trust_rule == "minimax" and "memoa-trust" in policies else 0
    fewer = "--policies or --trust-rule error" if extra else "--policies"
    clients_b, rounds_b = memory_estimate(args.clients, n_rounds, n_policies, n_rules, args.lags, extra_populations=extra)
    if clients_b + rounds_b > 0.8 * available:
        if clients_b >= rounds_b:
            run.error(f"argument --clients: {args.clients} clients need about {_gib(clients_b + rounds_b)} of memory "
                      f"with {n_policies} policies, {_gib(available)} is available; use fewer clients or {fewer}")
        run.error(f"argument --rounds: {n_rounds} rounds need about {_gib(clients_b + rounds_b)} of memory "
                  f"with {n_policies} policies, {_gib(available)} is available; use fewer rounds or {fewer}")


class _PendingFile:
    """A result file written to a temporary file in its folder, renamed into place by :meth:`commit`.

    A symbolic link is followed, as checkpoints do: the file it points to is replaced (the temporary file is made
    in that file's folder, so the rename never crosses file systems) and the link is kept. An existing file keeps
    its permissions.

    Its name is ``.<name>.XXXXXXXX.tmp``, as a checkpoint's: a run killed while writing (SIGKILL, a power cut) leaves
    one, and the next run that writes the same file removes those last modified before it started (SIGTERM and
    Ctrl-C discard their own). The run holds a lock on it until it is renamed or discarded, so a concurrent run
    writing the same file never removes it (the lock ends with the process: a killed run's is removed).
    """

    def __init__(self, path: Path):
        self.path = Path(os.path.realpath(path))
        self.fd, tmp = _new_temporary(self.path)
        self.tmp = Path(tmp)

    def commit(self, started: float) -> None:
        """Rename the temporary file into place, then remove stale ones of runs killed before ``started``."""
        try:
            mode = self.path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o666 & ~mask  # mkstemp makes 0600; give a new file the usual permissions
        os.chmod(self.tmp, mode)
        os.replace(self.tmp, self.path)
        self._close()
        _remove_stale_temporaries(self.path, started)

    def discard(self) -> None:
        try:
            self.tmp.unlink()
        except FileNotFoundError:
            pass
        self._close()

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Terminated(KeyboardInterrupt):
    """SIGTERM while the result is written: handled as Ctrl-C (the temporary files discarded), exit 128 + 15."""


def _csv_burn_in(burn_in: int | None, n_rounds: int, source: dict) -> int | None:
    """The burn-in of the run: for a CSV series, by default no scored target lies in the z-score's warm-up.

    A CSV series is z-scored on its first ``W = --warmup`` rows, and round ``t`` forecasts ``y(t+1)``: the rounds
    ``t < W - 1`` forecast a value whose mean and spread were fitted on the rows after it, a look-ahead (their scores
    moved by 4% on an ETTh1 excerpt when a later warm-up row was changed). The default burn-in is therefore at least
    ``W - 1`` for a CSV series (``W - 1 < rounds`` always: ``--rounds`` exceeds the warm-up). A smaller ``--burn-in``
    given on purpose is kept, with a note on stderr.
    """
    if "warmup" not in source:  # a synthetic stream: z-scored as it is generated, nothing to leave out
        return burn_in
    fitted = source["warmup"] - 1
    if burn_in is None:
        return max(experiment.default_burn_in(n_rounds), fitted)
    if burn_in < fitted:
        print(f"memoa: note: --burn-in {burn_in} scores rounds {burn_in}..{fitted - 1}, whose targets are rows of the "
              f"z-score's warm-up (--warmup {source['warmup']}): their scores see the later warm-up rows "
              f"(the default burn-in for --csv is at least {fitted})", file=sys.stderr)
    return burn_in


def _interrupt(signum, frame):
    raise _Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``memoa`` console script; returns the exit status."""
    parser = build_parser()
    given = sys.argv[1:] if argv is None else list(argv)
    option = given[0].split("=", 1)[0] if given else ""
    if option not in ("-h", "--help") and option in parser.run_parser._option_string_actions:  # `memoa --clients 10`
        parser.error(f"{option} is an option of the command run, which comes first: memoa run {shlex.join(given)}")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        print("\nmemoa: error: choose a command (run)", file=sys.stderr)
        return 2
    run = parser.run_parser
    started = time.time()  # a temporary output file older than this is a killed run's (see _PendingFile)
    try:
        series, name, policies, rules, source = _resolve(run, args)
    except KeyboardInterrupt:  # while the CSV input is read: a named pipe's writer waited for, a slow pipe, a terminal
        print("memoa: interrupted", file=sys.stderr)
        return 130
    burn_in = _csv_burn_in(args.burn_in, len(series) - 1, source)

    progress = not args.quiet and sys.stderr.isatty()
    try:
        result = experiment.run_experiment(
            series, stream=name, n_clients=args.clients, q=args.q, kappa=args.kappa, r=args.r, gamma=args.gamma,
            policies=policies, classes=args.classes, reclass=args.reclass, trust_feedforward=args.trust_feedforward,
            trust_rule=args.trust_rule,
            rules=rules, eta=args.eta, alpha=args.alpha, seed=args.seed, lags=args.lags,
            noise_range=tuple(args.noise), mu=args.mu, burn_in=burn_in, outlier_bound=args.outlier_bound,
            backend=args.backend,
            threads=args.threads, progress=progress,
        )
    except KeyboardInterrupt:
        print("memoa: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        run.error(f"argument --clients: not enough memory for {args.clients} clients and {len(series) - 1} rounds; "
                  "use fewer clients, rounds or --policies")
    except (ValueError, TypeError, ImportError) as exc:
        run.error(str(exc))
    payload = result.to_dict()
    payload["source"] = source  # how the series was made: with the config, the run's every input (defaults included)
    payload["command"] = shlex.join(["memoa", *given])
    text = json.dumps(payload, indent=2, allow_nan=False)

    pending = []
    # SIGTERM (kill, a job scheduler's time limit) while writing: discard the temporary files as for Ctrl-C. Only where
    # its action is the default (die, leaving them behind): an ignored SIGTERM stays ignored, and the handler of a
    # program that calls main() is its own (whatever it raises, the temporary files are discarded below).
    on_term = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        on_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.json not in (None, "-"):
            pending.append(("--json", _PendingFile(args.json)))
            pending[-1][1].tmp.write_text(text + "\n")
        if args.plot is not None:
            pending.append(("--plot", _PendingFile(args.plot)))
            experiment.plot_result(result, pending[-1][1].tmp, format=args.plot.suffix.lower().lstrip("."))
        for _, f in pending:
            f.commit(started)
    except BaseException as exc:  # whatever stopped the plotting or writing, no temporary file is left behind
        for _, f in pending:
            f.discard()
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (_Terminated)
            print("memoa: terminated" if isinstance(exc, _Terminated) else "memoa: interrupted", file=sys.stderr)
            return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else 130
        if isinstance(exc, (OSError, ValueError, ImportError)):
            option = pending[-1][0] if pending else "--json"
            run.error(f"argument {option}: cannot write the result: {exc}")
        raise  # SystemExit from the calling program's signal handler, ...
    finally:
        if on_term is not None:
            signal.signal(signal.SIGTERM, on_term)
    try:
        print(text if args.json == "-" else result.table(), flush=True)
    except BrokenPipeError:  # `memoa run | head`: the reader left; the files are already in place
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
