"""The ``memoa`` command: default run, JSON, plot, and clear errors (exit 2, one line, no traceback) on bad options."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import memoa_fast.timeseries.experiment as experiment
from memoa_fast.timeseries import cli
from memoa_fast.timeseries.cli import RANGES, build_parser, main
from memoa_fast.timeseries.experiment import held_feed
from memoa_fast.timeseries.streams import OUTLIER_BOUND, make_stream

FAST = ["--clients", "60", "--rounds", "300", "--quiet"]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_run_prints_the_table(capsys):
    code, out, err = _run(["run", *FAST], capsys)
    assert code == 0
    assert "RMSE on stream logistic: 60 clients, 300 rounds" in out
    for policy in ("memoa", "greedy", "local", "consensus"):
        assert f"| {policy}" in out
    assert "mixture eg" in out and "mixture hedge" in out and "max_i J_i" in out
    assert "Traceback" not in err


def test_json_on_stdout_parses(capsys):
    code, out, _ = _run(["run", *FAST, "--stream", "concept-drift", "--rule", "hedge", "--json"], capsys)
    assert code == 0
    d = json.loads(out)  # stdout holds only the JSON
    assert d["stream"] == "concept-drift" and d["config"]["rules"] == ["hedge"] and d["n_rounds"] == 300
    assert set(d["policies"]["memoa"]["mixture_rmse"]) == {"hedge"}
    assert d["command"].startswith("memoa run --clients 60")


def test_outlier_bound_reaches_the_run(capsys):
    """--outlier-bound SD is the run's outlier_bound, 'none' (any case) is None; the JSON records it and the count held."""
    for text, want in (("none", None), ("NONE", None), ("2.5", 2.5), (None, OUTLIER_BOUND)):
        argv = ["run", "--clients", "10", "--rounds", "100", "--quiet", "--policies", "memoa", "--json"]
        _, out, _ = _run(argv + ([] if text is None else ["--outlier-bound", text]), capsys)
        d = json.loads(out)
        assert d["config"]["outlier_bound"] == want
        assert d["outliers_held"] == (0 if want is None else held_feed(make_stream("logistic", 101, seed=0)[:, None], 20, want)[1])


def test_steps_is_an_alias_of_rounds(capsys):
    runs = []
    for opt in ("--rounds", "--steps"):
        _, out, _ = _run(["run", "--clients", "20", opt, "120", "--quiet", "--policies", "memoa", "--json"], capsys)
        d = json.loads(out)
        d.pop("elapsed_s"), d.pop("command")
        runs.append(d)
    assert runs[0] == runs[1] and runs[0]["n_rounds"] == 120


def test_trust_rule_reaches_memoa_trust(capsys):
    """--trust-rule error is memoa-trust with one exponent; minimax (the default) may differ from it, nothing else does."""
    runs = {}
    for rule in ("error", "minimax", None):
        argv = ["run", "--clients", "40", "--rounds", "400", "--quiet", "--policies", "memoa,memoa-trust", "--json",
                *(["--trust-rule", rule] if rule else [])]
        _, out, _ = _run(argv, capsys)
        runs[rule] = json.loads(out)
    assert runs[None]["config"]["trust_rule"] == "minimax" and runs["error"]["config"]["trust_rule"] == "error"
    assert runs[None]["policies"] == runs["minimax"]["policies"]
    assert runs["error"]["policies"]["memoa"] == runs["minimax"]["policies"]["memoa"]
    assert runs["error"]["policies"]["memoa-trust"] != runs["minimax"]["policies"]["memoa-trust"]


def test_json_file_and_plot(tmp_path, capsys):
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, _ = _run(["run", *FAST, "--stream", "periodic", "--policies", "memoa,local", "--kappa", "3",
                         "--json", str(js), "--plot", str(png)], capsys)
    assert code == 0 and "| memoa" in out and "| greedy" not in out
    d = json.loads(js.read_text())
    assert d["config"]["kappa"] == 3.0 and list(d["policies"]) == ["memoa", "local"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_same_seed_same_json(capsys):
    outs = []
    for _ in range(2):
        _, out, _ = _run(["run", *FAST, "--seed", "3", "--json"], capsys)
        d = json.loads(out)
        d.pop("elapsed_s")
        outs.append(d)
    assert outs[0] == outs[1]


def test_csv_run(tmp_path, capsys):
    rows = "\n".join(f"{i},{(i * 37 % 101) / 10}" for i in range(400))
    path = tmp_path / "s.csv"
    path.write_text("t,value\n" + rows + "\n")
    code, out, _ = _run(["run", "--csv", str(path), "--column", "value", "--warmup", "100", *FAST[:2], "--quiet"], capsys)
    assert code == 0 and "RMSE on stream s.csv:value: 60 clients, 399 rounds" in out


STDIN_RUN = ["--column", "value", "--warmup", "20", "--clients", "10", "--policies", "memoa", "--quiet"]
STDIN_TEXT = "t,value\n" + "".join(f"{i},{(i * 37 % 101) / 10}\n" for i in range(60))


def test_csv_dash_reads_standard_input_in_a_subprocess():
    """``zcat ETTh1.csv.gz | memoa run --csv - --column OT``: '-' was a file name ("CSV file not found: '-'"); it is
    standard input now, read once (a pipe here), named '<stdin>'.
    """
    import importlib.util

    fast = ["--backend", "cython"] if importlib.util.find_spec("memoa_fast.kernels._cython") else []  # no JIT to load: < 1 s
    proc = subprocess.run([sys.executable, "-P", "-m", "memoa_fast.timeseries.cli", "run", "--csv", "-", *STDIN_RUN, *fast],
                          input=STDIN_TEXT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "RMSE on stream <stdin>:value: 10 clients, 59 rounds" in proc.stdout


def test_csv_dash_names_standard_input_and_keeps_it_from_being_overwritten(tmp_path, capsys, monkeypatch):
    """``--csv -``: messages name '<stdin>', the JSON records '-', an output that is the file standard input reads is
    refused (``--csv - --json d.json < d.json``), and ``./-`` still names a file '-'.
    """
    data = tmp_path / "d.json"
    data.write_text(STDIN_TEXT.replace("9,", "9,oops"))  # a bad cell on line 11

    def stdin_from(path):
        handle = open(path, encoding="utf-8")
        monkeypatch.setattr(sys, "stdin", handle)
        return handle

    for argv, needle in [(["--column", "value"], "argument --csv/--column: <stdin>, line 11 (data row 10), column "
                                                 "'value': 'oops3.0' is not a number"),
                         ([], "--csv needs --column NAME, the column to forecast; <stdin> has columns 't', 'value'"),
                         (["--column", "value", "--json", str(data)],
                          f"argument --json: {str(data)!r} is the input file --csv '-' (standard input)")]:
        with stdin_from(data), pytest.raises(SystemExit) as exc:
            main(["run", "--csv", "-", "--quiet", *argv])
        assert exc.value.code == 2
        _one_line_error(capsys.readouterr().err, needle)
    data.write_text(STDIN_TEXT)
    with stdin_from(data):
        code, out, _ = _run(["run", "--csv", "-", *STDIN_RUN, "--json"], capsys)
    record = json.loads(out)
    assert code == 0 and record["stream"] == "<stdin>:value" and record["source"]["csv"] == "-"
    assert record["source"]["rows"] == 60
    monkeypatch.setattr(sys, "stdin", io.StringIO(STDIN_TEXT))  # a text stream a caller put there: no buffer, no file
    code, out, _ = _run(["run", "--csv", "-", *STDIN_RUN, "--json"], capsys)
    assert code == 0 and json.loads(out)["source"]["rows"] == 60
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_text(STDIN_TEXT)
    monkeypatch.setattr(sys, "stdin", None)  # not read
    code, out, _ = _run(["run", "--csv", "./-", *STDIN_RUN], capsys)
    assert code == 0 and "RMSE on stream -:value: 10 clients, 59 rounds" in out


@pytest.mark.skipif(not hasattr(os, "set_blocking") or not hasattr(os, "O_NONBLOCK"), reason="no non-blocking pipes here")
def test_csv_dash_reads_a_non_blocking_standard_input_to_its_end(capsys, monkeypatch):
    """``--csv -`` whose standard input is non-blocking (the file description is shared: a parent, a terminal, an event
    loop left it so): a read finding the pipe empty for a moment returned what had come so far, and that was taken for
    the end: the run went on with the first rows only, silently (exit 0). Now the reads wait for data, and standard
    input is left non-blocking (it is not this process's alone).
    """
    import threading
    import time

    r, w = os.pipe()
    os.set_blocking(r, False)
    data = STDIN_TEXT.encode()

    def write():  # the first half, a pause (the reader finds the pipe empty), then the rest
        os.write(w, data[: len(data) // 2])
        time.sleep(0.3)
        os.write(w, data[len(data) // 2:])
        os.close(w)

    writer = threading.Thread(target=write, daemon=True)
    stdin = io.TextIOWrapper(open(r, "rb"))
    monkeypatch.setattr(sys, "stdin", stdin)
    writer.start()
    try:
        code, out, err = _run(["run", "--csv", "-", *STDIN_RUN, "--json"], capsys)
    finally:
        writer.join(5)
        assert not os.get_blocking(r)
        stdin.close()
    assert code == 0, err
    assert json.loads(out)["source"]["rows"] == 60


@pytest.mark.parametrize("csv", ["-", "pipe.csv"])
def test_ctrl_c_while_the_csv_input_is_read_is_an_interruption(tmp_path, capsys, monkeypatch, csv):
    """Ctrl-C while the CSV input is read (a named pipe's writer waited for, up to CSV_PIPE_WAIT; a slow pipe; standard
    input from a terminal) escaped main() as a traceback; it ends the command as Ctrl-C during the run does: a line
    and exit status 130.
    """
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_csv_series", interrupted)
    monkeypatch.setattr(cli, "_csv_series", interrupted)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    try:
        code, _, err = _run(["run", "--csv", csv if csv == "-" else str(tmp_path / csv), *STDIN_RUN], capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while the input was read escaped main()")
    assert code == 130 and err == "memoa: interrupted\n", err


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd here")
def test_csv_pipe_is_opened_once_by_the_run(tmp_path, capsys, monkeypatch):
    """``memoa run --csv <(zcat s.csv.gz) --json out.json``: the pipe (``/dev/fd/N``) was refused; it is read now, opened
    once (checking the outputs against it reads nothing from it).
    """
    import threading

    r, w = os.pipe()

    def write():
        with os.fdopen(w, "wb") as fh:
            fh.write(STDIN_TEXT.encode())

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    pipe, out = f"/dev/fd/{r}", tmp_path / "out.json"
    try:
        code, _, _ = _run(["run", "--csv", pipe, *STDIN_RUN, "--json", str(out)], capsys)
    finally:
        writer.join(5)
        os.close(r)
    assert code == 0 and opened.count(pipe) == 1, opened
    assert json.loads(out.read_text())["source"] == {"csv": pipe, "column": "value", "warmup": 20, "missing": "error",
                                                     "decimal": ".", "rows": 60, "rows_dropped": 0}


@pytest.mark.parametrize("changed_row", [110, 150])
def test_a_csv_runs_scores_never_see_a_later_row(tmp_path, capsys, monkeypatch, changed_row):
    """Property: a scored round's error (in the file's units) never depends on a row after its target. The CSV series is
    z-scored on its first --warmup rows; the default burn-in min(500, rounds/5) scored rounds whose targets lay in the
    warm-up, so a later warm-up row moved their forecasts and their unit (row 110 of 200 with --warmup 120: rounds 39..108
    changed). The default burn-in for --csv is now at least warmup - 1.
    """
    results, run = [], experiment.run_experiment
    monkeypatch.setattr(experiment, "run_experiment", lambda series, **k: results.append(run(series, **k)) or results[-1])
    values = 20.0 + np.cumsum(np.random.default_rng(3).standard_normal(200))
    errors = []
    for bump in (0.0, 5.0):
        v = values.copy()
        v[changed_row] += bump
        path = tmp_path / "s.csv"
        path.write_text("t,value\n" + "".join(f"{i},{float(x)!r}\n" for i, x in enumerate(v)))
        assert _run(["run", "--csv", str(path), "--column", "value", "--warmup", "120", "--clients", "5",
                     "--policies", "memoa", "--quiet"], capsys)[0] == 0
        head = v[:120]
        errors.append(results[-1].round_errors["memoa"]["uniform"] * head.var())  # in the file's units squared
    burn_in = results[-1].config["burn_in"]
    scored_before = slice(burn_in, max(burn_in, changed_row - 1))  # rounds whose target precedes the changed row
    np.testing.assert_allclose(errors[1][scored_before], errors[0][scored_before], rtol=1e-12)
    assert burn_in == 119
    # a smaller --burn-in given on purpose is kept, and the note says what it scores
    code, _, err = _run(["run", "--csv", str(path), "--column", "value", "--warmup", "120", "--clients", "5",
                         "--policies", "memoa", "--burn-in", "50", "--quiet"], capsys)
    assert code == 0 and results[-1].config["burn_in"] == 50
    assert "memoa: note: --burn-in 50 scores rounds 50..118, whose targets are rows of the z-score's warm-up" in err


def test_missing_drop_says_how_many_rows_it_dropped(tmp_path, capsys, monkeypatch):
    """--missing drop closes the gaps as asked, and says so on stderr (how many rows, of how many): never silently."""
    got, run = [], experiment.run_experiment
    monkeypatch.setattr(experiment, "run_experiment", lambda series, **k: got.append(series) or run(series[:3], n_clients=1))
    rows = [f"{i},{(i * 37 % 101) / 10}" for i in range(300)]
    rows[150], rows[160] = "150,", "160,NA"
    path = tmp_path / "s.csv"
    path.write_text("t,value\n" + "\n".join(rows) + "\n\n")
    code, _, err = _run(["run", "--csv", str(path), "--column", "value", "--warmup", "100", "--missing", "drop", *FAST[:2],
                         "--quiet"], capsys)
    assert code == 0 and got[0].shape == (298,)
    assert "memoa: note: --missing drop dropped 2 of 300 rows read from" in err and err.count("\n") == 1, err
    path.write_text("t,value\n" + "\n".join(rows[:150]) + "\n\n")  # nothing to drop: nothing said
    assert _run(["run", "--csv", str(path), "--column", "value", "--warmup", "100", "--missing", "drop", "--quiet"],
                capsys)[2] == ""


@pytest.mark.parametrize("kind", ["csv", "csv with decimal commas", "synthetic"])
def test_the_json_record_reproduces_the_run(tmp_path, capsys, kind):
    """The JSON holds every input of the run, defaults included: its config and source rebuild the same scores
    (the CSV's --warmup and --missing were not recorded: a default left out of the command was lost).
    """
    from memoa_fast.timeseries.streams import load_csv_series

    argv = ["run", "--clients", "6", "--rounds", "150", "--quiet", "--policies", "memoa,memoa-trust", "--json"]
    comma = kind == "csv with decimal commas"
    if kind != "synthetic":
        sep, mark = (";", ",") if comma else (",", ".")
        rows = [f"{i}{sep}{(i * 37 % 101) / 10}".replace(".", mark) for i in range(700)]
        rows[300] = f"300{sep}NA"
        path = tmp_path / "s.csv"
        path.write_text(f"t{sep}value\n" + "\n".join(rows) + "\n")
        argv[3:5] = ["--csv", str(path), "--column", "value", "--missing", "drop"] + (["--decimal", ","] if comma else [])
    code, out, _ = _run(argv, capsys)
    record = json.loads(out)
    src, config = record["source"], dict(record["config"])
    if kind != "synthetic":
        assert src == {"csv": str(path), "column": "value", "warmup": 500, "missing": "drop", "decimal": mark, "rows": 699,
                       "rows_dropped": 1}
        series = load_csv_series(src["csv"], src["column"], warmup=src["warmup"], missing=src["missing"], decimal=src["decimal"])
        if comma:  # the same numbers as the file written with points
            dotted = tmp_path / "dotted.csv"
            dotted.write_text(path.read_text().replace(",", ".").replace(";", ","))
            np.testing.assert_array_equal(series, load_csv_series(dotted, "value", missing="drop"))
    else:
        assert src == {"stream": "logistic", "length": 151, "seed": 0}
        series = cli.make_stream(src["stream"], src["length"], seed=src["seed"])
    config.pop("dim")
    again = experiment.run_experiment(series, stream=record["stream"], **config).to_dict()
    assert again["policies"] == record["policies"] and again["config"] == record["config"]


def _one_line_error(err: str, needle: str) -> None:
    assert needle in err, err
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"


@pytest.mark.parametrize("argv,needle", [
    (["--clients", "0"], "argument --clients: must be in [1, 10000000], got '0'"),
    (["--clients", "many"], "argument --clients: expected an integer in [1, 10000000], got 'many'"),
    (["--clients", "1_000"], "argument --clients: expected an integer"),  # int() would accept it
    (["--clients", str(10**25)], "argument --clients: must be in [1, 10000000]"),
    (["--steps", "-5"], "argument --rounds/--steps: must be in [1, 10000000]"),
    (["--steps", str(10**12)], "argument --rounds/--steps: must be in [1, 10000000]"),
    (["--steps", str(10**8)], "argument --rounds/--steps"),  # the rounds, not the clients
    (["--stream", "sunspots"], "argument --stream: invalid choice: 'sunspots'"),
    (["--kappa", "-1"], "argument --kappa: must be in [0, 10000]"),
    (["--r", "0"], "argument --r: must be in [0.0001, 10000]"),
    (["--gamma", "1.5"], "argument --gamma: must be in (0, 1]"),
    (["--alpha", "nan"], "argument --alpha: must be finite"),
    (["--eta", "1e308"], "argument --eta: must be in [0, 1000], got '1e308'"),
    (["--noise", "1e-300", "1e300"], "argument --noise: must be in [1e-06, 1000], got '1e-300'"),
    (["--noise", "0.1", "1e300"], "argument --noise: must be in [1e-06, 1000], got '1e300'"),
    (["--lags", "1000"], "argument --lags: must be in [1, 64]"),
    (["--q", "0", "--kappa", "0"], "--q and --kappa: q + kappa must be > 0"),
    (["--q", "0"], "argument --q: memoa-trust needs q > 0"),  # in --q's range, but not memoa-trust's
    (["--q", "1e-10", "--kappa", "0", "--r", "1e4"], "memoa-trust: q=1e-10 with these weights cannot be run"),  # not mid-run
    (["--rule", "median"], "argument --rule: invalid choice"),
    (["--trust-rule", "best"], "argument --trust-rule: invalid choice: 'best' (choose from 'error', 'minimax')"),
    (["--noise", "0.5", "0.1"], "argument --noise: LOW must be <= HIGH"),
    (["--mu", "2"], "argument --mu: must be in (0, 2)"),
    (["--outlier-bound", "0"], "argument --outlier-bound: expected a number in (0, 1e+06] or 'none', got '0'"),
    (["--outlier-bound", "off"], "argument --outlier-bound: expected a number in (0, 1e+06] or 'none', got 'off'"),
    (["--threads", "100000"], "argument --threads: must be in [1, 1024]"),
    (["--threads", "1000"], "argument --threads: must be in [1, "),
    (["--backend", "cuda"], "argument --backend: invalid choice"),
    (["--policies", "memoa,best"], "argument --policies"),
    (["--stream", "csv"], "--stream csv needs --csv PATH"),
    (["--csv", "x.csv", "--stream", "logistic"], "--csv is only for --stream csv"),
    (["--column", "OT"], "--column is only for CSV streams"),
    (["--warmup", "24"], "--warmup is only for CSV streams"),  # was ignored without a word, as --missing was
    (["--policies", "memoa,local", "--classes", "4"], "--classes is only for the policy memoa-trust, which --policies "
                                                      "'memoa,local' leaves out"),  # and so were memoa-trust's options
    (["--policies", "memoa", "--reclass", "10"], "--reclass is only for the policy memoa-trust"),
    (["--policies", "memoa", "--trust-rule", "error"], "--trust-rule is only for the policy memoa-trust"),
    (["--policies", "greedy", "--trust-feedforward"], "--trust-feedforward is only for the policy memoa-trust"),
    (["--stream", "periodic", "--missing", "drop"], "--missing is only for CSV streams (give --csv PATH); --stream periodic"),
    (["--decimal", ","], "--decimal is only for CSV streams (give --csv PATH); --stream logistic"),
    (["--csv", "x.csv", "--column", "v", "--decimal", ";"], "argument --decimal: invalid choice: ';'"),
    (["--burn-in", "300"], "argument --burn-in: must be smaller than the number of rounds (300)"),
    # memoa-trust would never re-form its classes (it was MEMOA with equal classes, without a word)
    (["--reclass", "300"], "argument --reclass: memoa-trust re-forms its classes every R rounds, the first time after "
                           "round R; with --reclass 300 and 300 rounds it never would (it would run as MEMOA with equal "
                           "classes): give --reclass in [1, 299], or more rounds"),
    (["--reclass", "10000000"], "with --reclass 10000000 and 300 rounds it never would"),
    # one round: no reclass re-forms, and the range it named was the empty "[1, 0]"
    (["--rounds", "1", "--reclass", "1"], "it never would (it would run as MEMOA with equal classes): with 1 round no "
                                          "--reclass re-forms the classes: that needs 2 rounds or more"),
    (["--json", "/nonexistent/dir/r.json"], "argument --json: folder '/nonexistent/dir' does not exist"),
    (["--json", "/proc/x.json"], "argument --json: cannot create a file in folder '/proc'"),
    (["--plot", "out.xyz"], "argument --plot: the file name must end in one of .png"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", *FAST, *argv])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, needle)


NUMERIC = [opt for opt in RANGES if opt not in ("--noise",)]
TEXTS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.sampled_from(["1_000", "0x10", "1e400", "-0", "", " 3", "1.5e3", "\u0661", "inf", "NaN", "2**10"]),
)


@settings(max_examples=150, deadline=None)
@given(option=st.sampled_from(NUMERIC), text=TEXTS)
def test_every_numeric_option_is_in_range_or_a_one_line_error(option, text):
    """Property: any text for any numeric option parses to a value in its documented range, or exits 2 naming it."""
    low, high, low_open, high_open = RANGES[option]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(["run", option, text])
    except SystemExit as exc:
        assert exc.code == 2
        _one_line_error(err.getvalue(), f"argument {option}")
        return
    value = getattr(args, option.lstrip("-").replace("-", "_") if option != "--steps" else "rounds")
    assert np.isfinite(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    assert "_" not in text and "x" not in text.lower()


def test_outputs_are_checked_before_the_run(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: calls.append(1))
    js = tmp_path / "r.json"
    for argv, needle in [
        (["--json", str(js), "--plot", str(tmp_path / "fig.xyz")], "argument --plot: the file name must end in"),
        (["--json", str(js), "--plot", str(tmp_path / "no" / "fig.png")], "argument --plot: folder"),
        (["--plot", str(tmp_path / "same.png"), "--json", str(tmp_path / "same.png")], "arguments --json and --plot"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["run", *FAST, *argv])
        assert exc.value.code == 2
        _one_line_error(capsys.readouterr().err, needle)
    assert calls == [] and list(tmp_path.iterdir()) == []  # no run, nothing written


def test_a_failing_output_leaves_no_file(tmp_path, capsys, monkeypatch):
    """The plot fails after the run: neither the JSON nor a temporary file is left behind, exit 2, one line."""
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(experiment, "plot_result", broken)
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    with pytest.raises(SystemExit) as exc:
        main(["run", "--clients", "10", "--rounds", "50", "--quiet", "--policies", "memoa", "--json", str(js),
              "--plot", str(png)])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    _one_line_error(err, "argument --plot: cannot write the result")
    assert out == "" and list(tmp_path.iterdir()) == []
    # an existing result is left whole
    js.write_text("old")
    with pytest.raises(SystemExit):
        main(["run", "--clients", "10", "--rounds", "50", "--quiet", "--policies", "memoa", "--json", str(js),
              "--plot", str(png)])
    assert js.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(SystemExit) as exc:
        main(["run", *FAST, "--plot", str(tmp_path / "f.png")])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, 'pip install "memoa-fast[plot]"')
    assert list(tmp_path.iterdir()) == []


def test_memory_is_checked_up_front_naming_the_right_option(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_available_memory", lambda: 50 * 2**20)  # 50 MiB
    for argv, needle in [(["--clients", "1000000", "--rounds", "10"], "argument --clients: 1000000 clients need about"),
                         (["--clients", "10", "--rounds", "1000000"], "argument --rounds: 1000000 rounds need about")]:
        with pytest.raises(SystemExit) as exc:
            main(["run", "--quiet", *argv])
        assert exc.value.code == 2
        _one_line_error(capsys.readouterr().err, needle)


def test_memory_estimate_counts_the_minimax_populations(capsys, monkeypatch):
    """memoa-trust's minimax rule holds one population per exponent: the up-front check counts them."""
    n = 60_000
    base, _ = cli.memory_estimate(n, 100, 5, 2, 2)
    extra, _ = cli.memory_estimate(n, 100, 5, 2, 2, extra_populations=5)
    assert extra == base + n * 8 * 6 * 5
    monkeypatch.setattr(cli, "_available_memory", lambda: int((base + 0.1 * (extra - base)) / 0.8))
    with pytest.raises(SystemExit) as exc:  # fits with one population per policy, not with the minimax candidates
        main(["run", "--quiet", "--clients", str(n), "--rounds", "100"])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, "use fewer clients or --policies or --trust-rule error")


def test_json_is_strict_and_non_finite_is_null(capsys, monkeypatch):
    """A score that overflowed prints as n/a and is null in the JSON, never a bare NaN/Infinity token."""
    real = experiment.run_experiment

    def overflowing(*args, **kwargs):
        res = real(*args, **kwargs)
        res.scores["memoa"].mixture_rmse["eg"] = float("nan")
        res.scores["memoa"].max_cost = float("inf")
        return res

    monkeypatch.setattr(experiment, "run_experiment", overflowing)

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    code, out, _ = _run(["run", "--clients", "10", "--rounds", "50", "--quiet", "--json"], capsys)
    d = json.loads(out, parse_constant=refuse)
    assert code == 0 and d["policies"]["memoa"]["mixture_rmse"]["eg"] is None and d["policies"]["memoa"]["max_cost"] is None
    code, out, _ = _run(["run", "--clients", "10", "--rounds", "50", "--quiet"], capsys)
    assert code == 0 and "nan" not in out.lower().replace("n/a", "") and "inf" not in out
    assert "n/a: not a finite number" in out


def test_csv_errors_exit_2_naming_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("t,value\n" + "\n".join(f"{i},{i % 7}" for i in range(30)) + "\n30,oops\n")
    cases = [
        (["--csv", str(path), "--column", "value", "--warmup", "5"], f"{path}, line 32 (data row 31), column 'value': 'oops' is not a number"),
        (["--csv", str(path), "--column", "Value", "--warmup", "5"], "no column 'Value'"),
        (["--csv", str(path), "--warmup", "5"], "--csv needs --column NAME, the column to forecast; " + f"{path} has columns 't', 'value'"),
        (["--csv", str(tmp_path / "missing.csv"), "--column", "v"], "argument --csv: CSV file not found"),
        (["--csv", str(path), "--column", "value", "--rounds", "10"], "needs more rounds than the z-score warm-up"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            main(["run", "--quiet", *argv])
        assert exc.value.code == 2
        _one_line_error(capsys.readouterr().err, needle)


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "choose a command (run)" in err and "memoa run --help" in err


@pytest.mark.parametrize("argv", [["--clients", "10"], ["--csv=x.csv", "--column", "OT"], ["--quiet"]])
def test_an_option_of_run_before_the_command_is_named(argv, capsys):
    """`memoa --clients 10` said "argument COMMAND: invalid choice: '10'": now it names the option and the fix."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, f"memoa: error: {argv[0].split('=')[0]} is an option of the command run, which "
                                             f"comes first: memoa run {' '.join(argv)}")


def test_help_is_for_newcomers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for words in ("worst client", "--clients N", "--csv PATH", "examples:", "log-uniformly", "--json [PATH]",
                  "[1, 10000000]", "memoa-fast[plot]"):
        assert words in flat or words in out
    # the alias: argparse writes "--rounds T, --steps T" up to Python 3.12, "--rounds, --steps T" from 3.13 on
    assert "--rounds T, --steps T" in flat or "--rounds, --steps T" in flat


def test_module_entry_point_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-P", "-m", "memoa_fast.timeseries.cli", "run", *FAST, "--stream", "concept"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| memoa" in proc.stdout
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    proc = subprocess.run([sys.executable, "-P", "-m", "memoa_fast.timeseries.cli", "run", "--gamma", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "argument --gamma" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script():
    """The ``memoa`` script installed beside this interpreter (not whichever ``memoa`` is first on PATH) runs the job."""
    import sysconfig

    script = Path(sysconfig.get_path("scripts")) / "memoa"
    script = str(script) if script.exists() else shutil.which("memoa")
    assert script, f"no memoa console script in {sysconfig.get_path('scripts')} or on PATH: is the package installed?"
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.run([script, "run", "--clients", "30", "--rounds", "100"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "RMSE on stream logistic: 30 clients, 100 rounds" in proc.stdout


def test_real_data_through_the_command(datasets_dir, capsys):
    path = datasets_dir / "ett" / "ETTh1.csv"
    code, out, _ = _run(["run", "--csv", str(path), "--column", "OT", "--clients", "50", "--rounds", "800", "--quiet",
                         "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["stream"] == "ETTh1.csv:OT" and d["n_rounds"] == 800


def test_closed_stdout_is_not_a_traceback():
    """`memoa run | head -0`: the reader is gone before the table is printed; no traceback."""
    pytest.importorskip("memoa_fast.kernels._cython")
    with subprocess.Popen([sys.executable, "-P", "-m", "memoa_fast.timeseries.cli", "run", "--clients", "10", "--rounds", "40",
                           "--backend", "cython", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stdout.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 1 and "Traceback" not in err and "Error" not in err, err


@pytest.mark.parametrize("option", ["--json", "--plot"])
@pytest.mark.parametrize("how", ["same", "hardlink", "symlink", "relative"])
def test_an_output_never_overwrites_the_input_csv(tmp_path, capsys, monkeypatch, option, how):
    """--json/--plot naming the --csv file (by any path: the same, a link, a relative path) is refused before the run."""
    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: calls.append(1))
    data = tmp_path / "data.png" if option == "--plot" else tmp_path / "data.json"  # a valid output suffix
    text = "t,value\n" + "".join(f"{i},{(i * 37 % 101) / 10}\n" for i in range(400))
    data.write_text(text)
    out = data
    if how == "hardlink":
        out = tmp_path / ("link" + data.suffix)
        os.link(data, out)
    elif how == "symlink":
        out = tmp_path / ("sym" + data.suffix)
        out.symlink_to(data)
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        out = Path(data.name)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--csv", str(data), "--column", "value", "--warmup", "100", *FAST, option, str(out)])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, f"argument {option}: ")
    assert calls == [] and data.read_text() == text


@pytest.mark.parametrize("option,name", [("--json", "r.json"), ("--plot", "r.png")])
def test_an_output_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path, capsys, monkeypatch, option, name):
    """A symlinked output path is followed (as checkpoints do): the file it points to, in another folder (maybe
    another file system), is replaced by a rename inside that folder; the link stays; an existing file keeps its mode.
    """
    if option == "--plot":
        pytest.importorskip("matplotlib")
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir(), there.mkdir()
    target, link = there / name, here / name
    target.write_text("old")
    target.chmod(0o640)
    link.symlink_to(target)
    replace = os.replace

    def same_folder_only(src, dst):  # a rename across folders may cross file systems (EXDEV): after the whole run
        assert Path(src).parent == Path(dst).parent, (src, dst)
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", same_folder_only)
    code, _, err = _run(["run", "--clients", "5", "--rounds", "30", "--quiet", "--policies", "memoa", option, str(link)],
                        capsys)
    assert code == 0 and err == ""
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() != b"old" and (target.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["here", "there", name, name])  # no temporary left


@pytest.mark.parametrize("option,name", [("--json", "r.json"), ("--plot", "r.png")])
@pytest.mark.parametrize("how", ["fifo", "fifo-through-a-symlink"])
def test_an_output_that_is_not_a_regular_file_is_refused_before_the_run(tmp_path, capsys, monkeypatch, option, name, how):
    """A named pipe (or a device: ``--json /dev/null`` run as root) was replaced by a regular file, since the result is
    written to a new file renamed into place (/dev/null itself would be gone). Refused before the run, named.
    """
    calls = []
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: calls.append(1))
    fifo = tmp_path / name
    os.mkfifo(fifo)
    target = fifo
    if how == "fifo-through-a-symlink":
        target = tmp_path / f"link-{name}"
        target.symlink_to(fifo)
    with pytest.raises(SystemExit) as exc:
        main(["run", *FAST, option, str(target)])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, f"argument {option}: {str(target)!r} is a named pipe, not a regular file")
    assert calls == [] and fifo.is_fifo()


@pytest.mark.parametrize("clients", [1, 2, 7])
def test_fewer_clients_than_the_default_classes_runs(clients, capsys):
    """--classes defaults to min(8, --clients): a small run needs no --classes; an explicit K > N is still refused."""
    code, out, _ = _run(["run", "--clients", str(clients), "--rounds", "40", "--quiet", "--policies", "memoa,memoa-trust"],
                        capsys)
    assert code == 0 and f"memoa-trust K={clients} " in out
    with pytest.raises(SystemExit) as exc:
        main(["run", "--clients", str(clients), "--rounds", "40", "--quiet", "--classes", str(clients + 1)])
    assert exc.value.code == 2
    _one_line_error(capsys.readouterr().err, f"argument --classes: must be at most --clients={clients}")


@pytest.mark.parametrize("content,needle", [
    (b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4, "the file is gzip-compressed, not UTF-8 CSV text"),
    (b"date;value\r" + b"2020-1;3\r" * 50, r"the line ends are \r alone"),
    (b"date;value\n" + b"2020-1;3\n" * 5, "s.csv has columns 'date', 'value'"),
    (b'\xef\xbb\xbf"date"\t"OT"\n1\t2\n', "s.csv has columns 'date', 'OT'"),
], ids=["gzip", "cr", "semicolon", "bom-tab-quoted"])
def test_csv_without_column_lists_the_columns_or_says_what_the_file_is(tmp_path, capsys, content, needle):
    """--csv without --column: the columns as the reader parses them, or why there are none; one printable line."""
    path = tmp_path / "s.csv"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exc:
        main(["run", "--csv", str(path), "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    _one_line_error(err, needle)
    assert err[:-1].isprintable(), repr(err)


def test_reclass_at_the_rounds_or_beyond_is_named(capsys):
    """--reclass >= the rounds is refused above (the user asked for re-formings that cannot happen); the default 50 on a
    shorter run is not an error, but the table says memoa-trust never re-formed. --reclass 29 on 30 rounds re-forms once.
    """
    base = ["run", "--clients", "5", "--rounds", "30", "--quiet", "--policies", "memoa,memoa-trust"]
    code, out, err = _run(base, capsys)
    assert code == 0 and err == ""
    assert "note: memoa-trust re-forms its classes every reclass rounds, the first time after round 50, so with " \
           "reclass=50 and 30 rounds it never does" in out
    code, out, err = _run([*base, "--reclass", "29"], capsys)
    assert code == 0 and err == "" and "never does" not in out


def test_a_killed_runs_temporary_output_is_removed_by_the_next_run(tmp_path, capsys, monkeypatch):
    """A run killed while writing --json/--plot (SIGKILL) leaves .NAME.XXXXXXXX.tmp beside the output; no later run removed
    it (a plot's can be large). The next run that writes that file removes those older than its start, as a checkpoint
    does (another file's, or a temporary made after the run started, is left alone). SIGTERM while writing discards the
    run's own temporary files, as Ctrl-C does, and exits 143.
    """
    import signal

    out = tmp_path / "r.json"
    stale, other, young = (tmp_path / n for n in (".r.json.k1ll3d00.tmp", ".s.json.k1ll3d00.tmp", ".r.json.young000.tmp"))
    for f in (stale, other, young):
        f.write_text("partial")
    os.utime(stale, (1e9, 1e9))
    os.utime(other, (1e9, 1e9))
    os.utime(young, (4e9, 4e9))  # modified after the run started: not a killed run's
    base = ["run", "--clients", "4", "--rounds", "20", "--quiet", "--policies", "memoa"]
    code, _, _ = _run([*base, "--json", str(out)], capsys)
    assert code == 0 and json.loads(out.read_text())["n_rounds"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, other.name, young.name])

    previous = signal.signal(signal.SIGTERM, lambda *a: pytest.fail("SIGTERM was not handled by memoa run"))
    try:
        # memoa run handles SIGTERM where its action is the default; this guard stands in for that (pytest must live)
        monkeypatch.setattr(signal, "getsignal", lambda signum: signal.SIG_DFL)
        # the temporary file is written, not yet renamed into place: the window in which a kill leaves it behind
        monkeypatch.setattr(cli._PendingFile, "commit", lambda self, started: os.kill(os.getpid(), signal.SIGTERM))
        code, _, err = _run([*base, "--json", str(tmp_path / "t.json")], capsys)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 143 and "memoa: terminated" in err
    assert not list(tmp_path.glob(".t.json.*")) and not (tmp_path / "t.json").exists()


def test_a_live_runs_temporary_output_is_never_removed(tmp_path, capsys):
    """The stale-temporary cleanup removed every .NAME.XXXXXXXX.tmp older than this run's start, so a run still writing
    the same file (its --json temporary written, its --plot being drawn) lost it: its rename then failed (exit 2, both
    outputs gone). A writer holds a lock on its temporary file while writing; only unlocked ones (a killed run's) go.
    """
    import time

    out = tmp_path / "r.json"
    live = cli._PendingFile(out)  # another run's output, written, not yet renamed into place
    live.tmp.write_text('{"other": 1}\n')
    os.utime(live.tmp, (time.time() - 60, time.time() - 60))  # written a minute ago: its plot takes long
    killed = tmp_path / ".r.json.k1ll3d00.tmp"
    killed.write_text("partial")
    os.utime(killed, (1e9, 1e9))
    code, _, _ = _run(["run", "--clients", "4", "--rounds", "20", "--quiet", "--policies", "memoa", "--json", str(out)], capsys)
    assert code == 0 and json.loads(out.read_text())["n_rounds"] == 20
    assert live.tmp.exists() and not killed.exists()
    live.commit(time.time())  # the other run finishes: its result replaces this one's, as without the cleanup
    assert json.loads(out.read_text()) == {"other": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


@pytest.mark.parametrize("handler", ["ignore", "program"])
def test_sigterm_while_writing_keeps_an_ignored_or_the_programs_handling(tmp_path, capsys, monkeypatch, handler):
    """`memoa run` replaced any SIGTERM disposition while writing: an ignored SIGTERM (trap '' TERM) aborted the run (exit
    143, no output), and the handler of a program calling main() was never called (its SIGTERM lost). Only the default
    action (die, leaving the temporary file) is replaced; a handler that raises still has the temporaries discarded.
    """
    import signal

    calls = []

    def program(signum, frame):
        calls.append(signum)
        raise SystemExit(7)

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN if handler == "ignore" else program)
    try:
        commit = cli._PendingFile.commit

        def kill_then_commit(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)
            commit(self, *args)

        monkeypatch.setattr(cli._PendingFile, "commit", kill_then_commit)
        argv = ["run", "--clients", "4", "--rounds", "20", "--quiet", "--policies", "memoa", "--json", str(tmp_path / "t.json")]
        if handler == "ignore":
            code, _, _ = _run(argv, capsys)
            assert code == 0 and json.loads((tmp_path / "t.json").read_text())["n_rounds"] == 20
        else:
            with pytest.raises(SystemExit, match="7"):
                main(argv)
            assert calls == [signal.SIGTERM] and list(tmp_path.iterdir()) == []
        assert signal.getsignal(signal.SIGTERM) == (signal.SIG_IGN if handler == "ignore" else program)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_output_is_written_where_the_file_system_has_no_locks(tmp_path, capsys, monkeypatch):
    """Guard for the lock above: where flock fails (some network or FUSE file systems) the result is still written and a
    killed run's temporary file is removed by its age, as before the lock.
    """
    import errno

    import memoa_fast.checkpoint as checkpoint

    if checkpoint.fcntl is None:
        pytest.skip("no fcntl")

    def no_locks(fd, op):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    killed = tmp_path / ".r.json.k1ll3d00.tmp"
    killed.write_text("partial")
    os.utime(killed, (1e9, 1e9))
    code, _, _ = _run(["run", "--clients", "4", "--rounds", "20", "--quiet", "--policies", "memoa", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0 and [p.name for p in tmp_path.iterdir()] == ["r.json"]
