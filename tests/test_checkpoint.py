"""Checkpoints: exact resume, atomic writes under crashes, clear errors and no half-loaded state."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from memoa_fast import Game, Population, Server
from memoa_fast.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from memoa_fast.distributed import NoisyLastValueSignals

GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
N, D = 300, 2


def _make(rule="eg"):
    return Population(GAME, N, D, threads=1), Server(N, D, rule=rule, eta=0.5, alpha=0.01, threads=1)


def _advance(pop, server, source, targets):
    for y in targets:
        source.observe(y)
        x = pop.step(source.next())
        server.predict(x)
        server.update(x, y + 0.1)


def _snapshot(pop, server):
    return pop.state_dict(), server.state_dict()


def _assert_same_state(a, b):
    (pa, sa), (pb, sb) = a, b
    for key in ("states", "costs", "mean_state", "mean_signal"):
        np.testing.assert_array_equal(pa[key], pb[key])
    assert (pa["t"], pa["discount"], pa["n_finite_signals"]) == (pb["t"], pb["discount"], pb["n_finite_signals"])
    np.testing.assert_array_equal(sa["log_weights"], sb["log_weights"])
    assert sa["n_updates"] == sb["n_updates"]


@pytest.fixture
def run(tmp_path, rng):
    """A population, a server and a source after 8 rounds, checkpointed at ``path``."""
    targets = rng.normal(size=(20, D))
    pop, server = _make()
    source = NoisyLastValueSignals(0, N, 7, dim=D)
    _advance(pop, server, source, targets[:8])
    path = tmp_path / "run.npz"
    save_checkpoint(path, pop, server, source=source)
    return pop, server, source, targets, path


def test_resume_is_bitwise_the_uninterrupted_run(run):
    pop, server, source, targets, path = run
    _advance(pop, server, source, targets[8:])
    pop2, server2 = _make()
    source2 = NoisyLastValueSignals(0, N, 7, dim=D)
    ckpt = restore_checkpoint(path, pop2, server2, source=source2)
    assert isinstance(ckpt, Checkpoint) and ckpt.t == 8 and ckpt.format_version == FORMAT_VERSION
    _advance(pop2, server2, source2, targets[8:])
    _assert_same_state(_snapshot(pop, server), _snapshot(pop2, server2))


def test_file_is_plain_npz_without_pickles(run):
    *_, path = run
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        assert str(npz["format"]) == "memoa-fast checkpoint"
        assert int(npz["format_version"]) == FORMAT_VERSION
        assert all(npz[name].dtype != object for name in names)
    assert {"states", "costs", "server_log_weights", "t", "discount", "game", "n_valid_signals", "source_shared__t"} <= names


def test_population_only_checkpoint(tmp_path, rng):
    pop = Population(GAME, initial_states=rng.normal(size=(50, 1)), threads=1)
    pop.step(rng.normal(size=50))
    path = save_checkpoint(tmp_path / "p.npz", pop)
    ckpt = load_checkpoint(path)
    assert ckpt.server is None and ckpt.source is None
    with pytest.raises(CheckpointError, match="no server state"):
        restore_checkpoint(path, Population(GAME, 50, 1), Server(50, 1))


# --------------------------------------------------------------------------- mismatches change nothing
@pytest.mark.parametrize(
    "target, match",
    [
        (lambda: (Population(GAME, N + 1, D), None), "holds 300 agents"),
        (lambda: (Population(GAME, N, D + 1), None), "of dimension 2"),
        (lambda: (Population(GAME.with_policy("greedy"), N, D), None), "was saved for Game"),
        (lambda: (Population(Game(q=1.0, kappa=2.0, r=0.5, gamma=0.9), N, D), None), "was saved for Game"),
        (lambda: (Population(GAME, N, D), Server(N, D, rule="hedge", eta=0.5, alpha=0.01)), "rule='eg'"),
        (lambda: (Population(GAME, N, D), Server(N, D, rule="eg", eta=0.4, alpha=0.01)), "eta=0.5"),
        (lambda: (Population(GAME, N, D), Server(N + 1, D, rule="eg", eta=0.5, alpha=0.01)), "the server mixes"),
    ],
)
def test_mismatched_checkpoint_is_refused_and_changes_nothing(run, target, match):
    *_, path = run
    pop, server = target()
    before = (pop.states.copy(), pop.costs.copy(), pop.t, None if server is None else server.log_weights.copy())
    with pytest.raises(CheckpointError, match=match):
        restore_checkpoint(path, pop, server)
    np.testing.assert_array_equal(pop.states, before[0])
    np.testing.assert_array_equal(pop.costs, before[1])
    assert pop.t == before[2]
    if server is not None:
        np.testing.assert_array_equal(server.log_weights, before[3])


def test_source_state_round_trip_and_mismatch(run):
    pop, server, source, _, path = run
    src = NoisyLastValueSignals(0, N, 7, dim=D)
    restore_checkpoint(path, Population(GAME, N, D), source=src)
    assert src.t == source.t
    np.testing.assert_array_equal(src.next(), source.next())
    bare = save_checkpoint(path.with_name("bare.npz"), pop)
    with pytest.raises(CheckpointError, match="no signal-source state"):
        restore_checkpoint(bare, Population(GAME, N, D), source=NoisyLastValueSignals(0, N, 7, dim=D))


# --------------------------------------------------------------------------- corrupt files
def _game_json(**changes):
    return np.array(json.dumps({**GAME.to_dict(), **changes}))


def _rewrite(path, **changes):
    """Rewrite the checkpoint at ``path`` with some entries replaced (None deletes)."""
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    np.savez(path, **data)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(format=np.array("something else")), "not a memoa-fast checkpoint"),
        (dict(format_version=np.array(FORMAT_VERSION + 1)), "newer memoa-fast"),
        (dict(costs=None), "missing key.*'costs'"),
        (dict(states=np.zeros((N, D), dtype=np.float32)), "must be float64"),
        (dict(costs=np.zeros(N + 1)), r"must have shape \(300,\)"),
        (dict(costs=np.full(N, -1.0)), r"'costs'\] must be >= 0"),
        (dict(mean_state=np.array([np.nan, 0.0])), r"'mean_state'\] must be finite"),
        (dict(t=np.array(9)), "must be gamma\\*\\*t"),
        (dict(t=np.array(8.0)), "'t' must be an integer scalar"),
        (dict(game=_game_json(policy="telepathy")), "unknown policy"),
        (dict(game=_game_json(r=-1.0)), "invalid game weights"),
        (dict(game_r=np.array(0.5)), "holds the game twice"),
        (dict(server_log_weights=np.zeros(N)), "not normalised"),
        (dict(server_rule=np.array("vote")), "unknown server rule"),
        (dict(server_alpha=np.array(2.0)), "alpha in"),
        (dict(source_agents__extra=np.zeros(N - 1)), "must have 300 rows"),
        (dict(n_finite_signals=np.array(N + 1)), "n_finite_signals"),
        (dict(n_valid_signals=np.array(-5)), r"'n_valid_signals'\] must be an integer in \[0, 300\]"),
        (dict(n_valid_signals=None), "missing key 'n_valid_signals'"),
        (dict(server_log_weights=np.full(N, np.nan)), "must not be NaN"),
        (dict(server_n_updates=np.array(-1)), r"'n_updates'\] must be an integer in \[0, inf\]"),
        (dict(labels=np.zeros(N, dtype=np.int64) + 1), r"class numbers in \[0, 1\)"),
    ],
)
def test_invalid_content_is_refused_and_changes_nothing(run, changes, match):
    *_, path = run
    _rewrite(path, **changes)
    pop, server = _make()
    with pytest.raises(CheckpointError, match=match) as info:
        restore_checkpoint(path, pop, server)
    assert str(path) in str(info.value)
    assert pop.t == 0 and not pop.costs.any() and server.n_updates == 0


def test_truncated_and_garbage_files(run, tmp_path):
    *_, path = run
    raw = path.read_bytes()
    for cut in (0, 10, len(raw) // 3, len(raw) - 30):
        bad = tmp_path / f"cut{cut}.npz"
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="not a readable memoa-fast checkpoint|truncated"):
            load_checkpoint(bad)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00not a zip at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable"):
        load_checkpoint(garbage)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        load_checkpoint(single)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "absent.npz")


def test_any_flipped_byte_is_caught_or_harmless(run, tmp_path):
    """Zip CRCs cover every array: a flipped byte is an error, or lands where it changes no data."""
    *_, path = run
    raw = bytearray(path.read_bytes())
    reference = load_checkpoint(path)
    positions = np.linspace(0, len(raw) - 1, 240).astype(int)
    caught = 0
    for pos in positions:
        corrupt = bytearray(raw)
        corrupt[pos] ^= 0x5A
        bad = tmp_path / "flip.npz"
        bad.write_bytes(bytes(corrupt))
        try:
            ckpt = load_checkpoint(bad)
        except CheckpointError:
            caught += 1
            continue
        for key in ("states", "costs", "mean_state", "mean_signal"):
            np.testing.assert_array_equal(ckpt.population[key], reference.population[key])
        np.testing.assert_array_equal(ckpt.server["log_weights"], reference.server["log_weights"])
        assert ckpt.t == reference.t
    assert caught > 0.9 * len(positions)


# --------------------------------------------------------------------------- atomic writes
def _tmp_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_failed_rename_keeps_the_previous_checkpoint(run, monkeypatch):
    pop, server, source, targets, path = run
    before = path.read_bytes()
    _advance(pop, server, source, targets[8:10])

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, pop, server)
    assert path.read_bytes() == before
    assert load_checkpoint(path).t == 8
    assert _tmp_files(path.parent) == []


def test_failed_write_keeps_the_previous_checkpoint(run, monkeypatch):
    pop, server, _, _, path = run
    before = path.read_bytes()
    real = np.lib.format.write_array

    def half_then_crash(fp, array, *args, **kwargs):
        if array.size >= N:
            fp.write(array.tobytes()[: array.nbytes // 2])
            raise OSError("simulated crash mid-write (disk full)")
        return real(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", half_then_crash)
    with pytest.raises(OSError, match="mid-write"):
        save_checkpoint(path, pop, server)
    assert path.read_bytes() == before
    assert _tmp_files(path.parent) == []


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from memoa_fast import Game, Population
    from memoa_fast.checkpoint import save_checkpoint

    path, mode = sys.argv[1], sys.argv[2]
    pop = Population(Game(), 200_000, 2, threads=1)
    save_checkpoint(path, pop)
    pop.reset(np.ones((200_000, 2)))
    if mode == "midwrite":
        real = np.lib.format.write_array
        def slow(fp, array, *a, **k):
            if array.size >= 200_000:
                fp.write(array.tobytes()[: array.nbytes // 2])
                fp.flush()
                print("stalled", flush=True)
                time.sleep(120)
            return real(fp, array, *a, **k)
        np.lib.format.write_array = slow
    else:
        import os
        real_fsync = os.fsync
        def stall(fd):
            real_fsync(fd)
            print("stalled", flush=True)
            time.sleep(120)
        os.fsync = stall
    save_checkpoint(path, pop)
    """
)


@pytest.mark.parametrize("mode", ["midwrite", "before-rename"])
def test_killed_writer_leaves_the_previous_checkpoint(tmp_path, mode):
    """SIGKILL a process in the middle of writing a checkpoint: the old file is still whole."""
    path = tmp_path / "ckpt.npz"
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", _WRITER, str(path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "stalled", proc.stderr.read()
        assert len(_tmp_files(tmp_path)) == 1  # the half-written file exists...
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    ckpt = load_checkpoint(path)  # ...and the checkpoint is the previous one, whole
    assert not ckpt.population["states"].any()
    assert zipfile.is_zipfile(path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nowhere" / "c.npz", Population(GAME, 3, 1))
