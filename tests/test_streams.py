"""Streams: seeded synthetic series and the CSV loader (z-score on a warm-up prefix, clear errors)."""
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from memoa_fast.timeseries.streams import (
    SYNTHETIC_STREAMS,
    CsvSeriesError,
    concept,
    concept_drift,
    csv_columns,
    load_csv_series,
    logistic_map,
    make_stream,
    periodic,
    zscore,
)


# --------------------------------------------------------------------------- synthetic
@pytest.mark.parametrize("name", SYNTHETIC_STREAMS)
def test_synthetic_stream_is_seeded_and_zscored(name):
    a = make_stream(name, 3000, seed=7)
    b = make_stream(name, 3000, seed=7)
    c = make_stream(name, 3000, seed=8)
    assert a.shape == (3000,) and a.dtype == np.float64
    assert np.array_equal(a, b), "same seed must give the same series, bitwise"
    assert not np.allclose(a, c), "another seed must give another series"
    assert np.isfinite(a).all()
    assert abs(a.mean()) < 1e-12 and abs(a.std() - 1.0) < 1e-12


@pytest.mark.parametrize("kwargs", [dict(amplitudes=(0.0,), periods=(5.0,), noise=0.0),
                                    dict(amplitudes=(1.0,), periods=(1e300,), noise=0.0)])
def test_a_constant_synthetic_stream_is_refused_naming_its_parameters(kwargs):
    """The README: every synthetic stream is finite and z-scored, or raises naming its parameters (a constant one
    said only "cannot z-score a constant series").
    """
    with pytest.raises(ValueError, match=r"the generated series is constant .* with amplitudes=\(.*noise=0.0"):
        make_stream("periodic", 50, **kwargs)
    assert np.ptp(make_stream("periodic", 50, normalize=False, **kwargs)) == 0.0  # unnormalised: returned as is


def test_logistic_follows_the_map():
    x = logistic_map(500, seed=3, normalize=False)
    assert np.all((x > 0) & (x < 1))
    np.testing.assert_allclose(x[1:], 3.8 * x[:-1] * (1 - x[:-1]), rtol=0, atol=1e-15)
    # chaotic: neighbouring values decorrelate, no fixed point or short cycle
    assert np.unique(np.round(x, 6)).size > 400


def test_periodic_has_its_periods():
    y = periodic(4096, seed=0, periods=(16.0, 64.0), amplitudes=(1.0, 0.5), noise=0.0, normalize=False)
    power = np.abs(np.fft.rfft(y)) ** 2
    top = set(np.argsort(power)[-2:])
    assert top == {4096 // 16, 4096 // 64}


def test_concept_drifts_gradually():
    y = concept(6000, seed=1, drift_period=3000.0, normalize=False)
    # the dominant frequency of the first and the middle window differ: the generating process drifts
    def peak(seg):
        return int(np.argmax(np.abs(np.fft.rfft(seg - seg.mean()))[1:]))

    peaks = [peak(y[s : s + 750]) for s in range(0, 6000, 750)]
    assert max(peaks) >= 2 * max(1, min(peaks))


def test_concept_drift_has_abrupt_level_changes():
    y = concept_drift(3000, seed=2, segment=(500, 500), noise=0.05, level=3.0, normalize=False)
    means = [y[s + 100 : s + 500].mean() for s in range(0, 3000, 500)]
    assert np.ptp(means) > 1.0, means
    assert not np.array_equal(y, concept_drift(3000, seed=3, segment=(500, 500), noise=0.05, level=3.0, normalize=False))


def test_unknown_stream_and_bad_length():
    with pytest.raises(ValueError, match="stream must be one of"):
        make_stream("sunspots", 100)
    with pytest.raises(ValueError, match="n_steps"):
        make_stream("logistic", 1)


@pytest.mark.parametrize("name,params", [
    ("periodic", dict(amplitudes=(1e308, 1.0, 1.0))),  # the sum overflows: was a NaN series
    ("periodic", dict(noise=1e308)),  # was "constant series"
    ("concept", dict(radius=0.99999999, noise=1e300)),  # finite but the std overflowed: was all zeros
    ("concept-drift", dict(level=1e300, noise=1e300)),  # was an OverflowError from NumPy
    ("concept-drift", dict(noise=1e307, radius=(0.999, 0.999))),
])
def test_synthetic_stream_is_finite_and_zscored_or_a_named_error(name, params):
    """Property: a stream is finite with mean 0 and std 1, or ValueError naming the parameters; never NaN or zeros."""
    try:
        y = make_stream(name, 2000, seed=1, **params)
    except ValueError as exc:
        assert "overflows float64" in str(exc) and all(k in str(exc) for k in params), str(exc)
        return
    assert np.isfinite(y).all() and abs(y.mean()) < 1e-9 and abs(y.std() - 1.0) < 1e-9


def test_zscore_on_no_values_names_the_fit():
    with pytest.raises(ValueError, match=r"fit=slice\(3, 3, None\) selects none of the series' 5 values"):
        zscore(np.arange(5.0), slice(3, 3))
    with pytest.raises(ValueError, match="fit=None selects none of the series' 0 values"):
        zscore(np.empty(0))


def test_zscore_of_huge_finite_values_is_exact_not_zero():
    from memoa_fast.timeseries.streams import zscore

    v = np.array([1.0, 2.0, 3.0, 4.0]) * 1e300
    np.testing.assert_allclose(zscore(v), (np.arange(4.0) - 1.5) / np.std(np.arange(4.0)), rtol=1e-14)
    with pytest.raises(ValueError, match="finite"):
        zscore(np.array([1.0, np.nan, 2.0]))


@settings(max_examples=60, deadline=None)
@given(k=st.lists(st.integers(-(2**20), 2**20), min_size=2, max_size=40), n_fit=st.integers(2, 40),
       level=st.sampled_from([1e9, 2.0**52 - 2.0**21, 1.7e12, -(2.0**60), -1e6]), fractions=st.booleans())
def test_zscore_ignores_a_level_the_values_hold_exactly(k, n_fit, level, fractions):
    """Property: for v integers (or k/64) and a level a with a + v exact in float64, zscore(a + v) is zscore(v), bit for
    bit. The mean was taken on the values, so its rounding (eps |a|) shifted every z-score: an integer column read as
    1.7e12 + v was 7.5e-7 off v's, at 1e9 7.3e-10. It is now taken on the differences from the reference's first value.
    """
    # the spacing of the values at the level: k/64 where a + k/64 is exact (|a| < 2**46), multiples of 256 near 2**60
    step = 256.0 if abs(level) > 2**53 else 1.0 / 64.0 if fractions and abs(level) < 2**46 else 1.0
    v = np.array(k, dtype=np.float64) * step
    fit = slice(0, n_fit)
    assert ((level + v) - level == v).all()  # the level is held exactly
    assume(np.std(level + v[fit]) > 2.0**-40 * abs(level))  # not a reference constant up to rounding at the level
    z0, za = zscore(v, fit), zscore(level + v, fit)
    np.testing.assert_array_equal(za, z0)
    assert za.tobytes() == z0.tobytes()


@pytest.mark.parametrize("level", [10**9, 1_700_000_000_000])
def test_a_csv_column_read_with_a_level_gives_the_series_without_it(tmp_path, level):
    """An integer column (millisecond timestamps, a counter) gives the same z-scored series as the column minus its
    level, bit for bit; the reported mean is the level plus the warm-up's mean.
    """
    v = np.round(np.cumsum(np.random.default_rng(3).standard_normal(60)) * 30).astype(np.int64)
    y0 = load_csv_series(_write(tmp_path, _csv([str(x) for x in v]), "v.csv"), "value", warmup=30)
    ya, mean, _ = load_csv_series(_write(tmp_path, _csv([str(x + level) for x in v]), "a.csv"), "value", warmup=30,
                                  return_scaling=True)
    assert ya.tobytes() == y0.tobytes()
    assert mean == pytest.approx(level + v[:30].mean(), rel=1e-15)


@pytest.mark.parametrize("name,params,exc,match", [
    ("periodic", dict(amplitudes=(float("nan"), 1.0, 1.0)), ValueError, "amplitudes must be finite"),
    ("periodic", dict(periods=17.0, amplitudes=1.0), TypeError, "periods must be a sequence of numbers, got 17.0"),
    ("periodic", dict(periods=(10.0, 20.0), amplitudes=(1.0,)), ValueError, "periods and amplitudes must be non-empty"),
    ("periodic", dict(normalize="no"), TypeError, "normalize must be True or False, got 'no'"),
    ("logistic", dict(normalize=0), TypeError, "normalize must be True or False, got 0"),
    ("concept", dict(angles=(0.1,)), ValueError, r"angles must be a pair \(low, high\), got \(0.1,\)"),
    ("concept-drift", dict(segment=(1,)), ValueError, r"segment must be a pair \(low, high\), got \(1,\)"),
    ("concept-drift", dict(segment=(900, 300)), ValueError, "segment must have low <= high, got"),
    # a segment length is drawn as an int64: beyond 2**63 - 1, NumPy's unnamed "high is out of bounds for int64"
    ("concept-drift", dict(segment=(1, 2**63)), ValueError, r"segment must be an integer in \[1, 2\*\*63 - 1\], got 9223"),
    ("concept-drift", dict(radius=(1.5, 2.0)), ValueError, r"radius must be in \[0, 1\)"),  # explosive: was zeros
    ("concept-drift", dict(radius=(float("nan"), 0.5)), ValueError, "radius must be finite"),
    ("concept-drift", dict(angles=(float("nan"), 0.5)), ValueError, "angles must be finite"),
    ("concept-drift", dict(angles=(1.0, 0.5)), ValueError, "angles must have low <= high"),
])
def test_synthetic_parameters_are_checked_with_their_names(name, params, exc, match):
    with pytest.raises(exc, match=match):
        make_stream(name, 100, seed=0, **params)


def test_stream_name_must_be_a_string():
    with pytest.raises(TypeError, match=r"stream must be one of .*; got \['logistic'\]"):
        make_stream(["logistic"], 100)


# --------------------------------------------------------------------------- CSV
def _write(tmp_path, text, name="series.csv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _csv(values, header="date,value,other", fmt=lambda i, v: f"2020-01-{i:04d},{v},1"):
    return header + "\n" + "".join(fmt(i, v) + "\n" for i, v in enumerate(values))


def test_csv_zscore_uses_the_warmup_prefix_only(tmp_path):
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(5.0, 2.0, 50), rng.normal(100.0, 30.0, 50)])
    path = _write(tmp_path, _csv([repr(float(x)) for x in v]))
    y, mean, std = load_csv_series(path, "value", warmup=50, return_scaling=True)
    assert y.shape == (100,)
    assert mean == pytest.approx(v[:50].mean(), rel=1e-14) and std == pytest.approx(v[:50].std(), rel=1e-14)
    np.testing.assert_allclose(y, (v - v[:50].mean()) / v[:50].std(), rtol=1e-13)
    # changing the future does not change how the past is scaled (no look-ahead)
    v2 = v.copy()
    v2[50:] *= 10
    y2 = load_csv_series(_write(tmp_path, _csv([repr(float(x)) for x in v2]), "b.csv"), "value", warmup=50)
    np.testing.assert_array_equal(y2[:50], y[:50])


def test_csv_quirks_are_accepted(tmp_path):
    # BOM, quoted header and cells, CRLF, no final newline, surrounding spaces
    text = '\ufeff"Month","Passengers"\r\n' + "\r\n".join(f'"1949-{i:02d}", {100 + i * (-1) ** i} ' for i in range(1, 13))
    y = load_csv_series(_write(tmp_path, text), "Passengers", warmup=5)
    assert y.shape == (12,)
    assert np.isfinite(y).all()
    assert load_csv_series(_write(tmp_path, text, "c.csv"), "Passengers", warmup=5, max_rows=8).shape == (8,)


def test_csv_missing_column_names_file_and_columns(tmp_path):
    path = _write(tmp_path, _csv(range(20)))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "Value", warmup=5)
    msg = str(err.value)
    assert str(path) in msg and "'Value'" in msg and "'date', 'value', 'other'" in msg and "did you mean 'value'" in msg


def test_csv_non_numeric_cell_names_line_and_column(tmp_path):
    vals = [str(i) for i in range(20)]
    vals[7] = "n/b"
    path = _write(tmp_path, _csv(vals))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    msg = str(err.value)
    assert f"{path}, line 9 (data row 8), column 'value'" in msg and "'n/b' is not a number" in msg


@pytest.mark.parametrize("cell", ["", "  ", "nan", "inf"])
def test_csv_gap_names_line_and_column(tmp_path, cell):
    vals = [str(i) for i in range(20)]
    vals[3] = cell
    path = _write(tmp_path, _csv(vals))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    msg = str(err.value)
    assert f"{path}, line 5 (data row 4), column 'value'" in msg
    assert ("empty cell" in msg) if not cell.strip() else ("not a finite number" in msg) if cell == "inf" else (
        "'nan' marks a missing value" in msg)


def test_csv_short_row_and_blank_line_are_gaps(tmp_path):
    lines = _csv(range(20)).splitlines()
    lines[6] = "2020-01-0005"  # a row cut short
    with pytest.raises(CsvSeriesError, match=r"line 7 \(data row 6\), column 'value': missing cell"):
        load_csv_series(_write(tmp_path, "\n".join(lines) + "\n"), "value", warmup=5)
    lines = _csv(range(20)).splitlines()
    lines[6] = ""
    with pytest.raises(CsvSeriesError, match=r"line 7, column 'value': empty line inside the data"):
        load_csv_series(_write(tmp_path, "\n".join(lines) + "\n", "d.csv"), "value", warmup=5)
    # blank lines at the very end are not gaps
    assert load_csv_series(_write(tmp_path, _csv(range(20)) + "\n\n", "e.csv"), "value", warmup=5).shape == (20,)


def test_csv_too_few_rows_and_constant_warmup(tmp_path):
    path = _write(tmp_path, _csv(range(6)))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    msg = str(err.value)
    assert str(path) in msg and "'value'" in msg and "6 data rows, too few: need at least 7" in msg
    with pytest.raises(CsvSeriesError, match="constant over the first 5 rows"):
        load_csv_series(_write(tmp_path, _csv([1.0] * 5 + [2.0] * 5), "f.csv"), "value", warmup=5)


def test_csv_missing_or_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_csv_series(tmp_path / "nope.csv", "value")
    with pytest.raises(CsvSeriesError, match="the file is empty"):
        load_csv_series(_write(tmp_path, "", "empty.csv"), "value")
    assert issubclass(CsvSeriesError, ValueError)


# --------------------------------------------------------------------------- real data (../shared/datasets)
def test_etth1_ot_loads_as_is(datasets_dir):
    path = datasets_dir / "ett" / "ETTh1.csv"
    y, mean, std = load_csv_series(path, "OT", warmup=500, return_scaling=True)
    assert y.shape == (17420,)
    assert np.isfinite(y).all()
    # first row's OT is 30.5310001373291 (README of the datasets)
    assert y[0] * std + mean == pytest.approx(30.5310001373291, rel=1e-12)
    assert abs(y[:500].mean()) < 1e-12 and abs(y[:500].std() - 1) < 1e-12
    assert -4.08 <= (y * std + mean).min() < -4.07 and 46.0 < (y * std + mean).max() <= 46.01


def test_exchange_rate_cad_loads_as_is(datasets_dir):
    path = datasets_dir / "exchange_rate" / "exchange_rate.csv"
    y, mean, std = load_csv_series(path, "CAD", warmup=500, return_scaling=True)
    assert y.shape == (7588,)
    assert y[0] * std + mean == pytest.approx(0.861698, rel=1e-12)
    raw = y * std + mean
    assert math.isclose(raw.min(), 0.618582, rel_tol=1e-9) and math.isclose(raw.max(), 1.091524, rel_tol=1e-9)


# --------------------------------------------------------------------------- CSV: hard inputs (issue 8, items 4 and 13)
import csv as _csv_module  # noqa: E402
import tracemalloc  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import memoa_fast.timeseries.streams as streams  # noqa: E402
from memoa_fast.timeseries.forecasters import TARGET_LIMIT  # noqa: E402


def _reference_column(path, column):
    """The obviously correct reader: the csv module and float(), whole file in memory."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in _csv_module.reader(fh) if r and any(c.strip() for c in r)]
    col = [h.strip() for h in rows[0]].index(column)
    return np.array([float(r[col]) for r in rows[1:]])


@pytest.mark.parametrize("cell", ["1_001", "0x10", "1e5e5", "\u0661\u0662", "12abc", "--1", "1,5"])
def test_csv_cell_must_be_a_plain_decimal(tmp_path, cell):
    vals = [str(i % 7) for i in range(20)]
    vals[9] = f'"{cell}"' if "," in cell else cell
    path = _write(tmp_path, _csv(vals))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    assert f"{path}, line 11 (data row 10), column 'value'" in str(err.value) and "is not a number" in str(err.value)


def test_csv_non_utf8_byte_is_reported_at_its_line(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", 256)  # the bad byte sits many blocks in
    lines = [f"2020-{i},{i % 9}" for i in range(600)]
    lines[398] = "caf\xe9,3"
    path = tmp_path / "latin1.csv"
    path.write_bytes(("date,value\n" + "\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(CsvSeriesError, match=r"latin1.csv, line 400: not UTF-8 text \(byte 0xe9 at character 4"):
        load_csv_series(path, "value", warmup=5)
    # an earlier problem is reported first
    lines[100] = "x,oops"
    path.write_bytes(("date,value\n" + "\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(CsvSeriesError, match="line 102 .* 'oops' is not a number"):
        load_csv_series(path, "value", warmup=5)
    # and a byte beyond max_rows is never read
    assert load_csv_series(path, "value", warmup=5, max_rows=50).shape == (50,)


def test_csv_unterminated_quote_is_short_and_names_the_line(tmp_path):
    lines = [f"2020-{i},{i % 9}" for i in range(2000)]
    lines[700] = '"2020-700,5'
    path = _write(tmp_path, "date,value\n" + "\n".join(lines) + "\n")
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    msg = str(err.value)
    assert f"{path}, line 702: a quoted field is not closed on this line" in msg
    assert len(msg) < 300 and "2020-701" not in msg  # no echo of the file


@pytest.mark.parametrize("where,ok", [(800, False), (10, True)])
def test_csv_huge_cells(tmp_path, where, ok):
    """1e200 after the warm-up would z-score beyond 1e30: refused, naming it; inside the warm-up the scaling copes."""
    vals = [str((i * 37 % 101) / 10) for i in range(1000)]
    vals[where] = "1e200"
    path = _write(tmp_path, _csv(vals))
    if ok:
        y, mean, std = load_csv_series(path, "value", warmup=100, return_scaling=True)
        assert np.isfinite(y).all() and np.isfinite([mean, std]).all() and np.ptp(y) > 1
        assert abs(y[:100].mean()) < 1e-12 and abs(y[:100].std() - 1) < 1e-12
    else:
        with pytest.raises(CsvSeriesError, match=rf"{path}, line 802 \(data row 801\), column 'value': 1e\+200 is 3.4\de\+199"):
            load_csv_series(path, "value", warmup=100)
    vals[where] = "1e400"
    with pytest.raises(CsvSeriesError, match=rf"line {where + 2} .* '1e400' is too large for a float64"):
        load_csv_series(_write(tmp_path, _csv(vals), "inf.csv"), "value", warmup=100)


FINITE = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False),
    st.sampled_from([1e-300, -1e-300, 5e-324, 1e308, -1.7976931348623157e308, 0.0]),
)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(FINITE, min_size=6, max_size=40), warmup=st.integers(2, 4))
def test_csv_any_finite_values_give_a_clean_series_or_a_named_error(tmp_path_factory, values, warmup):
    """Property: any finite float64 cells load to a finite series within 1e30, z-scored on the warm-up, or raise
    CsvSeriesError naming the file; never a silently constant or non-finite series.
    """
    path = tmp_path_factory.mktemp("p") / "v.csv"
    path.write_text("value\n" + "\n".join(map(repr, values)) + "\n")
    try:
        y, mean, std = load_csv_series(path, "value", warmup=warmup, return_scaling=True)
    except CsvSeriesError as exc:
        assert str(path) in str(exc)
        return
    v = np.array(values)
    assert np.isfinite(y).all() and np.abs(y).max() <= TARGET_LIMIT
    assert np.isfinite(mean) and std > 0 and np.isfinite(std)
    # an increasing affine map: order is never reversed and ties stay ties (rounding may merge near values)
    i, j = np.triu_indices(len(v), 1)
    dy = (y[i] > y[j]).astype(int) - (y[i] < y[j])
    dv = (v[i] > v[j]).astype(int) - (v[i] < v[j])
    assert np.all(dy * dv >= 0) and np.all(dy[dv == 0] == 0)
    assert abs(y[:warmup].mean()) < 1e-9 and abs(y[:warmup].std() - 1) < 1e-9


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=8, max_size=60),
       block=st.integers(8, 200), crlf=st.booleans(), quote=st.booleans(), final_newline=st.booleans(),
       max_rows=st.one_of(st.none(), st.integers(7, 70)))
def test_csv_block_reader_matches_the_csv_module(tmp_path_factory, values, block, crlf, quote, final_newline, max_rows):
    """Property: every block size, line end, quoting and max_rows give the same numbers as the csv module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(streams, "CSV_BLOCK_BYTES", block)
        _check_block_reader(tmp_path_factory, values, crlf, quote, final_newline, max_rows)


def _check_block_reader(tmp_path_factory, values, crlf, quote, final_newline, max_rows):
    end = "\r\n" if crlf else "\n"
    rows = [(f'"2020-{i}"' if quote and i % 3 == 0 else f"2020-{i}") + f",{v!r},x" for i, v in enumerate(values)]
    text = "\ufeffdate,value,other" + end + end.join(rows) + (end if final_newline else "")
    path = tmp_path_factory.mktemp("b") / "b.csv"
    path.write_bytes(text.encode("utf-8"))
    ref = _reference_column(path, "value")[:max_rows]
    head = ref[:5]
    if np.ptp(head) == 0 or np.abs((ref - head.mean()) / head.std()).max() > 1e29:
        return  # a constant warm-up, or values beyond the z-score limit: refused, tested elsewhere
    y, mean, std = load_csv_series(path, "value", warmup=5, max_rows=max_rows, return_scaling=True)
    np.testing.assert_allclose(y * std + mean, ref, rtol=1e-12, atol=1e-9 * np.abs(ref).max())
    assert y.shape == ref.shape


def test_csv_is_streamed_into_a_float64_array(tmp_path, monkeypatch):
    """Memory: about 8 bytes per row plus one block (a list of Python floats would need over 32 bytes per row)."""
    monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", 1 << 14)
    n = 100_000
    rng = np.random.default_rng(0)
    v = np.cumsum(rng.normal(size=n))
    path = tmp_path / "big.csv"
    path.write_text("value\n" + "\n".join(map(repr, v.tolist())) + "\n")
    tracemalloc.start()
    try:
        y = load_csv_series(path, "value", warmup=500)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert y.shape == (n,) and y.dtype == np.float64
    np.testing.assert_allclose(y, (v - v[:500].mean()) / v[:500].std(), rtol=1e-10, atol=1e-10)
    assert peak < 16 * n + 20 * streams.CSV_BLOCK_BYTES, peak / n


@pytest.mark.parametrize("where", ["header", "data", "last"])
def test_csv_overlong_line_is_refused_without_reading_it_all(tmp_path, monkeypatch, where):
    monkeypatch.setattr(streams, "CSV_MAX_LINE_BYTES", 100)
    monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", 32)
    lines = ["date,value"] + [f"2020-{i},{i % 7}" for i in range(30)]
    at = {"header": 0, "data": 10, "last": 30}[where]
    lines[at] += "9" * 500
    path = _write(tmp_path, "\n".join(lines) + ("\n" if where != "last" else ""))
    with pytest.raises(CsvSeriesError, match=rf"line {at + 1}: longer than 100 bytes without a line end"):
        load_csv_series(path, "value", warmup=5)


def test_missing_cells_can_be_dropped(tmp_path):
    """FRED-style gaps: an error by default, rows dropped with missing='drop' (the values in order, gaps closed)."""
    path = tmp_path / "gaps.csv"
    values = [float(v) for v in range(1, 31)]
    lines = ["date,A,B"] + [f"d{i},{v:g},{'' if i % 7 == 3 else v}" for i, v in enumerate(values)]
    lines.insert(10, "d-holiday,,")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CsvSeriesError, match="empty cell"):
        load_csv_series(path, "B", warmup=5)
    got, mean, std = load_csv_series(path, "B", warmup=5, missing="drop", return_scaling=True)
    kept = np.array([v for i, v in enumerate(values) if i % 7 != 3])
    np.testing.assert_allclose(got * std + mean, kept, rtol=1e-12)
    a = load_csv_series(path, "A", warmup=5, missing="drop", return_scaling=True)
    np.testing.assert_allclose(a[0] * a[2] + a[1], values, rtol=1e-12)
    with pytest.raises(ValueError, match="missing must be"):
        load_csv_series(path, "A", missing="fill")


# --------------------------------------------------------------------------- CSV files we have not seen
def _series_rows(n=40):
    return [(f"2020-{i:04d}", f"{(i * 37 % 101) / 10}", f"{i % 5}") for i in range(n)]


def test_csv_duplicate_column_name_is_refused_not_picked(tmp_path):
    """Two columns named like the target: which one is meant is unknown, so it is an error naming both positions."""
    text = "date,value,value\n" + "".join(f"{d},{v},{o}\n" for d, v, o in _series_rows())
    path = _write(tmp_path, text)
    with pytest.raises(CsvSeriesError, match=rf"{path}: column 'value' appears 2 times in the header row \(fields 2, 3\)"):
        load_csv_series(path, "value", warmup=5)
    # a duplicate elsewhere does not matter
    text = "x,value,x\n" + "".join(f"{d},{v},{o}\n" for d, v, o in _series_rows())
    assert load_csv_series(_write(tmp_path, text, "ok.csv"), "value", warmup=5).shape == (40,)


@pytest.mark.parametrize("row,fields", [
    ("2020-0007,Paris, France,3.1,1", 5),  # an unquoted comma in a text field: every later column shifts
    ("2020-0007,3.1,1", 3),  # a field missing before the target: the target would be read from the next column
])
def test_csv_row_with_another_field_count_is_refused_not_shifted(tmp_path, row, fields):
    lines = ["date,place,value,other"] + [f"{d},here,{v},{o}" for d, v, o in _series_rows()]
    lines[8] = row
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(CsvSeriesError, match=rf"{path}, line 9 \(data row 8\): {fields} fields, the header row has 4"):
        load_csv_series(path, "value", warmup=5)


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
@pytest.mark.parametrize("missing", ["error", "drop"])
def test_csv_field_count_is_checked_row_by_row_whatever_the_others(tmp_path, sep, missing):
    """Rows with one field too many and one too few balance in a block's delimiter count: each is still refused
    at its line, in the block fast path as in the line-by-line one, and with missing='drop' (a gap is an empty cell
    of a well-formed row, not a row cut short), whichever column is read.
    """
    rng = np.random.default_rng(11)
    for trial in range(12):
        lines = [sep.join(("date", "a", "b", "c"))] + [sep.join((f"2020-{i}", f"{i % 7}.5", f"{i % 5}.25", f"{i % 3}.125"))
                                                        for i in range(60)]
        long_at, short_at = sorted(rng.choice(np.arange(1, 61), size=2, replace=False))
        cells = lines[long_at].split(sep)
        extra = int(rng.integers(0, 4))
        lines[long_at] = sep.join(cells[:extra] + ["1e3"] + cells[extra:])  # e.g. 'Jan 5, 2020' unquoted
        cells = lines[short_at].split(sep)
        lines[short_at] = sep.join(cells[:-1] if rng.random() < 0.5 else cells[:1] + cells[2:])
        path = _write(tmp_path, "\n".join(lines) + "\n", f"f{trial}.csv")
        first = min(long_at, short_at)
        for column in ("a", "b", "c"):
            with pytest.raises(CsvSeriesError, match=rf"line {first + 1} \(data row {first}\)(, column '{column}')?: "):
                load_csv_series(path, column, warmup=5, missing=missing)
    # one row cut short (its last field lost), alone: not a gap to drop
    lines = ["date,a,b"] + [f"2020-{i},{i % 7}.5,{i % 5}" for i in range(30)]
    lines[12] = "2020-11,4.5"
    with pytest.raises(CsvSeriesError, match=r"line 13 \(data row 12\)(, column 'b')?: "):
        load_csv_series(_write(tmp_path, "\n".join(lines) + "\n", "cut.csv"), "b", warmup=5, missing=missing)


def test_csv_missing_drop_counts_the_dropped_rows(tmp_path):
    """return_dropped: the rows dropped as gaps (empty cells, markers, blank lines inside the data, not at its end)."""
    lines = ["date,value"] + [f"2020-{i},{i % 7}" for i in range(30)]
    lines[4] = "2020-3,"
    lines[9] = "2020-8,NA"
    lines.insert(15, "")
    path = _write(tmp_path, "\n".join(lines) + "\n\n\n")
    got, n = load_csv_series(path, "value", warmup=5, missing="drop", return_dropped=True)
    assert (got.shape, n) == ((28,), 3)
    y, mean, std, n = load_csv_series(path, "value", warmup=5, missing="drop", return_dropped=True, return_scaling=True)
    assert n == 3 and np.array_equal(y, got)
    assert load_csv_series(_write(tmp_path, _csv(range(30)), "ok.csv"), "value", warmup=5, return_dropped=True)[1] == 0


def test_csv_missing_drop_counts_the_dropped_rows_whatever_the_blocks(tmp_path, monkeypatch):
    """The count of return_dropped does not depend on where the file's blocks end: blank lines that ended a block
    whose next block took the fast path were not counted (0 instead of 2 for most small block sizes).
    """
    lines = ["date,value,other"] + [f"2020-{i},{i % 7}.5,{i}" for i in range(40)]
    for at in (31, 22, 12):  # two blank lines three times, and one marker
        lines[at:at] = ["", ""]
    lines[5] = "2020-4,NA,4"
    for end in ("\n", "\n\n"):  # a blank line at the end is not a row
        path = _write(tmp_path, "\n".join(lines) + end)
        want = load_csv_series(path, "value", warmup=5, missing="drop")
        for block in range(8, 200, 3):
            monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", block)
            got, n = load_csv_series(path, "value", warmup=5, missing="drop", return_dropped=True)
            assert n == 7 and np.array_equal(got, want), (block, n)


@pytest.mark.parametrize("sep", [";", "\t", "|"])
@pytest.mark.parametrize("crlf", [False, True])
def test_csv_semicolon_tab_and_pipe_delimiters_are_read_from_the_header(tmp_path, sep, crlf):
    """A file delimited by ';', tab or '|' (no comma in the header) loads to the same series as the comma file."""
    rows = _series_rows(60)
    end = "\r\n" if crlf else "\n"
    ref = load_csv_series(_write(tmp_path, "date,value,other\n" + "".join(",".join(r) + "\n" for r in rows)), "value",
                          warmup=5)
    text = sep.join(("date", "value", "other")) + end + "".join(sep.join(r) + end for r in rows)
    got = load_csv_series(_write(tmp_path, text, "sep.csv"), "value", warmup=5)
    np.testing.assert_array_equal(got, ref)
    quoted = sep.join(('"date"', '"value"', '"other"')) + end + "".join(sep.join(f'"{c}"' for c in r) + end for r in rows)
    np.testing.assert_array_equal(load_csv_series(_write(tmp_path, quoted, "q.csv"), "value", warmup=5), ref)


def test_csv_decimal_comma_in_a_semicolon_file_is_named(tmp_path):
    text = "date;value\n" + "".join(f"2020-{i};{i % 7},5\n" for i in range(20))
    path = _write(tmp_path, text)
    with pytest.raises(CsvSeriesError, match=r"line 2 \(data row 1\), column 'value': '0,5' is not a number .*decimal comma"):
        load_csv_series(path, "value", warmup=5)


def test_csv_decimal_comma_in_a_semicolon_file_says_how_to_read_it(tmp_path):
    text = "date;value\n" + "".join(f"2020-{i};{i % 7},5\n" for i in range(20))
    with pytest.raises(CsvSeriesError, match=r"'0,5' is not a number \(a decimal comma\? .* decimal=','"):
        load_csv_series(_write(tmp_path, text), "value", warmup=5)


@pytest.mark.parametrize("sep", [";", "\t", "|", "sep=; line", "one column"])
@pytest.mark.parametrize("block", [1 << 20, 64])
def test_csv_with_decimal_commas_reads_the_numbers_of_the_same_file_with_points(tmp_path, monkeypatch, sep, block):
    """The class: a European-locale file (decimal commas; dates such as 01.02.2020 and a header name holding a comma in
    other fields). decimal=',' reads exactly the values of the file written with points, in the fast path (one block)
    and beside the strict one (64-byte blocks, one holding a quoted cell).
    """
    rng = np.random.default_rng(4)
    values = rng.standard_normal(300) * 10.0 ** rng.integers(-3, 4, 300)
    dots = [repr(float(v)) for v in values]
    if block < 1024:  # small blocks: most take the fast path, the one with a quote the strict one; one block: all fast
        dots[7] = '"' + dots[7] + '"'
    commas = [c.replace(".", ",") for c in dots]
    monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", block)
    dotted = "value\n" + "".join(f"{c}\n" for c in dots)
    if sep == "one column":  # no delimiter in the header row: the default one is not ','
        comma = "value\n" + "".join(f"{c}\n" for c in commas)
    else:
        d = ";" if sep == "sep=; line" else sep
        comma = (("sep=;\n" if sep == "sep=; line" else "") + f"Datum{d}value{d}Wert (EUR, netto)\n"
                 + "".join(f"{i % 28 + 1:02d}.02.2020{d}{c}{d}x\n" for i, c in enumerate(commas)))
    want = load_csv_series(_write(tmp_path, dotted, "dotted.csv"), "value", warmup=20)
    got = load_csv_series(_write(tmp_path, comma, "comma.csv"), "value", warmup=20, decimal=",")
    np.testing.assert_array_equal(got, want)
    if sep != "one column":
        assert streams.csv_columns(tmp_path / "comma.csv", decimal=",") == ["Datum", "value", "Wert (EUR, netto)"]


@pytest.mark.parametrize("cell, why", [("12.5", "no point"), ("1.234,5", "no point"), ("1,234,5", "not a number"),
                                       ("12,5e", "not a number"), ("0x1,0", "not a number")])
def test_csv_decimal_comma_refuses_a_cell_with_a_point_or_not_a_number(tmp_path, cell, why):
    rows = [f"{i};{i % 5},25" for i in range(40)]
    rows[30] = f"30;{cell}"
    path = _write(tmp_path, "t;value\n" + "\n".join(rows) + "\n")
    with pytest.raises(CsvSeriesError, match=rf"line 32 \(data row 31\), column 'value': '{re.escape(cell)}' is not a number "
                                             r"with a decimal comma \(decimal=','"):
        load_csv_series(path, "value", warmup=5, decimal=",")


def test_csv_decimal_mark_is_checked_and_a_comma_delimiter_line_refused_with_it(tmp_path):
    path = _write(tmp_path, "sep=,\nt,value\n" + "".join(f"{i},{i % 3}\n" for i in range(30)))
    with pytest.raises(CsvSeriesError, match=r"line 1: the delimiter line 'sep=,' names the decimal mark \(decimal=','\)"):
        load_csv_series(path, "value", warmup=5, decimal=",")
    for bad in ("", ";", "comma", None, 1):
        with pytest.raises(ValueError, match=rf"decimal must be '\.' or ',' \(the numbers' decimal mark\), got {re.escape(repr(bad))}"):
            load_csv_series(path, "value", warmup=5, decimal=bad)
        with pytest.raises(ValueError, match="decimal must be"):
            streams.csv_columns(path, decimal=bad)


@pytest.mark.parametrize("text, column, why", [
    ("date,value\n1,2\n", "value", r"the columns are 'date,value'; with decimal=',' the delimiter is tab, ';' or '\|', never ',', "
                                   r"and this header row is delimited by commas: read the file with decimal='\.'"),
    ("date value\n1 2,5\n", "value", r"holds none of the delimiters '\\t', ';', '\|': a file delimited by spaces is not read "
                                     r"\(convert it, e.g. tr -s ' ' ';'\)"),
    ("value\n1;2,5\n", "value", r"line 2 \(data row 1\): 2 fields, the header row has 1 \(delimiter ';'\)"),
])
def test_csv_decimal_comma_hints_name_the_delimiters_it_accepts(tmp_path, text, column, why):
    """A comma-delimited file read with decimal=',' is told so; on bd2245e: "did you mean 'date,value'?" (asking for it
    fails on every row). A space-delimited one is not told to convert its spaces to commas; the delimiter of a one-column
    header is ';' as documented (it was a tab).
    """
    with pytest.raises(CsvSeriesError, match=why):
        load_csv_series(_write(tmp_path, text), column, warmup=5, decimal=",")


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
@pytest.mark.parametrize("bom_crlf", [False, True])
def test_csv_excel_delimiter_line_sets_the_delimiter(tmp_path, sep, bom_crlf):
    """A first line 'sep=X' (Excel's delimiter line) names the delimiter and the header row follows it; it was read as
    the header row ("no column 'value'; the columns are 'sep=', ''"). Lines are still counted from the file's first.
    """
    rows = _series_rows(60)
    ref = load_csv_series(_write(tmp_path, "date,value,other\n" + "".join(",".join(r) + "\n" for r in rows)), "value",
                          warmup=5)
    end = "\r\n" if bom_crlf else "\n"
    body = sep.join(("date", "value, in m", "other")) + end + "".join(sep.join(r) + end for r in rows)
    if sep != ",":  # a delimiter other than the comma, named by the sep= line, whatever the names hold
        path = _write(tmp_path, ("\ufeff" if bom_crlf else "") + f"sep={sep}{end}" + body, "excel.csv")
        assert streams.csv_columns(path) == ["date", "value, in m", "other"]
        np.testing.assert_array_equal(load_csv_series(path, "value, in m", warmup=5), ref)
    path = _write(tmp_path, f"sep={sep}{end}" + sep.join(("date", "value", "other")) + end
                  + "".join(sep.join(r) + end for r in rows) + sep.join(("x", "oops", "1")) + end, "bad.csv")
    with pytest.raises(CsvSeriesError, match=r"line 63 \(data row 61\), column 'value': 'oops' is not a number"):
        load_csv_series(path, "value", warmup=5)
    with pytest.raises(CsvSeriesError, match=r"line 1: the delimiter line 'sep=:' names ':'; accepted delimiters: ','"):
        load_csv_series(_write(tmp_path, "sep=:\ndate:value\n", "colon.csv"), "value", warmup=5)


@pytest.mark.parametrize("sep, name", [("\t", "Price, USD"), (";", "Price, USD"), ("|", "v;w"), (",", "v\tw|x")])
def test_csv_delimiter_in_a_name_does_not_choose_the_delimiter(tmp_path, sep, name):
    """The delimiter was the first of ',', tab, ';', '|' in the header row, so a name holding an earlier one (a tab file
    with 'Price, USD') split the header on it: no such column. It is now the first held that splits the first data row
    into as many fields as the header row (any delimiter of a name is unquoted in the header row only).
    """
    rows = _series_rows(60)
    ref = load_csv_series(_write(tmp_path, "date,value,other\n" + "".join(",".join(r) + "\n" for r in rows)), "value",
                          warmup=5)
    path = _write(tmp_path, sep.join(("date", name, "other")) + "\n" + "".join(sep.join(r) + "\n" for r in rows), "s.csv")
    assert streams.csv_columns(path) == ["date", name, "other"]
    np.testing.assert_array_equal(load_csv_series(path, name, warmup=5), ref)


def test_csv_numpy_comment_header_and_trailing_delimiter_are_named(tmp_path):
    """numpy.savetxt writes its header as a comment ('# value'): the message blamed a space-delimited file. A row ending
    in a delimiter the header row lacks now says so.
    """
    text = "# value\n" + "".join(f"{(i * 37 % 101) / 10}\n" for i in range(30))
    with pytest.raises(CsvSeriesError, match=r"the columns are '# value' \(did you mean '# value'\? the header row starts "
                                             r"with '#', a comment marker as numpy.savetxt writes it"):
        load_csv_series(_write(tmp_path, text), "value", warmup=5)
    assert load_csv_series(_write(tmp_path, text), "# value", warmup=5).shape == (30,)
    text = "date,value\n" + "".join(f"{d},{v},\n" for d, v, _ in _series_rows())
    with pytest.raises(CsvSeriesError, match=r"line 2 \(data row 1\): 3 fields, the header row has 2 .*the row ends with "
                                             r"the delimiter and the header row does not"):
        load_csv_series(_write(tmp_path, text), "value", warmup=5)


@pytest.mark.parametrize("marker", ["NA", "N/A", "nan", "NaN", "null", "NULL", "None", ".", "#N/A", "<NA>", "?", "-", "--",
                                    "n.a.", "#NV", "#N/D", "#N/B", "#Н/Д", "#I/T", "#HIÁNYZIK", "#YOK", "#NENÍ_K_DISPOZICI"])
def test_csv_missing_value_markers_are_gaps_dropped_with_missing_drop(tmp_path, marker):
    """R's NA, pandas' NaN, FRED's '.', SQL's NULL, UCI's '?', a dash: a gap, an error naming missing='drop' by default,
    dropped with it ('?' and '-' were "not a number" even with missing='drop': the UCI household power file could not
    be read).
    """
    vals = [str((i * 37 % 101) / 10) for i in range(30)]
    vals[12] = marker
    path = _write(tmp_path, _csv(vals))
    with pytest.raises(CsvSeriesError, match=r"line 14 \(data row 13\), column 'value': .* marks a missing value.*missing='drop'"):
        load_csv_series(path, "value", warmup=5)
    got, mean, std = load_csv_series(path, "value", warmup=5, missing="drop", return_scaling=True)
    kept = [float(v) for i, v in enumerate(vals) if i != 12]
    np.testing.assert_allclose(got * std + mean, kept, rtol=1e-12)
    vals[12] = "inf"  # not a missing value: still refused
    with pytest.raises(CsvSeriesError, match="'inf' is not a finite number"):
        load_csv_series(_write(tmp_path, _csv(vals), "inf.csv"), "value", warmup=5, missing="drop")


@pytest.mark.parametrize("error", ["#DIV/0!", "#VALUE!", "#REF!", "#NAME?", "#NUM!", "#NULL!", "#SPILL!", "#CALC!",
                                   "#GETTING_DATA!", "#ERROR!", "#div/0!", "Err:502",
                                   # Excel's placeholder while a value loads; localized names (es, ru, sv, pt: decimal-comma
                                   # locales), which hold non-ASCII letters and Spanish's inverted marks
                                   "#GETTING_DATA", "#¡DIV/0!", "#¿NOMBRE?", "#ЗНАЧ!", "#VÄRDEFEL!", "#NÚM!"])
@pytest.mark.parametrize("decimal", [".", ","])
def test_csv_spreadsheet_error_values_are_gaps_named_as_such(tmp_path, error, decimal):
    """A formula's error value saved by Excel, Google Sheets or LibreOffice holds no number: a gap, as a missing-value
    marker is (an error naming it and missing='drop' by default, dropped with it); it was "not a number" even with
    missing='drop'. Numbers that merely start like one are still numbers, and a word after '#' is still refused.
    """
    sep = "," if decimal == "." else ";"
    vals = [str((i * 37 % 101) / 10).replace(".", decimal) for i in range(30)]
    vals[12] = error
    path = _write(tmp_path, "date" + sep + "value\n" + "".join(f"{i}{sep}{v}\n" for i, v in enumerate(vals)))
    with pytest.raises(CsvSeriesError, match=rf"line 14 \(data row 13\), column 'value': '{re.escape(error)}' is a "
                                             r"spreadsheet's error value .*missing='drop'"):
        load_csv_series(path, "value", warmup=5, decimal=decimal)
    got, mean, std, dropped = load_csv_series(path, "value", warmup=5, missing="drop", return_scaling=True,
                                              return_dropped=True, decimal=decimal)
    kept = [float(v.replace(",", ".")) for i, v in enumerate(vals) if i != 12]
    np.testing.assert_allclose(got * std + mean, kept, rtol=1e-12)
    assert dropped == 1
    vals[12] = "#total"  # no error value's form: still not a number
    with pytest.raises(CsvSeriesError, match="'#total' is not a number"):
        load_csv_series(_write(tmp_path, "date" + sep + "value\n" + "".join(f"{i}{sep}{v}\n" for i, v in enumerate(vals)),
                               "other.csv"), "value", warmup=5, missing="drop", decimal=decimal)


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes (os.mkfifo) here")


def _in_time(call, seconds=10.0):
    """``call()`` in a thread: its result, or its exception raised here; the test fails (rather than hangs) if it waits
    longer than ``seconds``.
    """
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the reader still waits after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _writer(target, data: bytes, delay: float = 0.0, pieces: int = 3, silent: float = 0.0) -> threading.Thread:
    """A thread writing ``data`` to ``target`` (a path: opened for writing, which waits for a reader; or a pipe's fd),
    after ``delay`` seconds, then ``silent`` more once open, in ``pieces`` pieces with a pause between them (a slow
    writer), then closing it.
    """
    def run():
        time.sleep(delay)
        fd = os.open(target, os.O_WRONLY) if isinstance(target, (str, os.PathLike)) else target
        time.sleep(silent)
        try:
            step = max(1, -(-len(data) // pieces))
            for at in range(0, len(data), step):
                os.write(fd, data[at:at + step])
                time.sleep(0.02)
        except BrokenPipeError:  # the reader had what it needed (csv_columns: the header row)
            pass
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _join(writer: threading.Thread, fifo) -> None:
    """Join ``writer``; one still waiting to open ``fifo`` (its reader failed) is let through by a reader opened here."""
    writer.join(0.5)
    if writer.is_alive():
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(5)
        os.close(fd)


@needs_fifo
@pytest.mark.parametrize("when", ["writer first", "writer late", "writer silent"])
def test_a_named_pipe_is_read_like_the_file(tmp_path, monkeypatch, when):
    """``mkfifo p; zcat data.csv.gz > p & memoa run --csv p`` was refused ("not a regular file"); a named pipe is now read
    once, front to back, as its file would be: with its writer waiting for the reader, or opening it after the reader
    has started (then the reader waits for it), and writing slowly; a writer that has it open and writes nothing for
    longer than the wait for a writer (:data:`CSV_PIPE_WAIT`) is waited for too.
    """
    from memoa_fast.timeseries import streams

    monkeypatch.setattr(streams, "CSV_PIPE_WAIT", 0.05 if when == "writer silent" else 10.0)
    text = _csv(np.sin(np.arange(300) * 0.1))
    ref = load_csv_series(_write(tmp_path, text), "value", warmup=5, return_scaling=True)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    delay = 0.15 if when == "writer late" else 0.0
    for read, want in ((lambda: load_csv_series(fifo, "value", warmup=5, return_scaling=True), ref),
                       (lambda: csv_columns(fifo), ["date", "value", "other"])):
        holder = None
        if when == "writer silent":  # the writer has the pipe open before the read starts: no race with the short wait
            holder = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, so that the writer's open returns at once
            writer = _writer(os.open(fifo, os.O_WRONLY), text.encode(), silent=0.25)
        else:
            writer = _writer(fifo, text.encode(), delay)
        try:
            got = _in_time(read)
        finally:
            _join(writer, fifo)
            if holder is not None:
                os.close(holder)
        np.testing.assert_equal(got, want)


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd here")
def test_a_pipe_by_its_dev_fd_path_is_read_once_as_the_array_grows(tmp_path, monkeypatch):
    """``memoa run --csv <(zcat ETTh1.csv.gz)`` passes ``/dev/fd/63``, a pipe: it was refused ("not a regular file").
    Read now, in blocks, over many of them (small blocks here), into an array that grows geometrically (no size is
    known ahead): every reallocation at least 1.5 times the last (rounded down), so the copies are linear in the rows.
    """
    from memoa_fast.timeseries import streams

    text = _csv(np.cos(np.arange(5000) * 0.01))
    ref = load_csv_series(_write(tmp_path, text), "value", warmup=5)
    monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", 4096)
    sizes, grow = [], streams._ColumnReader._grow

    def recorded(self, need):
        grow(self, need)
        if not sizes or self.buf.shape[0] != sizes[-1]:
            sizes.append(self.buf.shape[0])

    monkeypatch.setattr(streams._ColumnReader, "_grow", recorded)
    r, w = os.pipe()
    try:
        writer = _writer(w, text.encode(), pieces=20)
        got = _in_time(lambda: load_csv_series(f"/dev/fd/{r}", "value", warmup=5))
    finally:
        os.close(r)  # a writer still writing (the reader failed) gets a broken pipe
        writer.join(5)
    np.testing.assert_array_equal(got, ref)
    assert len(sizes) > 3 and all(b >= a + a // 2 for a, b in zip(sizes, sizes[1:])), sizes


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd here")
def test_a_pipe_read_up_to_max_rows_never_holds_more_than_max_rows(tmp_path, monkeypatch):
    """A pipe's array grows by half each time (no size known ahead); the growth was capped at ``max_rows`` only for
    the rows needed, not for the half added: up to 1.5 x ``max_rows`` values were allocated (``memoa run --csv
    <(...)`` reads up to 10,000,001 rows: 40 MB more, then a trimming copy). Every allocation is at most ``max_rows`` now.
    """
    from memoa_fast.timeseries import streams

    text = _csv(np.cos(np.arange(5000) * 0.01))
    monkeypatch.setattr(streams, "CSV_BLOCK_BYTES", 4096)
    sizes, grow = [], streams._ColumnReader._grow

    def recorded(self, need):
        grow(self, need)
        sizes.append(self.buf.shape[0])

    monkeypatch.setattr(streams._ColumnReader, "_grow", recorded)
    for max_rows in (3000, 4000, 4500):
        r, w = os.pipe()
        try:
            writer = _writer(w, text.encode(), pieces=20)
            got = _in_time(lambda: load_csv_series(f"/dev/fd/{r}", "value", warmup=5, max_rows=max_rows))
        finally:
            os.close(r)  # the writer still writing gets a broken pipe
            writer.join(5)
        assert got.shape == (max_rows,) and max(sizes) == max_rows, (max_rows, sizes)
        sizes.clear()


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="no /dev/fd here")
def test_a_pipe_whose_writer_pauses_gives_the_rows_it_has_written(tmp_path):
    """A pipe was read in whole blocks (1 MiB, or its end): rows written already were held back while its writer
    paused, and ``<(tail -f live.csv)`` with ``max_rows`` (``memoa run --rounds``) never returned although the rows were
    there. A pipe is read as its bytes come now; its values are those of its file, a line split across reads too.
    """
    text = _csv(np.sin(np.arange(50) * 0.3)).encode()
    ref = load_csv_series(_write(tmp_path, text.decode()), "value", warmup=5, max_rows=30)
    r, w = os.pipe()
    writer = threading.Timer(0.1, os.write, (w, text[700:]))
    try:
        os.write(w, text[:700])  # < a pipe's buffer; a line cut in two, the rest after a pause
        writer.start()
        got = _in_time(lambda: load_csv_series(f"/dev/fd/{r}", "value", warmup=5, max_rows=30))  # the writer stays open
    finally:
        writer.join(5)
        os.close(w)  # lets a reader still waiting (the test failed) see the end
        os.close(r)
    np.testing.assert_array_equal(got, ref)


@needs_fifo
def test_a_named_pipe_without_a_writer_is_refused_in_time(tmp_path, monkeypatch):
    """A named pipe no process writes: open() waited for a writer, forever (once the path check was passed, or
    raced). Now it is opened without blocking and its writer waited for :data:`CSV_PIPE_WAIT` seconds, then refused,
    saying so; a writer that opens it and closes it without a byte leaves an empty file, said at once.
    """
    from memoa_fast.timeseries import streams

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    monkeypatch.setattr(streams, "CSV_PIPE_WAIT", 0.2)
    for read in (lambda: load_csv_series(fifo, "value", warmup=5), lambda: csv_columns(fifo)):
        with pytest.raises(CsvSeriesError, match=r"pipe.csv: no process opened this named pipe for writing within 0.2 s"):
            _in_time(read)
    monkeypatch.setattr(streams, "CSV_PIPE_WAIT", 60.0)
    start = time.monotonic()
    writer = _writer(fifo, b"")
    try:
        with pytest.raises(CsvSeriesError, match=r"pipe.csv: the file is empty"):
            _in_time(lambda: load_csv_series(fifo, "value", warmup=5))
    finally:
        _join(writer, fifo)
    assert time.monotonic() - start < 5.0


@pytest.mark.parametrize("read", [lambda p: load_csv_series(p, "value", warmup=5), csv_columns])
def test_the_csv_readers_open_their_path_once_and_read_what_its_handle_is(tmp_path, monkeypatch, read):
    """The path was checked (``is_file``, ``stat``), then opened: a named pipe put in its place in between made the
    open wait forever. Now the path is opened once (without blocking) and what is read is decided by that handle's
    fstat: a regular file that a stat of the path saw is read as what the open finds (here a named pipe swapped in
    between the path's stat and the open, which is read, not waited for forever).
    """
    path = _write(tmp_path, _csv(range(20)))
    opened, real_open, real_stat = [], os.open, os.stat
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    read(path)
    assert opened == [str(path)], opened
    if not hasattr(os, "mkfifo"):
        return
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(path) if os.fspath(p) == str(fifo) else real_stat(p, *a, **k))
    monkeypatch.setattr(streams, "CSV_PIPE_WAIT", 0.2)
    with pytest.raises(CsvSeriesError, match="no process opened this named pipe for writing"):
        _in_time(lambda: read(fifo))


@pytest.mark.parametrize("data,what", [
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip-compressed"),
    (b"BZh91AY&SY", "bzip2-compressed"),
    (b"\xfd7zXZ\x00\x00", "xz-compressed"),
    (b"PK\x03\x04\x14\x00", "a zip archive"),
    ("date,value\n1,2\n".encode("utf-16"), "UTF-16 text"),
])
def test_csv_compressed_or_utf16_file_is_named_as_such(tmp_path, data, what):
    path = tmp_path / "s.csv"
    path.write_bytes(data + b"\x00\x01\x02" * 10)
    with pytest.raises(CsvSeriesError, match=rf"{path}: the file is {what}, not UTF-8 CSV text"):
        load_csv_series(path, "value", warmup=5)


def test_csv_classic_mac_line_ends_are_named(tmp_path):
    path = tmp_path / "mac.csv"
    path.write_bytes(("date,value\r" + "".join(f"2020-{i},{i % 7}\r" for i in range(20))).encode())
    with pytest.raises(CsvSeriesError, match=r"line ends are \\r alone .*accepted: \\n or \\r\\n"):
        load_csv_series(path, "value", warmup=5)


@pytest.mark.parametrize("decimal", [".", ","])
def test_csv_without_a_header_row_says_so(tmp_path, decimal):
    sep = "," if decimal == "." else ";"
    path = _write(tmp_path, "".join(f"2020-01-{i:02d}{sep}{i % 7}{decimal}5{sep}1{decimal}25\n" for i in range(1, 20)))
    with pytest.raises(CsvSeriesError, match="the first line looks like data, not a header row"):
        load_csv_series(path, "value", warmup=5, decimal=decimal)


def test_csv_constant_warmup_message_shows_a_plain_number(tmp_path):
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(_write(tmp_path, _csv([5.0] * 10 + [6.0] * 5)), "value", warmup=5)
    assert "(value 5.0)" in str(err.value) and "np.float64" not in str(err.value)


def test_csv_real_files_keep_their_field_counts(datasets_dir):
    """The shared files pass the field-count check as they are (FRED's holidays have every field, empty)."""
    for rel, column, kw in [("ett/ETTm2.csv", "OT", {}), ("exchange_rate/exchange_rate.csv", "SGD", {}),
                            ("exchange_rate/fred_h10_daily_1971_2017.csv", "Japan", {"missing": "drop"}),
                            ("airline_passengers/airline-passengers.csv", "Passengers", {"warmup": 24})]:
        y = load_csv_series(datasets_dir / rel, column, **kw)
        assert np.isfinite(y).all() and y.shape[0] > 100


def test_csv_empty_first_line_and_all_missing_column_are_named(tmp_path):
    with pytest.raises(CsvSeriesError, match="line 1: the first line is empty"):
        load_csv_series(_write(tmp_path, "\n" + _csv(range(20))), "value", warmup=5)
    text = "date,value\n" + "".join(f"2020-{i},{'NA' if i % 2 else ''}\n" for i in range(20))
    with pytest.raises(CsvSeriesError, match=r"0 data rows \(every cell of the column is empty or a missing-value marker\)"):
        load_csv_series(_write(tmp_path, text, "m.csv"), "value", warmup=5, missing="drop")


def test_csv_path_through_a_file_or_a_link_loop_is_not_found_as_before(tmp_path):
    """A path whose folder is a file (``data.csv/x.csv``) or a loop of symbolic links: "CSV file not found" (a
    FileNotFoundError), as before the open-once reader, which raised the open's bare NotADirectoryError / OSError
    ("[Errno 40] Too many levels of symbolic links") instead.
    """
    paths = [_write(tmp_path, _csv(range(20))) / "x.csv"]
    if hasattr(os, "symlink"):
        loop = tmp_path / "loop.csv"
        try:
            os.symlink(loop, loop)
            paths.append(loop)
        except OSError:  # no symbolic links for this user (Windows)
            pass
    for path in paths:
        for read in (lambda p: load_csv_series(p, "value"), csv_columns):
            with pytest.raises(FileNotFoundError, match=rf"^CSV file not found: {re.escape(repr(str(path)))}$"):
                read(path)


def test_a_device_is_refused_before_it_is_opened(monkeypatch, tmp_path):
    """Opening a device can act (a serial port resets the board behind it, a watchdog starts, a terminal becomes the
    controlling one): the readers opened it, then refused it from the handle's fstat. A device at the path is now
    refused before any open, by the CSV readers and by a checkpoint load alike.
    """
    if not (os.path.exists(os.devnull) and os.devnull == "/dev/null"):
        pytest.skip("no /dev/null character device here")
    from memoa_fast.checkpoint import CheckpointError, load_checkpoint
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(os.fspath(p)) or real_open(p, *a, **k))
    for read in (lambda p: load_csv_series(p, "value"), csv_columns):
        with pytest.raises(CsvSeriesError, match=r"'/dev/null' is a character device"):
            read(os.devnull)
    with pytest.raises(CheckpointError, match=r"it is a character device, not a checkpoint file"):
        load_checkpoint(os.devnull)
    assert os.devnull not in opened, opened


def test_csv_path_that_is_a_device_socket_or_folder_is_named(tmp_path):
    """A device or a socket is refused, saying what it is (it was "not a regular file (a pipe, socket or device)",
    pipes being refused too); a folder is "not found", as before. A socket cannot be opened: named from the path then.
    """
    if os.path.exists(os.devnull) and os.devnull == "/dev/null":
        for read in (lambda p: load_csv_series(p, "value"), csv_columns):
            with pytest.raises(CsvSeriesError, match=r"'/dev/null' is a character device, not a CSV file or a pipe"):
                read(os.devnull)
    if hasattr(socket, "AF_UNIX"):
        short = tempfile.mkdtemp(dir="/tmp" if os.path.isdir("/tmp") else None)  # a socket's path is short (108 bytes)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(os.path.join(short, "s.csv"))
                with pytest.raises(CsvSeriesError, match=r"s.csv' is a socket, not a CSV file or a pipe"):
                    load_csv_series(os.path.join(short, "s.csv"), "value")
        finally:
            shutil.rmtree(short)
    for read in (lambda p: load_csv_series(p, "value"), csv_columns):
        with pytest.raises(FileNotFoundError, match=r"\(it is a directory\)"):
            read(tmp_path)
        with pytest.raises(FileNotFoundError, match=r"CSV file not found: '.*nothing.csv'$"):
            read(tmp_path / "nothing.csv")


def test_csv_quoted_fields_after_a_space_are_unquoted(tmp_path):
    """'"date", "value"' (a space after each delimiter, as many writers emit) reads like '"date","value"'."""
    rows = _series_rows(30)
    ref = load_csv_series(_write(tmp_path, "date,value,other\n" + "".join(",".join(r) + "\n" for r in rows)), "value", warmup=5)
    text = '"date", "value", "other"\n' + "".join(", ".join(f'"{c}"' for c in r) + "\n" for r in rows)
    np.testing.assert_array_equal(load_csv_series(_write(tmp_path, text, "s.csv"), "value", warmup=5), ref)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(column=3), TypeError, "column must be a str .* got 3 of type int"),
    (dict(column=None), TypeError, "column must be a str .* got None"),
    (dict(column="value", return_scaling="yes"), TypeError, "return_scaling must be True or False, got 'yes'"),
])
def test_csv_arguments_are_checked_by_type(tmp_path, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        load_csv_series(_write(tmp_path, _csv(range(20))), warmup=5, **kwargs)


class _CountedCell(str):
    """A cell that counts its ``strip`` calls (a str subclass: the reader cannot tell)."""

    def strip(self, *args):
        self.strips += 1
        return str.strip(self, *args)


@pytest.mark.parametrize("missing", ["error", "drop"])
def test_csv_slow_path_strips_each_cell_once(tmp_path, monkeypatch, missing):
    """Every row of this file goes through the strict line-by-line path (quoted fields); each cell is stripped at
    most once, and the values are the column's.
    """
    rng = np.random.default_rng(3)
    values = rng.normal(size=400)
    # (every other row without a date: a blank first cell, then the value, is not a blank line)
    rows = [f'{"" if i % 2 else f"2020-01-{i % 28 + 1:02d}"}, {float(v)!r} ,"x"' for i, v in enumerate(values)]
    keep = np.ones(values.size, dtype=bool)
    if missing == "drop":
        for i in (5, 77, 300):
            rows[i] = f'"2020-02-01", {["NA", "", " nan "][i % 3]} ,"x"'
            keep[i] = False
    path = tmp_path / "quoted.csv"
    path.write_text("date,value,note\n" + "\n".join(rows) + "\n\n\n")
    cells = []
    fields = streams._ColumnReader._fields

    def counted(self, text, line):
        row = [_CountedCell(c) for c in fields(self, text, line)]
        for c in row:
            c.strips = 0
        cells.extend(row)
        return row

    monkeypatch.setattr(streams._ColumnReader, "_fields", counted)
    got = load_csv_series(path, "value", warmup=10, missing=missing, return_scaling=True)
    assert max(c.strips for c in cells) == 1
    y, mean, std = got
    np.testing.assert_allclose(y * std + mean, values[keep], rtol=1e-12, atol=1e-12)


def test_csv_too_few_rows_because_of_max_rows_says_so(tmp_path):
    """A long file read with a small max_rows: the message named only the file's length as the cause."""
    path = _write(tmp_path, _csv([str(i % 7) for i in range(100)]))
    with pytest.raises(CsvSeriesError, match=r"20 data rows \(read up to max_rows=20\), too few: .*or a larger max_rows"):
        load_csv_series(path, "value", warmup=50, max_rows=20)
    with pytest.raises(CsvSeriesError, match=r"100 data rows, too few: need at least 202 .*memoa run --warmup\)$"):
        load_csv_series(path, "value", warmup=200, max_rows=150)


@pytest.mark.parametrize("column, needle", [
    ("3", r"\(a column is chosen by its name in the header row, not by its position: field 3 is 'other'\)"),
    ("9", r"\(a column is chosen by its name in the header row, not by its position\)$"),
    ("VALUE", r"\(did you mean 'value'\?\)"),  # difflib is case-sensitive: no hint was given
    ("value", r"'date value other'; the header row holds none of the delimiters .*delimited by spaces is not read"),
])
def test_csv_column_by_position_or_in_another_case_gets_a_hint(tmp_path, column, needle):
    path = _write(tmp_path, _csv([str(i % 7) for i in range(20)]))
    if column == "value":
        path = _write(tmp_path, _csv([str(i % 7) for i in range(20)], "date value other", lambda i, v: f"d{i} {v} 1"))
    with pytest.raises(CsvSeriesError, match=rf"no column '{column}' in the header row; the columns are .*{needle}"):
        load_csv_series(path, column, warmup=5)


# --------------------------------------------------------------------------- constant up to rounding
@pytest.mark.parametrize("period", [1.0, 0.5, 1.0 / 3.0, 0.25, 1.0 / 7.0])
@pytest.mark.parametrize("n_steps", [3, 50, 3001])
def test_a_sinusoid_sampled_once_per_period_is_constant_not_a_zscored_rounding_error(period, n_steps):
    """Property: periodic(periods=(1/k,), noise=0) is constant in exact arithmetic (sin(2 pi k t + phi)), so it is refused
    naming its periods; it used to return its rounding errors (1e-14) z-scored to unit variance, a ramp.
    Periods 2 and 3 (an alternating and a 3-cycle series) are real series and stay accepted.
    """
    with pytest.raises(ValueError, match=r"rounding error only .*periods=\(.*constant up to rounding.*a period of 1/k samples"):
        make_stream("periodic", n_steps, periods=(period,), amplitudes=(1.0,), noise=0.0)
    for ok in (2.0, 3.0):
        y = make_stream("periodic", n_steps, periods=(ok,), amplitudes=(1.0,), noise=0.0)
        assert np.isfinite(y).all() and abs(y.std() - 1.0) < 1e-12


@pytest.mark.parametrize("warm", [[0.3, 0.1 + 0.2] * 5, [1e6, 1e6 + 2.0**-33] * 5, [-0.0, 0.0] * 5])
def test_a_warmup_constant_up_to_rounding_is_refused_not_blown_up(tmp_path, warm):
    """0.3 and 0.30000000000000004 (a float printed after 0.1 + 0.2) differ by one unit in the last place: z-scored on them,
    the later values became 1e16 and more and the run's RMSEs 1e30. A constant warm-up was refused; one constant up to
    rounding is too (zscore as well). A warm-up with real spread at a large level still loads.
    """
    rest = [0.3 + 0.1 * math.sin(i) for i in range(20)]
    path = _write(tmp_path, _csv(warm + rest, fmt=lambda i, v: f"2020-01-{i:04d},{v!r},1"))
    with pytest.raises(CsvSeriesError, match="constant over the first 10 rows of the warm-up"):
        load_csv_series(path, "value", warmup=10)
    from memoa_fast.timeseries.streams import zscore

    with pytest.raises(ValueError, match="cannot z-score a constant series"):
        zscore(np.array(warm + rest), fit=slice(0, 10))
    level = [1e6 + 1e-6 * i for i in range(30)]  # spread 1e-12 of the level: 4 digits, not rounding
    z = load_csv_series(_write(tmp_path, _csv(level, fmt=lambda i, v: f"2020-01-{i:04d},{v!r},1"), "l.csv"), "value", warmup=10)
    assert np.isfinite(z).all() and abs(z[:10].std() - 1.0) < 1e-3


@pytest.mark.parametrize("name,params,match", [
    # a period far below one sample: sin of phases whose rounding exceeds a cycle (was a pseudo-random series, z-scored)
    ("periodic", dict(periods=(1e-300,), amplitudes=(1.0,), noise=0.0), r"rounding error only .*periods=\(1e-300,\)"),
    ("periodic", dict(periods=(5e-324,), amplitudes=(1.0,), noise=0.0), r"rounding error only \(the phases overflow"),  # was "overflows"
    ("concept", dict(drift_period=5e-324), r"drift_period=5e-324 is too short"),  # was NumPy's RuntimeWarning, then NaN
    ("concept-drift", dict(level=1e308), r"constant .* level=1e\+308"),  # was NumPy's OverflowError: high - low range
    ("concept-drift", dict(level=1e308, noise=1e306, segment=(1, 2)), None),  # a new level each step: finite, z-scored
])
def test_synthetic_streams_at_the_ends_of_their_accepted_parameters(name, params, match):
    """Every accepted parameter gives a finite z-scored stream or a ValueError naming it, never NumPy's error or a warning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if match is None:
            y = make_stream(name, 50, seed=2, **params)
            assert np.isfinite(y).all() and abs(y.std() - 1.0) < 1e-9
            return
        with pytest.raises(ValueError, match=match):
            make_stream(name, 50, seed=2, **params)


@pytest.mark.parametrize("name,params", [
    ("periodic", dict(periods=(1.0,), amplitudes=(1e200,), noise=0.0)),  # was NumPy's overflow warning, then "spread inf"
    ("periodic", dict(periods=(1.0, 17.0), amplitudes=(1e200, 1.0), noise=0.0)),
    ("periodic", dict(periods=(1.0,), amplitudes=(1e-200,), noise=0.0)),  # was "its spread 0"
    ("concept-drift", dict(level=1e14, segment=(900, 900))),  # noise 0.3 at a level of 1e14: was "within the 0"
])
def test_a_series_refused_as_rounding_names_its_spread_and_the_bound_it_is_within(name, params):
    """Property: the refusal of a generated series constant up to rounding gives its spread and the bound, both finite,
    the spread positive and within the bound, at any scale; never NumPy's warning (its spread was np.std of the raw
    values, whose squares overflow from 1e154 and underflow below 1e-154, and the bound named only periodic's own).
    """
    import re
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="rounding error only") as info:
            make_stream(name, 50, seed=2, **params)
    spread, bound = map(float, re.search(r"its spread (\S+) is within the (\S+) that rounding", str(info.value)).groups())
    assert 0.0 < spread <= bound < math.inf, str(info.value)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", sorted(streams._GENERATORS))
def test_a_stream_that_cannot_fit_is_refused_naming_n_steps_before_it_is_built(name, normalize, monkeypatch):
    """Each generator counts at least its measured peak: with one byte less available it refuses, naming ``n_steps``.

    ``make_stream("logistic", 10**11)`` raised NumPy's ``MemoryError``, and ``2**63 - 1`` its unnamed "array is too big".
    And at most its peak and a margin of 1.5 arrays: with ``normalize=False`` (no z-scoring) the count of the
    z-scored stream refused streams that fit (logistic 5 arrays for a peak of 1.1, periodic 6 for 4, concept-drift 9 for 6).
    """
    from memoa_fast import _validation

    n = 100_000  # the generators' fixed ~140 KB (0.2 of an array here) is within their margin
    make_stream(name, n, normalize=normalize)  # first-call allocations (caches, the generator's own setup) out of the measurement
    tracemalloc.start()
    make_stream(name, n, normalize=normalize)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    monkeypatch.setattr(_validation, "available_memory", lambda: peak - 1)
    with pytest.raises(ValueError, match=rf"^n_steps={n}: the stream's arrays need .* ask for fewer steps$"):
        make_stream(name, n, normalize=normalize)
    monkeypatch.setattr(_validation, "available_memory", lambda: peak + 12 * n)
    assert make_stream(name, n, normalize=normalize).shape == (n,)  # refused only when it does not fit
    with pytest.raises(ValueError, match=r"n_steps must be an integer in \[2, 2\*\*63 - 1\], got 9223372036854775808"):
        make_stream(name, 2**63, normalize=normalize)


# --------------------------------------------------------------------------- clip_outliers: the feed's causal hold
def _held_reference(y, bound, start=1):
    """clip_outliers written the obvious way: one row at a time, the range of the held rows before it, the reach
    ``2**k bound`` with ``k`` the rows just before held (per coordinate).
    """
    y = np.array(y, dtype=np.float64).reshape(len(y), -1)
    low, high = y[:start].min(axis=0), y[:start].max(axis=0)
    reach = np.broadcast_to(np.asarray(bound, dtype=np.float64), low.shape).copy()
    for t in range(start, len(y)):
        with np.errstate(over="ignore"):
            held = np.minimum(np.maximum(y[t], low - reach), high + reach)
            out = held != y[t]
            reach = np.where(out, 2.0 * reach, bound)
        y[t] = held
        low, high = np.minimum(low, y[t]), np.maximum(high, y[t])
    return y


def _spiky(rng, T, d):
    """A random walk of random scale with spikes (up to 1e6 times it) at a random rate, and a level shift."""
    y = rng.standard_normal((T, d)).cumsum(axis=0) * rng.uniform(0.01, 3.0)
    spikes = rng.random((T, d)) < rng.uniform(0.0, 0.05)
    y[spikes] += rng.standard_normal(int(spikes.sum())) * 10.0 ** rng.uniform(1, 6)
    y[rng.integers(0, T):] += rng.normal(0, 50)
    return y


def test_clip_outliers_is_the_row_by_row_reference():
    """Exactly (bit for bit) the one-row-at-a-time definition, on series long enough for the blocks to grow (> 1024
    rows) and to restart after each held value, with several coordinates and a coordinate never held (bound inf).
    """
    rng = np.random.default_rng(20261130)
    for _ in range(40):
        T, d = int(rng.integers(1, 3000)), int(rng.integers(1, 4))
        y = _spiky(rng, T, d)
        bound = rng.uniform(0.05, 10.0, size=d)
        if rng.random() < 0.3:
            bound[0] = np.inf
        start = int(rng.integers(1, 40))
        got = streams.clip_outliers(y, bound, start=start)
        assert got.shape == y.shape and got is not y
        np.testing.assert_array_equal(got, _held_reference(y, bound, start))
        np.testing.assert_array_equal(got[:start], y[:start])
        if d == 1:
            np.testing.assert_array_equal(streams.clip_outliers(y[:, 0], float(bound[0]), start), got[:, 0])


def test_clip_outliers_is_causal_odd_and_bounded():
    """Causal: the held prefix is the prefix held. Odd: holding -y gives minus holding y (negation is exact). Bounded:
    no held value lies more than its reach (the bound, doubled for each row just before it held) beyond the range of
    the held values before it; a value within is kept.
    """
    rng = np.random.default_rng(7)
    y = _spiky(rng, 2500, 2)
    bound = np.array([0.5, 3.0])
    held = streams.clip_outliers(y, bound)
    for k in (1, 2, 17, 1024, 1025, 2048, 2499):
        np.testing.assert_array_equal(streams.clip_outliers(y[:k], bound), held[:k])
    np.testing.assert_array_equal(streams.clip_outliers(-y, bound), -held)
    low = np.minimum.accumulate(held, axis=0)[:-1]
    high = np.maximum.accumulate(held, axis=0)[:-1]
    runs = np.zeros_like(y)  # held rows just before each row, per coordinate
    for t in range(2, len(y)):
        runs[t] = np.where(held[t - 1] != y[t - 1], runs[t - 1] + 1, 0)
    reach = bound * 2.0 ** runs[1:]
    assert (held[1:] >= low - reach).all() and (held[1:] <= high + reach).all()
    inside = (y[1:] >= low - reach) & (y[1:] <= high + reach)
    np.testing.assert_array_equal(held[1:][inside], y[1:][inside])
    assert runs.max() >= 2  # the reach did double


def test_clip_outliers_holds_a_recurring_sentinel_every_time():
    """The range grows by the held values, not the raw ones: a sentinel 99999 every 50 rows is held each time."""
    y = np.sin(np.arange(600) / 7.0)
    y[10::50] = 99999.0
    held = streams.clip_outliers(y, 2.0)
    assert held.max() <= 1.0 + 2.0 * 12 + 1e-12  # at most the bound more per sentinel (12 of them), never 99999
    np.testing.assert_array_equal(held[y != 99999.0], y[y != 99999.0])


def test_clip_outliers_lets_a_shift_or_a_growth_in_at_a_doubling_reach():
    """The class: the series moves beyond the range by more than the bound, row after row. With a fixed reach a shift
    of D took D / b rows and a growth faster than b a row fell ever further behind (exp(0.005 t) at b = 0.02: 1 / 290
    of its value at the end); the reach doubles each row held, so the shift is in after about log2(D / b) rows, the
    growth is followed some log2(step / b) rows behind, and a lone spike is still held at b.
    """
    y = np.zeros(2000)
    y[1:20] = [0.1, -0.1] * 9 + [0.1]
    y[100:] = 1e4
    y[1500] = 1e9  # a spike on the new level
    held = streams.clip_outliers(y, 1.0)
    assert np.count_nonzero(held[100:1500] != 1e4) == 13  # held at 0.1 + 2**k - 1 (k = 1..13), then 8191.1 + 2**13 > 1e4
    assert held[1500] == 1e4 + 1.0 and held[1501] == 1e4
    growth = np.exp(0.005 * np.arange(2000))
    fed = streams.clip_outliers(growth, 0.02)
    assert 0.9 < fed[-1] / growth[-1] <= 1.0  # some log2(110 / 0.02) ~ 12 rows behind (with a fixed reach, 1 / 290)


@pytest.mark.parametrize("series, bound, exc, words", [
    ([1.0, 2.0], 0.0, ValueError, "bound must be > 0"),
    ([1.0, 2.0], -1.0, ValueError, "bound must be > 0"),
    ([1.0, 2.0], float("nan"), ValueError, "bound must be > 0"),
    ([1.0, 2.0], [1.0, 2.0], ValueError, r"bound must be a number or one per coordinate, shape \(1,\)"),
    ([1.0, 2.0], "1", TypeError, "bound"),
    ([1.0, 2.0], 1.0, ValueError, "start must be an integer >= 1", ),
    ([1.0, float("nan")], 1.0, ValueError, "series must be finite; first non-finite value at row 1"),
    ([], 1.0, ValueError, "series must have shape"),
    ([[True, False]], 1.0, TypeError, "series"),
])
def test_clip_outliers_refuses_bad_input_naming_it(series, bound, exc, words):
    with pytest.raises(exc, match=words):
        streams.clip_outliers(series, bound, start=0 if "start" in words else 1)


def _hard_cases():
    """Series that stress the blocks and the arithmetic: every row held (a climb steeper than the bound), a held row at
    each block end, runs of held rows that stop, signed zeros, subnormals, and magnitudes whose range plus bound
    overflows (inf: nothing beyond it).
    """
    rng = np.random.default_rng(11)
    ramp = np.arange(3000.0) * 5.0
    ends = rng.standard_normal(5000) * 0.1
    ends[[16, 47, 111, 239, 495, 1007, 2031, 4079]] = 1e3  # the last row of blocks 16, 32, 64, ... rows from row 1
    runs = np.zeros((2600, 2))
    runs[100:400, 0] = np.arange(300) * 4.0  # a climb (held each row), then flat: the blocks resume
    runs[[700, 701, 702, 2048, 2049], 1] = -1e6
    zeros = np.where(rng.random((1500, 2)) < 0.5, -0.0, 0.0)
    zeros[rng.random((1500, 2)) < 0.05] = 1e-300
    tiny = rng.standard_normal((1200, 3)) * 5e-324 * rng.integers(1, 50, size=(1200, 3))
    huge = rng.uniform(-1.0, 1.0, (1100, 2)) * 1.7e308
    return [(ramp, 1.0), (ends, 0.5), (runs, np.array([1.0, np.inf])), (runs, np.array([1e-300, 2.0])), (zeros, 1e-300),
            (zeros, 5e-324), (tiny, 5e-324), (tiny, 1e-322), (huge, 1e308), (huge, np.array([2e307, 1e-300])),
            (np.array([4.0]), 1.0), (np.array([[1.0, -0.0]]), 2.0)]


@pytest.mark.parametrize("case", range(len(_hard_cases())))
def test_clip_outliers_is_the_reference_on_the_hard_cases(case):
    """Bit for bit the row-by-row definition (signs of zeros included) on each hard class, with no warning (a range
    plus a bound beyond float64's is inf, as in the definition), for every start, T = 1 and start >= T included.
    """
    import warnings

    y, bound = _hard_cases()[case]
    for start in (1, 2, 33, len(y), len(y) + 5):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = streams.clip_outliers(y, bound, start=start)
        with np.errstate(over="ignore"):
            want = _held_reference(y, bound, start).reshape(np.shape(y))
        np.testing.assert_array_equal(got, want)
        assert (np.signbit(got) == np.signbit(want)).all()


def _held_rows(y, bound, start=1):
    held = _held_reference(y, bound, start)
    return int((held != np.reshape(y, held.shape)).any(axis=1).sum())


@pytest.mark.parametrize("pattern", ["every row", "every other row", "every 17th row", "runs of 40", "spikes", "none"])
def test_the_hold_costs_about_t_d_plus_16_d_per_held_row(pattern):
    """The class: any pattern of held rows. The values the blocks compare with the range stay within
    d (3 T + 16 (rows held + 1)) (a block restarted at 1024 rows after each held one cost 1024 d per held row: 65536
    values per row at d = 64, so dense holds were far slower than the row-by-row definition), and the rows are held
    exactly as it holds them.
    """
    rng = np.random.default_rng(3)
    T, d = 3000, 4
    y = rng.standard_normal((T, d))
    t = np.arange(T)
    mask = {"every row": t >= 1, "every other row": t % 2 == 1, "every 17th row": t % 17 == 5,
            "runs of 40": (t // 40) % 3 == 1, "spikes": rng.random(T) < 0.01, "none": t < 0}[pattern]
    y[mask, rng.integers(0, d)] += 1e3 * np.arange(1, mask.sum() + 1)  # each beyond the range of all before it
    feed, held, scanned = streams._hold(y.copy(), np.full(d, 0.5), 1, copy=False)
    np.testing.assert_array_equal(feed, _held_reference(y, 0.5))
    rows = _held_rows(y, 0.5)
    # (the reach doubles while it holds: a climb of 1e3 a row gets in about once in 12 rows, 0.5 * 2**11 > 1e3)
    assert held >= rows >= 0.9 * mask.sum() and scanned <= d * (3 * T + 16 * (rows + 1)), (held, rows, scanned)


def test_dense_holds_cost_about_what_the_row_by_row_definition_costs():
    """Measured (medians of interleaved runs in this process): a coordinate climbing 5 bounds a row is held on every
    row; at d = 256 the vectorised hold took 330-460 times the row-by-row definition (1024-row blocks restarted at
    each held row), and now about as long.
    """
    import time

    rng = np.random.default_rng(0)
    y = rng.standard_normal((400, 256))
    y[:, 0] = np.arange(400) * 5.0
    ratios = []
    for _ in range(5):
        t0 = time.perf_counter()
        got = streams.clip_outliers(y, 1.0)
        t1 = time.perf_counter()
        want = _held_reference(y, 1.0)
        ratios.append((t1 - t0) / (time.perf_counter() - t1))
    np.testing.assert_array_equal(got, want)
    assert sorted(ratios)[2] < 40, ratios


@pytest.mark.parametrize("copy", [True, False])
def test_hold_copies_only_once_a_value_is_held(copy):
    """With copy, a clean series comes back as itself (no (T, d) array made) and a held one in a copy, the input
    untouched; without, in place. The temporaries are a few blocks whatever T (tracemalloc peak).
    """
    import tracemalloc

    y = np.sin(np.arange(1 << 21) / 40.0)[:, None]
    tracemalloc.start()
    try:
        feed, held, _ = streams._hold(y, np.array([0.5]), 20, copy=copy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert feed is y and held == 0 and peak < 8 * (8 * streams._HOLD_BLOCK_VALUES) <= y.nbytes / 8, peak
    spiked = y.copy()
    spiked[2_000_000] = 9.0
    before = spiked.copy()
    feed, held, _ = streams._hold(spiked, np.array([0.5]), 20, copy=copy)
    assert held == 1 and feed[2_000_000, 0] == before[:2_000_000].max() + 0.5 and (feed is spiked) is (not copy)
    np.testing.assert_array_equal(spiked, before if copy else feed)


def test_spread_along_an_axis_is_each_slice_alone_bit_for_bit():
    """The class: any (T, d) or (d, T) array of finite values, any magnitudes. ``spread(a, axis)[j]`` is ``spread`` of
    slice ``j`` alone, whatever the other slices hold (NumPy's reduction across rows summed in another order: an ulp).
    """
    from memoa_fast.timeseries.streams import spread

    rng = np.random.default_rng(11)
    for T, d in ((101, 2), (257, 7), (4096, 3)):
        a = rng.standard_normal((T, d)) * 10.0 ** rng.uniform(-200, 200, d) + rng.normal(0, 1e3, d)
        a = a / 2.0 ** np.ceil(np.log2(np.abs(a).max(axis=0)))  # each column within [-1, 1], as the callers pass them
        along_rows, along_columns = spread(a, axis=0), spread(np.ascontiguousarray(a.T), axis=1)
        for j in range(d):
            alone = spread(np.ascontiguousarray(a[:, j]))
            assert along_rows[j] == alone == along_columns[j], (T, d, j)


@pytest.mark.parametrize("read", [lambda p: load_csv_series(p, "value"), csv_columns])
def test_a_csv_path_that_names_no_file_is_refused_naming_the_argument(tmp_path, read):
    """A path holding a NUL character said "CSV file not found" (no file name can hold one), and a path that is
    not a str or os.PathLike raised pathlib's unnamed TypeError; now each names ``path``, as the checkpoints' do (46144f1).
    """
    with pytest.raises(ValueError, match=re.escape("path must name a file, without a NUL character ('\\0'), got 'a\\x00b.csv'")):
        read("a\0b.csv")
    for bad in (None, 3, b"a.csv"):
        with pytest.raises(TypeError, match=rf"path must be a str or os.PathLike naming the CSV file, got {re.escape(repr(bad))}"):
            read(bad)
