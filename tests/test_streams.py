"""Streams: seeded synthetic series and the CSV loader (z-score on a warm-up prefix, clear errors)."""
import math

import numpy as np
import pytest

from memoa_fast.streams import (
    SYNTHETIC_STREAMS,
    CsvSeriesError,
    concept,
    concept_drift,
    load_csv_series,
    logistic_map,
    make_stream,
    periodic,
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


# --------------------------------------------------------------------------- CSV
def _write(tmp_path, text, name="series.csv"):
    path = tmp_path / name
    path.write_text(text)
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
    vals[7] = "n/a"
    path = _write(tmp_path, _csv(vals))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    msg = str(err.value)
    assert f"{path}, line 9 (data row 8), column 'value'" in msg and "'n/a' is not a number" in msg


@pytest.mark.parametrize("cell", ["", "  ", "nan", "inf"])
def test_csv_gap_names_line_and_column(tmp_path, cell):
    vals = [str(i) for i in range(20)]
    vals[3] = cell
    path = _write(tmp_path, _csv(vals))
    with pytest.raises(CsvSeriesError) as err:
        load_csv_series(path, "value", warmup=5)
    msg = str(err.value)
    assert f"{path}, line 5 (data row 4), column 'value'" in msg
    assert ("empty cell" in msg) if not cell.strip() else ("not a finite number" in msg)


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
