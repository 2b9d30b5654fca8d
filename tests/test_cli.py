"""The ``memoa`` command: default run, JSON, plot, and clear errors (exit 2, no traceback) on bad options."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from memoa_fast.cli import main

FAST = ["--clients", "60", "--steps", "300", "--quiet"]


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


@pytest.mark.parametrize("argv,needle", [
    (["--clients", "0"], "argument --clients: must be >= 1, got '0'"),
    (["--clients", "many"], "argument --clients: expected an integer, got 'many'"),
    (["--steps", "-5"], "argument --steps"),
    (["--stream", "sunspots"], "argument --stream: invalid choice: 'sunspots'"),
    (["--kappa", "-1"], "argument --kappa: must be >= 0"),
    (["--r", "0"], "argument --r: must be > 0"),
    (["--gamma", "1.5"], "argument --gamma: must be in (0, 1]"),
    (["--alpha", "nan"], "argument --alpha: must be finite"),
    (["--q", "0", "--kappa", "0"], "--q and --kappa: q + kappa must be > 0"),
    (["--rule", "median"], "argument --rule: invalid choice"),
    (["--noise", "0.5", "0.1"], "argument --noise: LOW must be <= HIGH"),
    (["--mu", "2"], "argument --mu: must be in (0, 2)"),
    (["--threads", "100000"], "argument --threads: must be in [1,"),
    (["--backend", "cuda"], "argument --backend: invalid choice"),
    (["--policies", "memoa,best"], "argument --policies"),
    (["--stream", "csv"], "--stream csv needs --csv PATH"),
    (["--csv", "x.csv", "--stream", "logistic"], "--csv is only for --stream csv"),
    (["--column", "OT"], "--column is only for CSV streams"),
    (["--burn-in", "300"], "argument --burn-in: must be smaller than the number of rounds (300)"),
    (["--json", "/nonexistent/dir/r.json"], "argument --json: folder /nonexistent/dir does not exist"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_exit_2_with_a_message(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", *FAST, *argv])
    assert exc.value.code == 2
    _, err = capsys.readouterr()
    assert needle in err, err
    assert "Traceback" not in err


def test_csv_errors_exit_2_naming_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("t,value\n" + "\n".join(f"{i},{i % 7}" for i in range(30)) + "\n30,oops\n")
    cases = [
        (["--csv", str(path), "--column", "value", "--warmup", "5"], f"{path}, line 32 (data row 31), column 'value': 'oops' is not a number"),
        (["--csv", str(path), "--column", "Value", "--warmup", "5"], "no column 'Value'"),
        (["--csv", str(path), "--warmup", "5"], "--csv needs --column NAME, the column to forecast; " + f"{path} has columns t,value"),
        (["--csv", str(tmp_path / "missing.csv"), "--column", "v"], "argument --csv: CSV file not found"),
        (["--csv", str(path), "--column", "value", "--steps", "10"], "needs more rounds than the z-score warm-up"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            main(["run", "--quiet", *argv])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err, err
        assert "Traceback" not in err


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "choose a command (run)" in err and "memoa run --help" in err


def test_help_is_for_newcomers(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for words in ("worst client", "--clients N", "--csv PATH", "examples:", "log-uniformly", "--json [PATH]"):
        assert words in out


def test_module_entry_point_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-P", "-m", "memoa_fast.cli", "run", *FAST, "--stream", "concept"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| memoa" in proc.stdout
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    proc = subprocess.run([sys.executable, "-P", "-m", "memoa_fast.cli", "run", "--gamma", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "argument --gamma" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(shutil.which("memoa") is None, reason="the memoa console script is not on PATH (package not installed)")
def test_console_script():
    env = dict(os.environ, PYTHONSAFEPATH="1")
    proc = subprocess.run(["memoa", "run", "--clients", "30", "--steps", "100"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "RMSE on stream logistic: 30 clients, 100 rounds" in proc.stdout


def test_real_data_through_the_command(datasets_dir, capsys):
    path = datasets_dir / "ett" / "ETTh1.csv"
    code, out, _ = _run(["run", "--csv", str(path), "--column", "OT", "--clients", "50", "--steps", "800", "--quiet",
                         "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["stream"] == "ETTh1.csv:OT" and d["n_rounds"] == 800
