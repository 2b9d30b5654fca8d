"""Checkpoints: exact resume, atomic writes under crashes, clear errors, no half-loaded state, no bombs.

Persistence depends only on the core (game, state validators), so these
tests drive it with small reference engines defined here: a population and a
server reduced to their state, loading it through the same validators as the
real engines (``memoa_fast._state``). Every engine that keeps that contract
checkpoints the same way.
"""
import contextlib
import errno
import itertools
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zipfile
import zlib
from unittest import mock

import numpy as np
import pytest
from helpers import assert_as_saved, reap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memoa_fast import Game
from memoa_fast._state import check_population_state, check_server_state, check_source_state
from memoa_fast.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from memoa_fast.kernels import SIGNAL_LIMIT

GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
N, D = 300, 2


# =========================================================================== reference engines
class StatePopulation:
    """A population engine reduced to what persistence sees; loads through ``check_population_state``."""

    def __init__(self, game, n_agents, dim):
        self.game, self.n_agents, self.dim = game, n_agents, dim
        self.states = np.zeros((n_agents, dim))
        self.costs = np.zeros(n_agents)
        self.mean_state, self.mean_signal = np.zeros(dim), np.zeros(dim)
        self.t, self.discount, self.n_valid = 0, 1.0, 0

    def step(self, s):
        valid = (np.abs(s) <= SIGNAL_LIMIT).all(axis=1)
        m = self.states.mean(axis=0)
        if valid.any():
            self.mean_signal = s[valid].mean(axis=0)
        u = np.where(valid[:, None], 0.5 * (np.where(valid[:, None], s, 0.0) - self.states), 0.0)
        self.costs += self.discount / 2 * (((self.states - m) ** 2).sum(axis=1) + (u**2).sum(axis=1))
        self.states += u
        self.mean_state, self.n_valid = m, int(valid.sum())
        self.t += 1
        self.discount *= self.game.gamma

    def state_dict(self):
        return {
            "states": self.states.copy(), "costs": self.costs.copy(), "mean_state": self.mean_state.copy(),
            "mean_signal": self.mean_signal.copy(), "t": self.t, "discount": self.discount,
            "n_valid_signals": self.n_valid, "game": self.game.to_dict(),
        }

    def load_state_dict(self, state):
        clean = check_population_state(state, game=self.game, n_agents=self.n_agents, dim=self.dim)
        self.states[...], self.costs[...] = clean["states"], clean["costs"]
        self.mean_state, self.mean_signal = clean["mean_state"], clean["mean_signal"]
        self.t, self.discount, self.n_valid = clean["t"], clean["discount"], clean["n_valid_signals"]


class StateServer:
    """A log-domain hedge server reduced to its state; loads through ``check_server_state``."""

    def __init__(self, n_agents, dim, *, rule="hedge", eta=0.5, alpha=0.01):
        self.n_agents, self.dim, self.rule, self.eta, self.alpha = n_agents, dim, rule, float(eta), float(alpha)
        self.log_weights = np.full(n_agents, -np.log(n_agents))
        self.n_updates = 0

    def update(self, x, y):
        log_p = self.log_weights - self.eta * ((x - y) ** 2).sum(axis=1)
        top = log_p.max()
        log_p = (log_p - top) - np.log(np.exp(log_p - top).sum())
        if self.alpha > 0:
            log_p = np.logaddexp(np.log1p(-self.alpha) + log_p, np.log(self.alpha / self.n_agents))
        self.log_weights = log_p
        self.n_updates += 1

    def state_dict(self):
        return {"log_weights": self.log_weights.copy(), "n_updates": self.n_updates, "rule": self.rule, "eta": self.eta, "alpha": self.alpha}

    def load_state_dict(self, state):
        clean = check_server_state(state, n_agents=self.n_agents, rule=self.rule, eta=self.eta, alpha=self.alpha)
        self.log_weights, self.n_updates = clean["log_weights"], clean["n_updates"]


class UncheckedSource:
    """Noisy copies of the last value, per-agent offsets; no ``validate_state_dict``.

    Its ``load_state_dict`` changes the source first and refuses a round
    counter above 10**6 after: the worst case for a checkpoint reader.
    """

    def __init__(self, n_agents, dim, seed=7):
        self.n_agents, self.dim = n_agents, dim
        self.offsets = np.random.default_rng(seed).normal(size=(n_agents, dim))
        self.y, self.t = np.zeros(dim), 0

    def observe(self, y):
        self.y = np.asarray(y, dtype=float).copy()

    def next(self):
        self.t += 1
        return self.y + self.offsets / self.t

    def state_dict(self):
        return {"agents": {"offsets": self.offsets.copy()}, "shared": {"y": self.y.copy(), "t": np.array(self.t)}}

    def load_state_dict(self, state):
        self.y = np.asarray(state["shared"]["y"], dtype=float).copy()  # changes first...
        self.offsets[...] = state["agents"]["offsets"]
        self.t = int(state["shared"]["t"])
        if self.t > 10**6:  # ...then refuses
            raise ValueError(f"source state 't' must be at most 10**6, got {self.t}")


class CheckedSource(UncheckedSource):
    """The same source with ``validate_state_dict`` (which its ``load_state_dict`` uses)."""

    def validate_state_dict(self, state):
        clean = check_source_state(state, n_agents=self.n_agents, agents={"offsets": (self.dim,)}, shared={"y": (self.dim,), "t": "count"})
        if clean["shared"]["t"] > 10**6:
            raise ValueError(f"source state 't' must be at most 10**6, got {int(clean['shared']['t'])}")
        return clean

    def load_state_dict(self, state):
        clean = self.validate_state_dict(state)
        self.offsets[...] = clean["agents"]["offsets"]
        self.y, self.t = clean["shared"]["y"], int(clean["shared"]["t"])


def _make(rule="hedge"):
    return StatePopulation(GAME, N, D), StateServer(N, D, rule=rule)


def _advance(pop, server, source, targets):
    for y in targets:
        source.observe(y)
        pop.step(source.next())
        server.update(pop.states, y + 0.1)


def _snapshot(*objects):
    return [o.state_dict() for o in objects]


def _assert_same(a, b):
    assert len(a) == len(b)
    for sa, sb in zip(a, b, strict=True):
        if sa is None or sb is None:
            assert sa is sb
            continue
        assert _flat(sa).keys() == _flat(sb).keys()
        for key, value in _flat(sa).items():
            other = _flat(sb)[key]
            if isinstance(value, np.ndarray):
                assert value.dtype == np.asarray(other).dtype, key
                np.testing.assert_array_equal(value, other, err_msg=key)
            else:
                assert value == other and type(value) is type(other), key


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "game":
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


@pytest.fixture
def run(tmp_path, rng):
    """A population, a server and a source after 8 rounds, checkpointed at ``path``."""
    targets = rng.normal(size=(20, D))
    pop, server = _make()
    source = CheckedSource(N, D)
    _advance(pop, server, source, targets[:8])
    path = tmp_path / "run.npz"
    save_checkpoint(path, pop, server, source=source)
    return pop, server, source, targets, path


# =========================================================================== round trips
def test_resume_is_bitwise_the_uninterrupted_run(run):
    pop, server, source, targets, path = run
    _advance(pop, server, source, targets[8:])
    pop2, server2 = _make()
    source2 = CheckedSource(N, D, seed=99)
    ckpt = restore_checkpoint(path, pop2, server2, source=source2)
    assert isinstance(ckpt, Checkpoint) and ckpt.t == 8 and ckpt.format_version == FORMAT_VERSION
    assert (ckpt.n_agents, ckpt.dim, ckpt.game) == (N, D, GAME)
    _advance(pop2, server2, source2, targets[8:])
    _assert_same(_snapshot(pop, server, source), _snapshot(pop2, server2, source2))


def test_a_real_signal_source_round_trips(tmp_path, rng):
    """The Numba counter-based source of the Dask engine (no ``validate_state_dict``) resumes exactly."""
    from memoa_fast.distributed import NoisyLastValueSignals

    pop, server = _make()
    source = NoisyLastValueSignals(0, N, 7, dim=D)
    targets = rng.normal(size=(6, D))
    _advance(pop, server, source, targets[:3])
    path = save_checkpoint(tmp_path / "c.npz", pop, server, source=source)
    src2 = NoisyLastValueSignals(0, N, 7, dim=D)
    restore_checkpoint(path, StatePopulation(GAME, N, D), source=src2)
    assert src2.t == source.t
    np.testing.assert_array_equal(src2.next(), source.next())


def test_file_is_plain_npz_without_pickles(run):
    *_, path = run
    with np.load(path, allow_pickle=False) as npz:
        names = set(npz.files)
        assert str(npz["format"]) == FORMAT
        assert int(npz["format_version"]) == FORMAT_VERSION
        assert all(npz[name].dtype != object for name in names)
        assert json.loads(str(npz["game"])) == GAME.to_dict()
    assert {"states", "costs", "server_log_weights", "t", "discount", "game", "n_valid_signals", "source_shared__t"} <= names
    assert not names & {"labels", "class_mean_signal", "n_finite_signals"}  # single class: not written


def test_population_only_checkpoint(tmp_path, rng):
    pop = StatePopulation(GAME, 50, 1)
    pop.step(rng.normal(size=(50, 1)))
    path = save_checkpoint(tmp_path / "p.npz", pop)
    ckpt = load_checkpoint(path)
    assert ckpt.server is None and ckpt.source is None
    with pytest.raises(CheckpointError, match="no server state"):
        restore_checkpoint(path, StatePopulation(GAME, 50, 1), StateServer(50, 1))


def test_zero_weights_save_and_restore(tmp_path):
    """Issue 8 item 8: log p = -inf (a zero weight, alpha = 0 after an overflowing loss) round-trips."""
    pop, server = StatePopulation(GAME, 4, 1), StateServer(4, 1, alpha=0.0)
    server.log_weights = np.array([0.0, -np.inf, -np.inf, -np.inf])
    path = save_checkpoint(tmp_path / "z.npz", pop, server)
    server2 = StateServer(4, 1, alpha=0.0)
    restore_checkpoint(path, StatePopulation(GAME, 4, 1), server2)
    np.testing.assert_array_equal(server2.log_weights, server.log_weights)


def test_version_1_files_are_read(tmp_path, run):
    """Files of format version 1 (game_* scalars, n_finite_signals) still restore."""
    pop, server, _, _, path = run
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    game = json.loads(str(data.pop("game")))
    data.update({f"game_{k}": np.array(v) for k, v in game.items()})
    data["n_finite_signals"] = data.pop("n_valid_signals")
    data["format_version"] = np.array(1)
    np.savez(path, **data)
    pop2, server2 = _make()
    ckpt = restore_checkpoint(path, pop2, server2)
    assert ckpt.format_version == 1
    _assert_same(_snapshot(pop, server), _snapshot(pop2, server2))


class ClassGame:
    """A stand-in for a game of K classes (the checkpoint reads any game with to_dict/from_dict/n_classes)."""

    def __init__(self, gamma=0.9, n_classes=3, policy="memoa"):
        self.gamma, self.n_classes, self.policy = gamma, n_classes, policy

    @classmethod
    def from_dict(cls, spec):
        return cls(**spec)

    def to_dict(self):
        return {"gamma": self.gamma, "n_classes": self.n_classes, "policy": self.policy}

    def __eq__(self, other):
        return isinstance(other, ClassGame) and self.to_dict() == other.to_dict()


def test_several_classes_write_and_read_labels(tmp_path, monkeypatch, rng):
    import memoa_fast.checkpoint as ckpt_module

    monkeypatch.setattr(ckpt_module, "Game", ClassGame)
    game = ClassGame()
    pop = StatePopulation(game, 20, 2)
    pop.step(rng.normal(size=(20, 2)))
    labels = rng.integers(0, 3, size=20)
    state = pop.state_dict()
    pop.state_dict = lambda: {**state, "labels": labels, "class_mean_signal": np.ones((3, 2))}
    path = save_checkpoint(tmp_path / "k.npz", pop)
    ckpt = load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.population["labels"], labels)
    assert ckpt.population["labels"].dtype == np.int64
    np.testing.assert_array_equal(ckpt.population["class_mean_signal"], np.ones((3, 2)))
    with np.load(path) as npz:
        npz_labels = npz["labels"]
    bad = labels.copy()
    bad[5] = 3
    _rewrite(path, labels=bad)
    with pytest.raises(CheckpointError, match=r"class numbers in \[0, 3\); labels\[5\] is 3"):
        load_checkpoint(path)
    _rewrite(path, labels=npz_labels, class_mean_signal=None)
    with pytest.raises(CheckpointError, match="missing key.*'class_mean_signal'"):
        load_checkpoint(path)


def test_class_signalled_is_written_only_when_the_round_counter_does_not_say_it(tmp_path):
    """A file without ``class_signalled`` counts every class as signalled past round 0 and none at round 0; the member
    is written only when a class is still silent past round 0. It was written in every K-class file, which every
    reader before the member refuses as tampering ("unknown member"), though it then said nothing t does not.
    """
    from memoa_fast import Population

    game = Game(q=[1.0, 1.0], kappa=2.0, r=0.1, gamma=0.9, shares=[0.5, 0.5])
    labels = np.arange(6) % 2
    pop = Population(game, initial_states=np.full((6, 1), 100.0), labels=labels, backend="numpy")
    silent = np.where(labels[:, None] == 1, np.nan, 101.0)

    def members(path):
        with zipfile.ZipFile(path) as zf:
            return {name.removesuffix(".npy") for name in zf.namelist()}

    for t, signals in enumerate([silent, np.full((6, 1), 102.0), np.full((6, 1), 99.0)]):
        path = save_checkpoint(tmp_path / f"k{t}.npz", pop)
        assert ("class_signalled" in members(path)) == (t == 1), t  # at t = 1 class 1 is still silent
        twin = Population(game, 6, 1, labels=labels, backend="numpy")
        restore_checkpoint(path, twin)
        for engine in (pop, twin):
            engine.step(signals)
        np.testing.assert_array_equal(twin.states, pop.states)


# =========================================================================== refused, nothing changed
def _fingerprint(*objects):
    return [o.state_dict() if o is not None else None for o in objects]


@pytest.mark.parametrize(
    "target, match",
    [
        (lambda: (StatePopulation(GAME, N + 1, D), None), "holds 300 agents"),
        (lambda: (StatePopulation(GAME, N, D + 1), None), "of dimension 2"),
        (lambda: (StatePopulation(GAME.with_policy("greedy"), N, D), None), "was saved for Game"),
        (lambda: (StatePopulation(Game(q=1.0, kappa=2.0, r=0.5, gamma=0.9), N, D), None), "was saved for Game"),
        (lambda: (StatePopulation(GAME, N, D), StateServer(N, D, rule="eg")), "rule='hedge'"),
        (lambda: (StatePopulation(GAME, N, D), StateServer(N, D, eta=0.4)), "eta=0.5"),
        (lambda: (StatePopulation(GAME, N, D), StateServer(N + 1, D)), "the server mixes"),
    ],
)
def test_mismatched_checkpoint_is_refused_and_changes_nothing(run, target, match):
    *_, path = run
    pop, server = target()
    before = _fingerprint(pop, server)
    with pytest.raises(CheckpointError, match=match):
        restore_checkpoint(path, pop, server)
    _assert_same(_fingerprint(pop, server), before)


def test_source_mismatch(run):
    pop, *_, path = run
    bare = save_checkpoint(path.with_name("bare.npz"), pop)
    with pytest.raises(CheckpointError, match="no signal-source state"):
        restore_checkpoint(bare, StatePopulation(GAME, N, D), source=CheckedSource(N, D))


@pytest.mark.parametrize("source_cls", [CheckedSource, UncheckedSource])
def test_bad_source_state_changes_nothing(run, source_cls):
    """Issue 8 item 6: a source state the source refuses is a CheckpointError, and no target changes."""
    *_, path = run
    _rewrite(path, source_shared__t=np.array(10**7))
    pop, server = _make()
    source = source_cls(N, D, seed=3)
    source.observe(np.ones(D))
    before = _fingerprint(pop, server, source)
    with pytest.raises(CheckpointError, match="the signal source refuses the saved state") as info:
        restore_checkpoint(path, pop, server, source=source)
    assert str(path) in str(info.value)
    _assert_same(_fingerprint(pop, server, source), before)


def test_source_state_of_the_wrong_form_changes_nothing(run):
    *_, path = run
    _rewrite(path, source_agents__offsets=np.zeros((N, D + 1)))
    pop, server = _make()
    source = CheckedSource(N, D)
    before = _fingerprint(pop, server, source)
    with pytest.raises(CheckpointError, match=r"source/agents/offsets'\] must have shape \(300, 2\)"):
        restore_checkpoint(path, pop, server, source=source)
    _assert_same(_fingerprint(pop, server, source), before)


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
        (dict(states=np.full((N, D), 1e51)), r"'states'\] must be at most 1e\+50 in magnitude"),
        (dict(costs=np.zeros(N + 1)), r"must have shape \(300,\)"),
        (dict(costs=np.full(N, -1.0)), r"'costs'\] must be >= 0"),
        (dict(mean_state=np.array([np.nan, 0.0])), r"'mean_state'\] must be finite"),
        (dict(t=np.array(9)), r"must be gamma\*\*t"),
        (dict(t=np.array(8.0)), "'t' must be an integer scalar"),
        (dict(t=np.array(-1)), r"'t'\] must be an integer in \[0, 2\*\*63 - 1\]"),
        (dict(discount=np.array(2.0)), r"'discount'\] is 2.0"),
        (dict(game=_game_json(policy="telepathy")), "unknown policy"),
        (dict(game=_game_json(r=-1.0)), "invalid game weights"),
        (dict(game=np.array("{not json")), "not valid JSON"),
        (dict(game_r=np.array(0.5)), "holds the game twice"),
        (dict(server_log_weights=np.zeros(N)), "not normalised"),
        (dict(server_log_weights=np.full(N, np.nan)), "must not be NaN"),
        (dict(server_log_weights=np.full(N, -np.inf)), "all -inf"),
        (dict(server_rule=np.array("vote")), "unknown server rule"),
        (dict(server_alpha=np.array(2.0)), "alpha in"),
        (dict(server_n_updates=np.array(-1)), r"'n_updates'\] must be an integer in \[0, 2\*\*63 - 1\]"),
        (dict(server_eta=None), "server state is incomplete"),
        (dict(source_agents__extra=np.zeros(N - 1)), "must have 300 rows"),
        (dict(source_shared__bad=np.array([True])), "has dtype bool; a checkpoint holds only numbers"),
        (dict(n_finite_signals=np.array(N + 1)), "n_finite_signals"),
        (dict(n_valid_signals=np.array(-5)), r"'n_valid_signals'\] must be an integer in \[0, 300\]"),
        (dict(n_valid_signals=None), "missing key 'n_valid_signals'"),
        (dict(labels=np.ones(N, dtype=np.int64)), r"class numbers in \[0, 1\)"),
        (dict(labels=np.zeros(N)), "'labels' must be an integer array"),
        (dict(extra=np.zeros(3)), "unknown member 'extra.npy'"),
    ],
)
def test_invalid_content_is_refused_and_changes_nothing(run, changes, match):
    *_, path = run
    _rewrite(path, **changes)
    pop, server = _make()
    source = CheckedSource(N, D)
    before = _fingerprint(pop, server, source)
    with pytest.raises(CheckpointError, match=match) as info:
        restore_checkpoint(path, pop, server, source=source)
    assert str(path) in str(info.value)
    _assert_same(_fingerprint(pop, server, source), before)


_ENTRIES = ["states", "costs", "mean_state", "mean_signal", "t", "discount", "n_valid_signals", "server_log_weights",
            "server_n_updates", "server_eta", "server_alpha", "source_agents__offsets", "source_shared__y", "source_shared__t"]


def _corruptions():
    """A random bad value for an entry: wrong dtype class, shape, or range."""
    bad_values = st.sampled_from([np.nan, np.inf, -np.inf, -1.0, 1e51, -1e300, 0.5, 1e308])
    return st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(["bool", "complex128", "<U3", "datetime64[s]", "float32", "int8"])),
        st.tuples(st.just("shape"), st.sampled_from(["drop", "add", "longer", "shorter", "scalar"])),
        st.tuples(st.just("value"), bad_values, st.integers(0, 10**6)),
    )


def _corrupt(value, how):
    kind = how[0]
    if kind == "dtype":
        return value.astype(how[1]) if how[1] != "datetime64[s]" else np.zeros(value.shape, dtype=how[1])
    if kind == "shape":
        if how[1] == "drop":
            return value.reshape(-1)[:1].reshape(()) if value.ndim else np.zeros(1)
        if how[1] == "add":
            return value[..., None]
        if how[1] == "scalar":
            return np.array(value.reshape(-1)[0]) if value.ndim else value.reshape(1, 1)
        n = value.shape[0] if value.ndim else 1
        flat = np.resize(value, ((n + 1) if how[1] == "longer" else max(n - 1, 0),) + value.shape[1:])
        return flat if value.ndim else flat
    out = np.array(value, dtype=np.float64)
    out.reshape(-1)[how[2] % max(out.size, 1)] = how[1]
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entry=st.sampled_from(_ENTRIES), how=_corruptions())
def test_any_corruption_of_any_entry_is_refused_or_harmless(run, entry, how):
    """Every corruption of every entry is a CheckpointError that changes nothing, or leaves a state that passes every check."""
    *_, path = run
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    data[entry] = _corrupt(data[entry], how)
    bad = path.with_name("corrupt.npz")
    np.savez(bad, **data)
    pop, server = _make()
    source = CheckedSource(N, D)
    before = _fingerprint(pop, server, source)
    try:
        restore_checkpoint(bad, pop, server, source=source)
    except CheckpointError as exc:
        assert str(bad) in str(exc)
        _assert_same(_fingerprint(pop, server, source), before)
        return
    # Accepted: then the value was one the validators allow (e.g. an int8 t, a float32 that was whole);
    # whatever was loaded passes the validators again.
    check_population_state(pop.state_dict(), game=GAME, n_agents=N, dim=D)
    check_server_state(server.state_dict(), n_agents=N, rule="hedge", eta=0.5, alpha=0.01)
    source.validate_state_dict(source.state_dict())


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_device_or_pipe_is_never_replaced_by_a_save(run, tmp_path):
    """A save renames a new file into place: a named pipe (or /dev/null, as root) was replaced by a regular file.

    Refused before anything is written, naming the path and what it is, also through a symbolic link; reading one
    says what it is (it said "no checkpoint file").
    """
    pop, server, *_ = run
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "link.npz"
    link.symlink_to(fifo)
    for path in (fifo, link):
        with pytest.raises(ValueError, match=rf"cannot write checkpoint '{re.escape(str(path))}': it is a named pipe, not a "
                                             r"regular file"):
            save_checkpoint(path, pop, server)
        assert fifo.is_fifo() and link.is_symlink()
        with pytest.raises(CheckpointError, match="it is a named pipe, not a checkpoint file"):
            restore_checkpoint(path, pop, server)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.npz", "pipe", "run.npz"]


def test_a_path_with_a_nul_character_is_refused_naming_the_argument(run, tmp_path):
    """``'a\\0b.npz'`` names no file: a ValueError naming the argument (``path``, restore's ``checkpoint``; it was the OS call's unnamed "embedded null byte")."""
    pop, server, *_ = run
    bad = str(tmp_path / "a\0b.npz")
    for call in (lambda: save_checkpoint(bad, pop, server), lambda: load_checkpoint(bad),
                 lambda: restore_checkpoint(bad, pop, server)):
        with pytest.raises(ValueError, match=r"(path|checkpoint) must name a file, without a NUL character"):
            call()


# =========================================================================== corrupt files
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


def test_a_damaged_directory_entry_never_hides_members(run, tmp_path):
    """A directory entry whose comment length swallows the entries after it: refused, never a checkpoint without them.

    zipfile stops at the end record's directory size without counting entries, so the server's and the source's
    members (optional: a checkpoint may have none) vanished and the file read as one saved without them.
    Bytes after the end record (a padded copy) change nothing: zipfile reads such a file, so the check must find
    the end record zipfile reads (it looked only for one whose comment ends the file, and skipped the check).
    """
    *_, path = run
    raw = path.read_bytes()
    reference = load_checkpoint(path)
    with zipfile.ZipFile(path) as zf:
        n_members = len(zf.infolist())
    starts = [m.start() for m in re.finditer(b"PK\x01\x02", raw)]
    assert len(starts) == n_members
    padded = tmp_path / "padded.npz"
    padded.write_bytes(raw + bytes(16))
    _assert_same(_snapshot_of(load_checkpoint(padded)), _snapshot_of(reference))  # a whole file, padded: as saved
    for start, comment_length, padding in itertools.product(starts, (0x8000, 0xFFFF), (b"", bytes(16))):
        corrupt = bytearray(raw)
        corrupt[start + 32:start + 34] = comment_length.to_bytes(2, "little")
        bad = tmp_path / "hidden.npz"
        bad.write_bytes(bytes(corrupt) + padding)
        try:
            ckpt = load_checkpoint(bad)
        except CheckpointError:
            continue
        _assert_same(_snapshot_of(ckpt), _snapshot_of(reference))


def _snapshot_of(ckpt):
    return [ckpt.population, ckpt.server, ckpt.source]


def _with_zip64_end(raw: bytes) -> bytes:
    """``raw`` (a zip) with its end record in the zip64 form, as written past 65535 members or 2 GiB (N = 10**9).

    The zip64 end record and its locator hold the counts, sizes and offset; the classic record holds 0xFFFF...
    """
    end = raw.rfind(b"PK\x05\x06")
    n_here, n_total, size, offset = struct.unpack("<2H2L", raw[end + 8:end + 20])
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n_here, n_total, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end, 1)
    classic = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return raw[:end] + record + locator + classic


def test_a_zip64_checkpoint_is_read_and_checked_by_its_zip64_count(run, tmp_path):
    """Checkpoints past 2 GiB end in a zip64 record: the member count is read there, not as 0xFFFF from the classic one.

    Read as saved, and a damaged directory entry still refused (a guard: reading 0xFFFF would refuse every
    large checkpoint; ignoring it would skip the check).
    """
    *_, path = run
    raw = path.read_bytes()
    big = tmp_path / "zip64.npz"
    big.write_bytes(_with_zip64_end(raw))
    _assert_same(_snapshot_of(load_checkpoint(big)), _snapshot_of(load_checkpoint(path)))
    last = raw.rfind(b"PK\x01\x02", 0, raw.rfind(b"PK\x01\x02"))  # the next-to-last entry swallows the last
    corrupt = bytearray(raw)
    corrupt[last + 32:last + 34] = (0xFFFF).to_bytes(2, "little")
    big.write_bytes(_with_zip64_end(bytes(corrupt)))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(big))}: its zip directory lists"):
        load_checkpoint(big)


# =========================================================================== decompression bombs
def _npy_header(shape, dtype="<f8") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


_ZEROS = bytes(64 << 20)


class _ZerosDeflater:
    """Raw deflate (a zip member's) of anything, where each whole block of :data:`_ZEROS` costs no compression.

    A block written after a full flush (which byte-aligns the stream and resets its history) deflates to the same
    bytes every time: they are compressed once and repeated. The stream is still one valid deflate stream of the
    same data; deflating the bombs' 4.8 GB of zeros took about 11 s of CPU, the largest fixture of the suite.
    """

    _blocks: dict = {}

    def __init__(self, level):
        self._level = level
        self._z = zlib.compressobj(level, zlib.DEFLATED, -15)

    def compress(self, data):
        if data is not _ZEROS:
            return self._z.compress(data)
        if self._level not in self._blocks:
            z = zlib.compressobj(self._level, zlib.DEFLATED, -15)
            self._blocks[self._level] = z.compress(_ZEROS) + z.flush(zlib.Z_FULL_FLUSH)
        return self._z.flush(zlib.Z_FULL_FLUSH) + self._blocks[self._level]

    def flush(self, mode=zlib.Z_FINISH):
        return self._z.flush(mode)


def _write_zero_member(zf, name, header, nbytes):
    """A member of ``header`` then ``nbytes`` zeros, deflated while streaming (never held in memory)."""
    real = zipfile._get_compressor

    def compressor(compress_type, compresslevel=None):
        if compress_type == zipfile.ZIP_DEFLATED:
            return _ZerosDeflater(zlib.Z_DEFAULT_COMPRESSION if compresslevel is None else compresslevel)
        return real(compress_type, compresslevel)

    with mock.patch.object(zipfile, "_get_compressor", compressor), zf.open(name, "w", force_zip64=True) as f:
        f.write(header)
        left = nbytes
        while left > 0:
            f.write(_ZEROS if left >= len(_ZEROS) else _ZEROS[:left])
            left -= len(_ZEROS)


def _bombed_copy(path, out, *, extra=None, states_rows=None):
    """``path`` rewritten with an extra 1.6 GB member of zeros, or with ``states`` of ``states_rows`` rows."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as dst:
        for info in src.infolist():
            if states_rows is not None and info.filename == "states.npy":
                _write_zero_member(dst, "states.npy", _npy_header((states_rows, D)), states_rows * D * 8)
            else:
                dst.writestr(info.filename, src.read(info))
        if extra is not None:
            _write_zero_member(dst, extra, _npy_header((200_000_000,)), 1_600_000_000)
    return out


_MEASURE = textwrap.dedent(
    """
    import resource, sys, time
    from memoa_fast.checkpoint import CheckpointError, load_checkpoint, restore_checkpoint
    start = time.perf_counter()
    try:
        load_checkpoint(sys.argv[1])
    except CheckpointError as exc:
        message = str(exc)
    else:
        message = "accepted"
    elapsed = time.perf_counter() - start
    print(elapsed, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, message, sep="\\n")
    """
)


def _measure(path):
    """``(seconds, peak RSS bytes, message)`` of ``load_checkpoint(path)`` in a fresh process."""
    out = subprocess.run([sys.executable, "-P", "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seconds, rss, message = out.stdout.split("\n", 2)
    return float(seconds), int(rss), message.strip()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bombs")
    pop, server = StatePopulation(GAME, N, D), StateServer(N, D)
    path = save_checkpoint(folder / "ok.npz", pop, server, source=CheckedSource(N, D))
    return {
        "ok": path,
        "extra": _bombed_copy(path, folder / "extra.npz", extra="evil.npy"),
        "extra_known_prefix": _bombed_copy(path, folder / "extra2.npz", extra="source_shared__evil.npy"),
        "states": _bombed_copy(path, folder / "states.npz", states_rows=100_000_000),
    }


@pytest.fixture(scope="module")
def good_load(bombs):
    """``_measure`` of the good checkpoint: the baseline of every bomb, the same file in a fresh process, so measured once."""
    return _measure(bombs["ok"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, match",
    [
        ("extra", "unknown member 'evil.npy'"),
        ("extra_known_prefix", r"'shared/evil' has shape \(200000000,\): more than 1048576 values"),
        ("states", r"entry 'costs' must have shape \(100000000,\)"),
    ],
)
def test_decompression_bomb_is_refused_fast_in_little_memory(bombs, good_load, case, match):
    """Issue 8 item 7: a small file that inflates to 1.6 GB is refused before it is inflated."""
    assert bombs[case].stat().st_size < 20e6  # the bomb is small on disk...
    base_seconds, base_rss, message = good_load
    assert message == "accepted"
    seconds, rss, message = _measure(bombs[case])
    assert re_search(match, message), message
    assert rss - base_rss < 64 << 20, (rss, base_rss)  # ...and never inflated: < 64 MiB above a good load
    assert seconds < 2.0, seconds


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None


def test_restore_refuses_a_bombed_states_member_from_its_header(tmp_path, monkeypatch):
    """restore_checkpoint knows N and d: a ``states`` header for another size is refused, its data never read."""
    pop = StatePopulation(GAME, N, D)
    path = save_checkpoint(tmp_path / "ok.npz", pop)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename == "states.npy":
                _write_zero_member(dst, "states.npy", _npy_header((10**6, D)), 10**6 * D * 8)
            else:
                dst.writestr(info.filename, src.read(info))
    reads = []
    real_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kwargs):
        f = real_open(self, name, *args, **kwargs)
        real_read = f.read

        def read(n=-1):
            reads.append(n)
            return real_read(n)

        f.read = read
        return f

    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    with pytest.raises(CheckpointError, match="holds 1000000 agents of dimension 2, the population has 300"):
        restore_checkpoint(bad, StatePopulation(GAME, N, D))
    assert all(0 <= n < 4096 for n in reads), reads  # only headers were read


def test_a_checkpoint_is_read_without_ast(run, monkeypatch):
    """Reading never parses Python: CPython's AST constructor counts its depth in one per-interpreter field, and two
    threads parsing .npy headers at once (shards restored by a Dask worker's threads) failed a valid set as "not
    readable (truncated or corrupt?): SystemError: AST constructor recursion depth mismatch" (CPython gh-106905).
    """
    import ast

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint reader parsed with ast, as NumPy's .npy reader does")

    pop, server, source, _, path = run
    again, again_server = _make()
    again_source = CheckedSource(N, D)
    with monkeypatch.context() as patch:  # only around the read: pytest's report of a failure parses
        patch.setattr(ast, "literal_eval", refuse)
        patch.setattr(ast, "parse", refuse)
        restore_checkpoint(path, again, again_server, source=again_source)
    _assert_same(_snapshot(pop, server, source), _snapshot(again, again_server, again_source))


_HEADERS = {  # arrays NumPy writes (its header text, as np.lib.format.write_array pads it)
    "float64": np.zeros(3), "fortran": np.zeros((2, 3), order="F"), "empty": np.zeros(0), "3-d uint32": np.zeros((4, 1, 2), np.uint32),
    "str scalar": np.array("token"), "int scalar": np.array(5), "bool": np.array([True]), "big-endian": np.zeros(2, ">f8"),
}


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
@pytest.mark.parametrize("name", list(_HEADERS))
def test_the_npy_header_reads_as_numpy_reads_it(name, version):
    import io

    from memoa_fast.checkpoint import _npy_header

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, _HEADERS[name], version=version)
    buffer.seek(0)
    shape, fortran, dtype, offset = _npy_header(buffer)
    buffer.seek(0)
    assert np.lib.format.read_magic(buffer) == version
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    assert (shape, fortran, dtype) == read(buffer) and offset == buffer.tell()


@pytest.mark.parametrize("text, match", [
    ("{'descr': '<f8', 'fortran_order': False}", "once each"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), 'shape': (3,)}", "once each"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), 'extra': 1}", "not one NumPy writes"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (3)}", "not one NumPy writes"),  # an int, not a tuple
    ("{'descr': '<f8', 'fortran_order': 0, 'shape': (3,)}", "not one NumPy writes"),
    ("{'descr': [('a', '<f8')], 'fortran_order': False, 'shape': (3,)}", "not one NumPy writes"),  # structured
    ("{'descr': '<f8', 'fortran_order': False, 'shape': True}", "not one NumPy writes"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (3,)" + " " * 5000, "not one NumPy writes"),  # no brace
    ("__import__('os')", "not one NumPy writes"),
    ("{'descr': '<x8', 'fortran_order': False, 'shape': (3,)}", "descr '<x8' is not a dtype"),  # np.dtype: TypeError
    ("{'descr': '(2,)<f8', 'fortran_order': False, 'shape': (3,)}", "not one NumPy writes"),  # np.dtype: ast.literal_eval
])
def test_an_npy_header_numpy_would_not_write_is_refused(text, match, monkeypatch):
    import ast
    import io

    from memoa_fast.checkpoint import _npy_header

    def refuse(*args, **kwargs):
        raise AssertionError("a .npy header was parsed with ast")

    raw = text.encode()
    with pytest.raises(ValueError, match=match):
        with monkeypatch.context() as patch:  # only around the read: pytest's report of a failure parses
            patch.setattr(ast, "literal_eval", refuse)
            patch.setattr(ast, "parse", refuse)
            _npy_header(io.BytesIO(b"\x93NUMPY\x01\x00" + len(raw).to_bytes(2, "little") + raw))
    with pytest.raises(ValueError, match="version .3, 0. is not supported"):
        _npy_header(io.BytesIO(b"\x93NUMPY\x03\x00" + len(raw).to_bytes(4, "little") + raw))
    with pytest.raises(ValueError, match="more than 10000"):
        _npy_header(io.BytesIO(b"\x93NUMPY\x02\x00" + (10_001).to_bytes(4, "little") + raw))


def test_member_whose_size_disagrees_with_its_header(tmp_path):
    """A header that claims fewer bytes than the zip directory says (or more) is refused before reading data."""
    pop = StatePopulation(GAME, N, D)
    path = save_checkpoint(tmp_path / "ok.npz", pop)
    for extra_bytes in (8, -8):
        bad = tmp_path / f"bad{extra_bytes}.npz"
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == "costs.npy":
                    data = data + bytes(extra_bytes) if extra_bytes > 0 else data[:extra_bytes]
                dst.writestr(info.filename, data)
        with pytest.raises(CheckpointError, match="'costs' is .* bytes in the zip directory, but its header"):
            load_checkpoint(bad)


def test_unknown_compression_and_object_dtype_are_refused(tmp_path):
    pop = StatePopulation(GAME, N, D)
    path = save_checkpoint(tmp_path / "ok.npz", pop)
    bad = tmp_path / "bz.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_BZIP2 if info.filename == "costs.npy" else zipfile.ZIP_STORED)
    with pytest.raises(CheckpointError, match="compression method 12; accepted: stored or deflate"):
        load_checkpoint(bad)
    obj = tmp_path / "obj.npz"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(obj, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "costs.npy":
                data = _npy_header((N,), "|O") + bytes(8 * N)
            dst.writestr(info.filename, data)
    with pytest.raises(CheckpointError, match="'costs' has dtype object"):
        load_checkpoint(obj)


# =========================================================================== atomic writes
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

    opened = []

    class TrackedZipFile(zipfile.ZipFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    monkeypatch.setattr(np.lib.format, "write_array", half_then_crash)
    monkeypatch.setattr(zipfile, "ZipFile", TrackedZipFile)
    with pytest.raises(OSError, match="mid-write"):
        save_checkpoint(path, pop, server)
    assert path.read_bytes() == before
    assert _tmp_files(path.parent) == []
    # and the archive is closed: NumPy < 2's np.savez left its ZipFile open, to fail again in its finaliser
    assert opened and all(archive.fp is None for archive in opened)


def test_unsaveable_state_writes_nothing(run):
    """A state that could not be restored (here: unnormalised weights) is refused at save time."""
    pop, server, _, _, path = run
    before = path.read_bytes()
    server.log_weights = server.log_weights + 1.0
    with pytest.raises(ValueError, match="cannot save a checkpoint of this server: .*not normalised"):
        save_checkpoint(path, pop, server)
    pop.states[0, 0] = 1e60
    with pytest.raises(ValueError, match="cannot save a checkpoint of this population: .*SIGNAL_LIMIT"):
        save_checkpoint(path, pop)
    assert path.read_bytes() == before
    assert _tmp_files(path.parent) == []


_WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from memoa_fast import Game
    from memoa_fast.checkpoint import save_checkpoint

    class Pop:  # the population state, nothing else
        game, n_agents, dim = Game(), 200_000, 2
        def __init__(self, value):
            self.value = value
        def state_dict(self):
            return {"states": np.full((200_000, 2), self.value), "costs": np.zeros(200_000), "mean_state": np.zeros(2),
                    "mean_signal": np.zeros(2), "t": 0, "discount": 1.0, "n_valid_signals": 0, "game": Game().to_dict()}

    path, mode = sys.argv[1], sys.argv[2]
    save_checkpoint(path, Pop(0.0))
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
    save_checkpoint(path, Pop(1.0))
    """
)


def _kill_a_writer(path, mode):
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", _WRITER, str(path), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "stalled", proc.stderr.read()
        assert len(_tmp_files(path.parent)) == 1  # the half-written file exists...
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        reap(proc)


@pytest.mark.parametrize("mode", ["midwrite", "before-rename"])
def test_killed_writer_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path, mode):
    """SIGKILL a process in the middle of writing a checkpoint: the old file is whole; the next save removes the debris."""
    path = tmp_path / "ckpt.npz"
    _kill_a_writer(path, mode)
    ckpt = load_checkpoint(path)  # ...and the checkpoint is the previous one, whole
    assert not ckpt.population["states"].any()
    assert zipfile.is_zipfile(path)
    assert len(_tmp_files(tmp_path)) == 1
    save_checkpoint(path, StatePopulation(Game(), 200_000, 2))
    assert _tmp_files(tmp_path) == []


def test_only_stale_temporaries_of_this_checkpoint_are_removed(run):
    pop, server, _, _, path = run
    folder = path.parent
    old = time.time() - 3600
    names = {
        ".run.npz.ab12cd_9.tmp": True,          # a killed save of run.npz: removed
        ".run.npz.future01.tmp": False,         # newer than this save (another save in progress): kept
        ".run.npz.bak.ab12cd_9.tmp": False,     # a temporary of run.npz.bak: kept
        ".other.npz.ab12cd_9.tmp": False,       # another checkpoint's: kept
        "run.npz.ab12cd_9.tmp": False,          # not ours (no leading dot): kept
    }
    for name in names:
        (folder / name).write_bytes(b"debris")
        when = time.time() + 3600 if "future" in name else old
        os.utime(folder / name, (when, when))
    save_checkpoint(path, pop, server)
    for name, removed in names.items():
        assert (folder / name).exists() is not removed, name


@pytest.mark.parametrize("locks", ["local", "nfs"])
def test_a_save_in_progress_keeps_its_temporary_when_a_concurrent_save_cleans_up(run, monkeypatch, locks):
    """Two saves of one checkpoint at once: the one finishing first (its cleanup: every temporary of this checkpoint
    older than its start) must not remove the other's file while that one is still writing, however old it is.

    ``nfs``: NFS (and SMB) emulate flock with byte-range locks: an exclusive lock needs the file open for writing,
    else EBADF (flock(2), "NFS details"). The cleanup's probe must still see a live writer's lock there, not take the
    error for a file system without locks and delete the file mid-write.
    """
    import memoa_fast.checkpoint as ck

    if ck.fcntl is None:
        pytest.skip("no fcntl")
    pop, server, _, _, path = run
    real_flock, real_savez = ck.fcntl.flock, np.savez

    def nfs_flock(fd, op):
        if op & ck.fcntl.LOCK_EX and os.O_RDONLY == ck.fcntl.fcntl(fd, ck.fcntl.F_GETFL) & os.O_ACCMODE:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(fd, op)

    def savez_then_a_concurrent_cleanup(f, **arrays):
        real_savez(f, **arrays)
        os.utime(f.name, (time.time() - 3600, time.time() - 3600))  # a long save: its file looks old
        ck._remove_stale_temporaries(path, time.time() + 10)  # another save of `path` finishes now

    if locks == "nfs":
        monkeypatch.setattr(ck.fcntl, "flock", nfs_flock)
    monkeypatch.setattr(ck.np, "savez", savez_then_a_concurrent_cleanup)
    save_checkpoint(path, pop, server)
    monkeypatch.undo()
    np.testing.assert_array_equal(load_checkpoint(path).population["states"], pop.states)
    assert _tmp_files(path.parent) == []


def test_symlinked_checkpoint_path_is_followed(run, tmp_path):
    """Saving through a symlink replaces the file it points to and keeps the link; loading follows it too."""
    pop, server, _, _, path = run
    real_dir = tmp_path / "store"
    real_dir.mkdir()
    real = real_dir / "data.npz"
    link = tmp_path / "latest.npz"
    link.symlink_to(real)  # dangling at first: the save creates the target
    assert save_checkpoint(link, pop, server) == link
    assert link.is_symlink() and os.readlink(link) == str(real) and real.is_file()
    first = real.read_bytes()
    pop.states[...] += 1.0
    save_checkpoint(link, pop, server)
    assert link.is_symlink() and real.read_bytes() != first
    assert _tmp_files(tmp_path) == [] and _tmp_files(real_dir) == []
    pop2, server2 = _make()
    restore_checkpoint(link, pop2, server2)
    np.testing.assert_array_equal(pop2.states, pop.states)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_checkpoint(tmp_path / "nowhere" / "c.npz", StatePopulation(GAME, 3, 1))


# =========================================================================== sharded sets (no cluster needed)
def _write_set(tmp_path, bounds, rng, *, server=True):
    """A sharded set written with the same functions the shards and the client use."""
    from memoa_fast import checkpoint as ck

    n = bounds[-1][1]
    states, costs = rng.normal(size=(n, D)), rng.random(n)
    log_p = rng.normal(size=n)
    log_p -= np.log(np.exp(log_p).sum())
    offsets = rng.normal(size=(n, D))
    target = tmp_path / "set.ckpt"
    folder = ck.shard_folder(target)
    folder.mkdir()
    token = ck.new_token()
    shards = []
    for k, (lo, hi) in enumerate(bounds):
        arrays = {"states": states[lo:hi], "costs": costs[lo:hi], ck._SOURCE_AGENTS + "offsets": offsets[lo:hi]}
        if server:
            arrays["server_log_weights"] = log_p[lo:hi]
        shards.append(ck.write_shard_file(folder, token, k, lo, hi, n, arrays))
    population = {"mean_state": states.mean(axis=0), "mean_signal": np.zeros(D), "class_mean_signal": np.zeros((1, D)),
                  "class_mean_state": states.mean(axis=0)[None], "t": 3, "discount": GAME.gamma**3, "n_valid_signals": n}
    ck.write_manifest(
        target, game=GAME, n_agents=n, dim=D, population=population,
        server={"rule": "hedge", "eta": 0.5, "alpha": 0.01, "n_updates": 3} if server else None,
        source_shared={"t": np.array(3), "y": np.zeros(D)}, source_agents={"offsets": (offsets.dtype.str, (D,))}, token=token, shards=shards,
    )
    return target, folder, dict(states=states, costs=costs, log_p=log_p, offsets=offsets)


def test_shard_rows_come_from_every_file_that_holds_them(tmp_path, rng, monkeypatch):
    """Any [lo, hi), across file boundaries, streamed in small blocks: the same rows as the whole arrays."""
    from memoa_fast import checkpoint as ck

    monkeypatch.setattr(ck, "_BLOCK_BYTES", 40)  # a few rows per block
    target, _, whole = _write_set(tmp_path, [(0, 123), (123, 124), (124, 300)], rng)
    manifest = ck.read_manifest(target)
    assert [f["lo"] for f in manifest.shards] == [0, 123, 124]
    for lo, hi in [(0, 300), (5, 123), (100, 200), (123, 124), (122, 125), (299, 300)]:
        rows = ck.read_shard_rows(manifest, lo, hi)
        np.testing.assert_array_equal(rows["states"], whole["states"][lo:hi])
        np.testing.assert_array_equal(rows["costs"], whole["costs"][lo:hi])
        np.testing.assert_array_equal(rows["server_log_weights"], whole["log_p"][lo:hi])
        np.testing.assert_array_equal(rows["source_agents__offsets"], whole["offsets"][lo:hi])
    ckpt = load_checkpoint(target)  # one machine: the whole set
    assert ckpt.format_version == 3 and ckpt.t == 3 and ckpt.server["n_updates"] == 3
    np.testing.assert_array_equal(ckpt.population["states"], whole["states"])
    np.testing.assert_array_equal(ckpt.source["agents"]["offsets"], whole["offsets"])
    pop, server = _make()
    source = CheckedSource(N, D)
    restore_checkpoint(target, pop, server, source=source)
    np.testing.assert_array_equal(pop.states, whole["states"])
    np.testing.assert_array_equal(server.log_weights, whole["log_p"])


@pytest.mark.parametrize("dtype", ["(1,)<f8", "(1,)float64", "f8,(2,)f8"])
def test_a_manifest_naming_no_plain_dtype_for_a_source_is_refused_without_ast(tmp_path, rng, monkeypatch, dtype):
    """The manifest's source dtypes are NumPy dtype strs ('<f8'); np.dtype("(1,)<f8") parsed its shape with
    ast.literal_eval (not thread-safe, see test_a_checkpoint_is_read_without_ast) before refusing the subarray.
    """
    import ast

    from memoa_fast import checkpoint as ck

    def refuse(*args, **kwargs):
        raise AssertionError("the manifest was read with ast")

    target, _, _ = _write_set(tmp_path, [(0, 300)], rng)
    manifest = ck.read_manifest(target)
    ck.write_manifest(target, game=GAME, n_agents=300, dim=D, population=manifest.population, server=manifest.server,
                      source_shared=manifest.source_shared, source_agents={"offsets": (dtype, (D,))},
                      token=manifest.token, shards=manifest.shards)
    with pytest.raises(CheckpointError, match=f"names an unknown dtype '{re.escape(dtype)}'"):
        with monkeypatch.context() as patch:  # only around the read: pytest's report of a failure parses
            patch.setattr(ast, "literal_eval", refuse)
            patch.setattr(ast, "parse", refuse)
            ck.read_manifest(target)


@pytest.mark.parametrize("replacement", ["a named pipe", "a folder"])
def test_a_shard_file_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path, rng, replacement):
    """Every file a load opens is checked on the very handle it reads: a shard file replaced by a named pipe made the
    load wait forever in its open (only the manifest's own path was checked), a folder said "not readable". Now each is a
    CheckpointError naming the shard file and what it is; ``is_manifest`` of a pipe is False, at once.
    """
    import threading

    from memoa_fast import checkpoint as ck

    target, folder, _ = _write_set(tmp_path, [(0, 100), (100, 300)], rng)
    shard = folder / ck.read_manifest(target).shards[1]["file"]
    shard.unlink()
    os.mkfifo(shard) if replacement == "a named pipe" else shard.mkdir()
    outcome = []

    def load():
        try:
            outcome.append(load_checkpoint(target))
        except Exception as exc:  # noqa: BLE001 - the test checks it below
            outcome.append(exc)
        try:
            outcome.append(ck.is_manifest(shard))
        except Exception as exc:  # noqa: BLE001
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(20)
    if worker.is_alive():  # blocked in the pipe's open: free it (a writer's open) before failing
        with contextlib.suppress(OSError):
            os.close(os.open(shard, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(20)
        pytest.fail("load_checkpoint waited on a shard file that is a named pipe")
    error, manifest = outcome
    assert isinstance(error, CheckpointError), error
    assert re.search(rf"{re.escape(str(shard))}: it is {replacement}, not a checkpoint file", str(error)), str(error)
    assert manifest is False


@pytest.mark.parametrize("damage, match", [
    ("gap", r"must cover \[0, 300\) in order"),
    ("other token", "not shard 1 of save"),
    ("flipped data", "Bad CRC"),
    ("bigger header", "does not match the manifest|disagrees with its header"),
])
def test_a_set_that_does_not_match_its_manifest_is_refused(tmp_path, rng, damage, match):
    from memoa_fast import checkpoint as ck

    target, folder, _ = _write_set(tmp_path, [(0, 100), (100, 300)], rng)
    manifest = ck.read_manifest(target)
    if damage in ("gap", "other token"):
        shards = [dict(s) for s in manifest.shards]
        if damage == "gap":
            shards[1]["lo"] = 101
        else:
            shards[1]["file"] = ck.shard_file_name("0" * 16, 1)
        ck.write_manifest(target, game=GAME, n_agents=300, dim=D, population=manifest.population, server=manifest.server,
                          source_shared=manifest.source_shared, source_agents=manifest.source_agents,
                          token=manifest.token, shards=shards)
    elif damage == "flipped data":
        path = folder / manifest.shards[1]["file"]
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 3] ^= 0x01
        path.write_bytes(bytes(raw))
    else:  # the same file rewritten with one row more: size, digest and header all disagree
        path = folder / manifest.shards[1]["file"]
        with zipfile.ZipFile(path) as zf:
            members = {i.filename: zf.read(i) for i in zf.infolist()}
        members["costs.npy"] = _npy_header((201,), "<f8") + bytes(8 * 201)
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in members.items():
                zf.writestr(name, data)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(target)


def test_sharded_needs_a_population_that_writes_its_own_files(run, tmp_path):
    pop, server, _, _, path = run
    with pytest.raises(ValueError, match="sharded=True needs a population whose shards write their own files"):
        save_checkpoint(tmp_path / "x.ckpt", pop, server, sharded=True)
    assert not (tmp_path / "x.ckpt").exists()


# =========================================================================== arguments of the checkpoint functions
@pytest.mark.parametrize("kwargs, error, match", [
    ({"n_agents": N + 1}, CheckpointError, f"holds {N} agents of dimension {D}"),   # used to be ignored without dim=
    ({"dim": D + 1}, CheckpointError, f"holds {N} agents of dimension {D}"),        # used to be ignored without n_agents=
    ({"n_agents": "300"}, TypeError, "n_agents must be"),                          # used to be ignored
    ({"n_agents": 0}, ValueError, "n_agents must be"),
    ({"dim": True}, TypeError, "dim must be"),
    ({"n_agents": float(N), "dim": D}, TypeError, "n_agents must be"),
])
def test_load_checkpoint_checks_n_agents_and_dim_each(tmp_path, rng, kwargs, error, match):
    from memoa_fast import Population

    path = save_checkpoint(tmp_path / "run.npz", Population(GAME, N, D))
    with pytest.raises(error, match=match):
        load_checkpoint(path, **kwargs)
    assert load_checkpoint(path, n_agents=np.int64(N)).n_agents == N  # a NumPy integer is an integer
    assert load_checkpoint(path, dim=D).dim == D


def test_save_checkpoint_refuses_a_folder_as_the_file(tmp_path, monkeypatch):
    """The path "" (the working folder) or a folder used to fail in os.replace with a temporary's name in the message."""
    from memoa_fast import Population

    pop = Population(GAME, 4, 1)
    monkeypatch.chdir(tmp_path)
    for path in (tmp_path, "", "."):
        with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
            save_checkpoint(path, pop)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


@pytest.mark.parametrize("which", ["population", "server", "source"])
def test_checkpoint_functions_name_a_wrong_object(tmp_path, which):
    """An object without the methods a checkpoint needs used to raise AttributeError from deep inside."""
    from memoa_fast import Population, Server

    pop, server = Population(GAME, 4, 1), Server(4, 1)
    path = save_checkpoint(tmp_path / "run.npz", pop, server)
    args = {"population": pop, "server": server, "source": None}
    args[which] = "not an engine"
    with pytest.raises(TypeError, match=f"^{which} must be"):
        save_checkpoint(tmp_path / "other.npz", args["population"], args["server"], source=args["source"])
    with pytest.raises(TypeError, match=f"^{which} must be"):
        restore_checkpoint(path, args["population"], args["server"], source=args["source"])
    assert not (tmp_path / "other.npz").exists()


def test_sharded_must_be_a_bool_or_none(tmp_path):
    from memoa_fast import Population

    with pytest.raises(TypeError, match="sharded must be True, False or None"):
        save_checkpoint(tmp_path / "run.npz", Population(GAME, 4, 1), sharded="no")


@pytest.mark.parametrize("bad", [None, 123, b"run.npz", 1.5])
def test_a_path_that_is_not_a_path_is_named(tmp_path, bad):
    """None, a number or bytes used to raise Python's "expected str, bytes or os.PathLike object" from Path()."""
    from memoa_fast import Population
    from memoa_fast.checkpoint import read_manifest

    pop = Population(GAME, 4, 1)
    for call, name in ((lambda: save_checkpoint(bad, pop), "path"), (lambda: load_checkpoint(bad), "path"),
                       (lambda: read_manifest(bad), "path"), (lambda: restore_checkpoint(bad, pop), "checkpoint")):
        with pytest.raises(TypeError, match=rf"^{name} must be a str or os.PathLike naming the checkpoint file, got "
                                            rf"{re.escape(repr(bad))} of type {type(bad).__name__}"):
            call()


def test_reading_a_folder_is_named(tmp_path):
    """A folder given to a reader used to be reported as "no checkpoint file at" the folder."""
    from memoa_fast import Population
    from memoa_fast.checkpoint import read_manifest

    pop = Population(GAME, 4, 1)
    for call in (lambda: load_checkpoint(tmp_path), lambda: read_manifest(tmp_path), lambda: restore_checkpoint(tmp_path, pop)):
        with pytest.raises(IsADirectoryError, match="is a folder, not a checkpoint file"):
            call()


# =========================================================================== the settings a source's state records
def _forecaster_source(**changes):
    from memoa_fast.timeseries.forecasters import ForecasterSignals

    return ForecasterSignals(0, N, **{**dict(seed=2**63 - 1, dim=D, lags=2, noise_range=(0.1, 2.0), mu=0.3, block_size=128,
                                             backend="numpy"), **changes})


def _noisy_source(**changes):
    from memoa_fast.distributed import NoisyLastValueSignals

    return NoisyLastValueSignals(0, N, **{**dict(seed=7, dim=D, low=0.1, high=3.0), **changes})


@pytest.mark.parametrize("make, name, other, saved", [
    (_forecaster_source, "seed", 2**63 - 2, "9223372036854775807"),
    (_forecaster_source, "noise_range", (0.1, 2.5), r"\(0.1, 2.0\)"),
    (_noisy_source, "seed", 8, "7"),
    (_noisy_source, "low", 0.2, "0.1"),
])
def test_a_source_restored_with_other_settings_is_refused_naming_them_and_changes_nothing(tmp_path, rng, make, name, other, saved):
    """A checkpoint's source state restored into a source made with another seed or noise range is refused (it was
    loaded silently, and the run continued with other noise); with the same settings it resumes bitwise.
    """
    targets = rng.normal(size=(6, D))
    pop, server = _make()
    source = make()
    _advance(pop, server, source, targets[:3])
    path = save_checkpoint(tmp_path / "c.npz", pop, server, source=source)
    _advance(pop, server, source, targets[3:])  # the run that never stopped
    pop2, server2 = _make()
    wrong = make(**{name: other})
    wrong.observe(np.ones(D))
    before = _fingerprint(pop2, server2, wrong)
    with pytest.raises(CheckpointError, match=rf"refuses the saved state: ValueError: state\['source/shared/{name}'\] is "
                                              rf"{saved}, but this source has {name}="):
        restore_checkpoint(path, pop2, server2, source=wrong)
    _assert_same(_fingerprint(pop2, server2, wrong), before)
    source2 = make()
    restore_checkpoint(path, pop2, server2, source=source2)
    _advance(pop2, server2, source2, targets[3:])
    _assert_same(_snapshot(pop, server, source), _snapshot(pop2, server2, source2))


def test_a_checkpoint_saved_before_the_settings_were_recorded_restores_as_before(tmp_path, rng):
    """Nothing a user saved is lost: a checkpoint without the sources' settings (a real file written by main 99c2a56,
    and one of today's with them deleted) restores and continues bitwise; it cannot tell its settings, so its source
    state is taken on trust, as before.
    """
    from pathlib import Path

    from memoa_fast import ClientForecasters
    from memoa_fast.timeseries.forecasters import UncappedStateWarning

    old = Path(__file__).parent / "data" / "old_sources" / "forecasters.npz"
    ckpt = load_checkpoint(old)
    assert ckpt.t == 3 and sorted(ckpt.source["shared"]) == ["t", "y"]
    base = dict(lags=2, noise_range=(0.1, 2.0), mu=0.3, seed=2**63 - 1, block_size=4, backend="numpy", threads=1)
    ys = np.sin(0.7 * np.arange(12.0))[:, None] * np.array([1.0, -0.5])  # the run of make_old_sources.py
    uninterrupted = ClientForecasters(6, 2, **base)
    for y in ys[:3]:
        uninterrupted.observe(y)
    pop, server, source = StatePopulation(GAME, 6, 2), StateServer(6, 2, rule="hedge", eta=0.5, alpha=0.01), ClientForecasters(6, 2, **base)
    with pytest.warns(UncappedStateWarning):  # the file was written before the squared features were capped, too
        restore_checkpoint(old, pop, server, source=source)
    with np.load(old) as npz:
        np.testing.assert_array_equal(pop.states, npz["states"])
        np.testing.assert_array_equal(server.log_weights, npz["server_log_weights"])
    for key, value in _flat(source.state_dict()).items():  # the file's run against this one's (NumPy 1.26: to rounding)
        assert_as_saved(value, _flat(uninterrupted.state_dict())[key], err_msg=key)
    for y in ys[3:]:
        assert_as_saved(source.observe(y), uninterrupted.observe(y))
    with pytest.warns(UncappedStateWarning):
        restore_checkpoint(old, pop, server, source=ClientForecasters(6, 2, **dict(base, seed=1)))  # as before

    targets = rng.normal(size=(4, D))
    pop, server = _make()
    source = _noisy_source()
    _advance(pop, server, source, targets[:2])
    path = save_checkpoint(tmp_path / "c.npz", pop, server, source=source)
    _rewrite(path, source_shared__seed=None, source_shared__low=None, source_shared__high=None)
    _advance(pop, server, source, targets[2:])
    pop2, server2, source2 = *_make(), _noisy_source()
    restore_checkpoint(path, pop2, server2, source=source2)
    _advance(pop2, server2, source2, targets[2:])
    _assert_same(_snapshot(pop, server), _snapshot(pop2, server2))
    np.testing.assert_array_equal(source2.next(), source.next())


def test_a_load_opens_its_files_as_windows_needs(tmp_path, rng, monkeypatch):
    """On Windows (no ``O_NONBLOCK``; ``os.O_BINARY``; ``os.set_blocking`` an OSError for anything but a pipe since
    Python 3.12) every load failed: ``_open_to_read`` made its file blocking again (it never was non-blocking there),
    and opened it without ``O_BINARY``, so in text mode (CR LF read as LF, a Ctrl-Z byte as the end of the file).
    Simulated here: a plain checkpoint and a sharded one load, each file opened in binary mode.
    """
    from memoa_fast import checkpoint as ck

    pop = StatePopulation(GAME, 50, 1)
    pop.step(rng.normal(size=(50, 1)))
    plain = save_checkpoint(tmp_path / "p.npz", pop)
    sharded, _, _ = _write_set(tmp_path, [(0, 100), (100, 300)], rng)
    binary, real_open, opened = 1 << 30, os.open, []

    def windows_open(path, flags, *args):
        opened.append(flags & binary)
        return real_open(path, flags & ~binary, *args)

    def pipes_only(fd, blocking):
        raise OSError(22, "Invalid argument (os.set_blocking of a file that is not a pipe)")

    monkeypatch.delattr(os, "O_NONBLOCK", raising=False)
    monkeypatch.setattr(os, "O_BINARY", binary, raising=False)
    monkeypatch.setattr(os, "set_blocking", pipes_only)
    monkeypatch.setattr(os, "open", windows_open)
    assert load_checkpoint(plain).population["t"] == 1
    ck.read_shard_rows(ck.read_manifest(sharded), 0, 300)
    assert opened and all(opened), opened
