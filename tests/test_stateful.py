"""Model-based stateful tests: random sequences of calls on every stateful object, against a shadow model.

Each machine drives one object (or one per backend) through steps, saves and loads (into the same object, a
fresh one, another backend and thread count, a checkpoint file), resets, relabelling, new games and invalid
calls, and after every call checks it against a plain NumPy shadow written from MODEL.md and the docstrings
(or against the NumPy reference backend): the counters, the records, and a twin restored from a saved state,
which must continue bitwise as the uninterrupted object. An invalid call must raise and leave the object
exactly as it was. Small sizes and fixed example counts: a few seconds in all.
"""
import copy
import math
import pickle
import tempfile
from pathlib import Path

import numpy as np
from helpers import available_backends
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from memoa_fast import Game, Pipeline, Population, Server, restore_checkpoint, save_checkpoint
from memoa_fast.timeseries.forecasters import SQUARE_CAP, ClientForecasters
from memoa_fast.timeseries.trust import TrustPopulation

BACKENDS = available_backends()
SETTINGS = settings(max_examples=10, stateful_step_count=20, deadline=None)
values = st.floats(-3.0, 3.0, allow_nan=False)


def _population_state(pop) -> dict:
    """Everything observable of a population: its state dict, labels and worst agent."""
    state = pop.state_dict()
    state["worst"] = pop.worst_agent
    state["labels"] = np.array(pop.labels)
    return state


def _assert_same(a: dict, b: dict, what: str, rtol: float = 0.0) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        x, y = a[key], b[key]
        if key in ("mean_state", "class_mean_state"):  # derived: re-summed from the states on a load
            np.testing.assert_allclose(x, y, rtol=1e-14, atol=1e-15, err_msg=f"{what}: {key}")
        elif isinstance(x, np.ndarray) and rtol:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol, err_msg=f"{what}: {key}")
        elif isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=f"{what}: {key}")
        elif key == "worst" and rtol:
            continue
        elif isinstance(x, float) and rtol:
            assert math.isclose(x, y, rel_tol=rtol), (what, key, x, y)
        else:
            assert x == y, (what, key, x, y)


class PopulationMachine(RuleBasedStateMachine):
    """Every backend in lockstep (compared with the NumPy reference), a restored twin, and a shadow of the counters."""

    @initialize(k=st.sampled_from([1, 3]), n=st.integers(3, 7), d=st.integers(1, 2), seed=st.integers(0, 2**16))
    def build(self, k, n, d, seed):
        self.rng = np.random.default_rng(seed)
        self.K, self.N, self.d = k, n, d
        if k == 1:
            self.game = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.9)
        else:
            self.game = Game(q=[1.0, 0.5, 2.0], kappa=[2.0, 1.0, 0.5], r=0.5, gamma=0.9, shares=[0.2, 0.3, 0.5])
        self.labels = np.arange(n) % k if k > 1 else None
        x0 = self.rng.normal(size=(n, d))
        self.pops = {b: Population(self.game, n, d, initial_states=x0, labels=self.labels, backend=b, threads=1)
                     for b in BACKENDS}
        self.twin = None  # (backend, a population restored from a saved state)
        self.t, self.discount = 0, 1.0

    def _all(self):
        yield from self.pops.values()
        if self.twin is not None:
            yield self.twin[1]

    @rule(invalid=st.sampled_from([None, np.nan, np.inf, 1e60]))
    def step(self, invalid):
        s = self.rng.normal(size=(self.N, self.d))
        if invalid is not None:
            s[self.rng.integers(self.N)] = invalid
        for pop in self._all():
            pop.step(s)
        self.t += 1
        self.discount *= self.game.gamma

    @rule(T=st.integers(0, 3))
    def run(self, T):
        s = self.rng.normal(size=(T, self.N, self.d))
        for pop in self._all():
            pop.run(s)
        self.t += T
        for _ in range(T):
            self.discount *= self.game.gamma

    @rule(given=st.booleans())
    def reset(self, given):
        x0 = self.rng.normal(size=(self.N, self.d)) if given else None
        for pop in self._all():
            pop.reset(x0)
        self.t, self.discount = 0, 1.0

    @precondition(lambda self: self.K > 1)
    @rule()
    def relabel(self):
        labels = self.rng.permutation(np.arange(self.N) % self.K)
        for pop in self._all():
            pop.set_labels(labels)

    @rule(q=st.floats(0.1, 3.0))
    def new_game(self, q):
        game = Game(q=q, kappa=1.0, r=0.5, gamma=0.9) if self.K == 1 else self.game.with_weights(q=[q, 1.0, 0.5])
        for pop in self._all():
            pop.set_game(game)
        self.game = game

    @rule(backend=st.sampled_from(BACKENDS), threads=st.sampled_from([1, 2]), via=st.sampled_from(["state", "pickle", "file"]))
    def restore_twin(self, backend, threads, via):
        """A new object of ``backend`` and thread count from a saved state: it must continue bitwise."""
        src = self.pops[backend]
        if via == "pickle":
            twin = pickle.loads(pickle.dumps(src))
        else:
            labels = None if self.K == 1 else self.rng.permutation(np.arange(self.N) % self.K)  # replaced by the load
            twin = Population(self.game, self.N, self.d, labels=labels, backend=backend, threads=threads, parallel_threshold=1)
            if via == "state":
                twin.load_state_dict(src.state_dict())
            else:
                with tempfile.TemporaryDirectory() as folder:
                    restore_checkpoint(save_checkpoint(Path(folder) / "run.npz", src), twin)
        self.twin = (backend, twin)
        _assert_same(_population_state(src), _population_state(twin), f"restored twin ({via})")

    @rule(other=st.sampled_from(BACKENDS))
    def load_across_backends(self, other):
        """Each backend's state loaded into each object: a round trip through another backend changes nothing."""
        for backend, pop in self.pops.items():
            before = _population_state(pop)
            tmp = Population(self.game, self.N, self.d, labels=self.labels, backend=other)
            tmp.load_state_dict(pop.state_dict())
            pop.load_state_dict(copy.deepcopy(tmp).state_dict())
            _assert_same(before, _population_state(pop), f"{backend} through {other}")

    @rule(case=st.integers(0, 9))
    def invalid_call(self, case):
        """A refused call leaves every object exactly as it was."""
        N, d, K = self.N, self.d, self.K
        calls = [
            lambda p: p.step(np.zeros((N + 1, d))),
            lambda p: p.step(np.zeros((N, d), dtype=complex)),
            lambda p: p.run(np.zeros((2, N, d + 1))),
            lambda p: p.reset(np.full((N, d), np.nan)),
            lambda p: p.reset(np.full((N, d), 1e60)),
            lambda p: p.set_labels(np.full(N, K)),
            lambda p: p.set_game(Game(q=1.0, kappa=1.0, r=0.5, gamma=0.5)),
            lambda p: p.load_state_dict({**p.state_dict(), "t": p.t + 1}),
            lambda p: p.load_state_dict({**p.state_dict(), "costs": -np.ones(N)}),
            lambda p: p.load_state_dict({**p.state_dict(), "states": np.full((N, d), np.nan)}),
        ]
        for pop in self._all():
            before = _population_state(pop)
            try:
                calls[case](pop)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"invalid call {case} was accepted")
            _assert_same(before, _population_state(pop), f"invalid call {case}")

    @invariant()
    def agree(self):
        ref = _population_state(self.pops["numpy"])
        assert ref["t"] == self.t and math.isclose(ref["discount"], self.discount, rel_tol=1e-14)
        for backend, pop in self.pops.items():
            _assert_same(ref, _population_state(pop), f"{backend} vs numpy", rtol=1e-9)
        if self.twin is not None:
            backend, twin = self.twin
            _assert_same(_population_state(self.pops[backend]), _population_state(twin), "twin")


class ServerMachine(RuleBasedStateMachine):
    """Server (every backend) against MODEL.md section 5 written out in NumPy."""

    @initialize(n=st.integers(1, 6), d=st.integers(1, 2), rule_=st.sampled_from(["eg", "hedge"]),
                eta=st.sampled_from([0.0, 0.5, 4.0]), alpha=st.sampled_from([0.0, 0.05, 1.0]), seed=st.integers(0, 2**16))
    def build(self, n, d, rule_, eta, alpha, seed):
        self.rng = np.random.default_rng(seed)
        self.N, self.d, self.rule, self.eta, self.alpha = n, d, rule_, eta, alpha
        self.servers = {b: Server(n, d, rule=rule_, eta=eta, alpha=alpha, backend=b) for b in BACKENDS}
        self.log_p, self.n = np.full(n, -math.log(n)), 0

    @rule()
    def update(self):
        x, y = self.rng.normal(size=(self.N, self.d)), self.rng.normal(size=self.d)
        for srv in self.servers.values():
            srv.update(x, y)
        p = np.exp(self.log_p)
        g = 2 * x @ (p @ x - y) if self.rule == "eg" else ((x - y) ** 2).sum(axis=1)
        v = self.log_p - self.eta * g
        top = v.max()
        v -= top + math.log(np.exp(v - top).sum())
        with np.errstate(divide="ignore"):
            self.log_p = np.log((1 - self.alpha) * np.exp(v) + self.alpha / self.N)
        self.n += 1

    @rule()
    def reset(self):
        for srv in self.servers.values():
            srv.reset()
        self.log_p, self.n = np.full(self.N, -math.log(self.N)), 0

    @rule(backend=st.sampled_from(BACKENDS), via=st.sampled_from(["state", "pickle"]))
    def reload(self, backend, via):
        """Each server replaced by one of ``backend`` with two threads loaded from its state (or its pickle)."""
        for name, srv in list(self.servers.items()):
            if via == "pickle":
                new = pickle.loads(pickle.dumps(srv))
            else:
                new = Server(self.N, self.d, rule=self.rule, eta=self.eta, alpha=self.alpha, backend=backend, threads=2,
                             parallel_threshold=1)
                new.load_state_dict(srv.state_dict())
            np.testing.assert_array_equal(new.log_weights, srv.log_weights)
            assert new.n_updates == srv.n_updates
            if new.backend == name:
                self.servers[name] = new

    @rule(case=st.integers(0, 5))
    def invalid_call(self, case):
        N, d = self.N, self.d
        calls = [
            lambda s: s.update(np.full((N, d), np.nan), np.zeros(d)),
            lambda s: s.update(np.zeros((N, d)), np.full(d, np.inf)),
            lambda s: s.update(np.zeros((N + 1, d)), np.zeros(d)),
            lambda s: s.load_state_dict({**s.state_dict(), "log_weights": np.zeros(N) + 1.0}),
            lambda s: s.load_state_dict({**s.state_dict(), "eta": self.eta + 1.0}),
            lambda s: s.load_state_dict({**s.state_dict(), "n_updates": -1}),
        ]
        for srv in self.servers.values():
            before = srv.state_dict()
            try:
                calls[case](srv)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"invalid call {case} was accepted")
            after = srv.state_dict()
            np.testing.assert_array_equal(after["log_weights"], before["log_weights"])
            assert after["n_updates"] == before["n_updates"]

    @invariant()
    def matches_model_md(self):
        for srv in self.servers.values():
            assert srv.n_updates == self.n
            np.testing.assert_allclose(srv.weights, np.exp(self.log_p), rtol=1e-10, atol=1e-14)


class ForecasterMachine(RuleBasedStateMachine):
    """ClientForecasters (numba and numpy, on shards of small blocks) against the NLMS of its docstring, PCG64 draws included."""

    @initialize(n=st.integers(1, 6), d=st.integers(1, 2), lags=st.integers(1, 3), block=st.sampled_from([2, 4096]),
                first_block=st.integers(0, 2), seed=st.integers(0, 2**16))
    def build(self, n, d, lags, block, first_block, seed):
        self.n, self.d, self.p, self.mu, self.seed, self.block = n, d, lags, 0.3, seed, block
        self.first = first_block * block if block < 100 else 0
        self.kw = dict(lags=lags, mu=self.mu, seed=seed, first_client=self.first, block_size=block)
        self.fcs = {b: ClientForecasters(n, d, backend=b, **self.kw) for b in ("numba", "numpy")}
        self.sigma = np.empty(n)
        for k in range(-(-n // block)):
            gen = np.random.Generator(self._bitgen(k))
            lo, hi = k * block, min((k + 1) * block, n)
            self.sigma[lo:hi] = np.exp(math.log(0.02) + (math.log(1.0) - math.log(0.02)) * gen.random(block))[: hi - lo]
        self._reset_shadow()

    def _bitgen(self, k):
        return np.random.PCG64(np.random.SeedSequence(self.seed, spawn_key=(self.first // self.block + k,)))

    def _reset_shadow(self):
        self.w = np.zeros((self.n, self.d, 2 * self.p + 1))
        self.w[:, :, 0] = 1.0
        self.lags, self.out, self.t = np.zeros((self.n, self.d, self.p)), np.zeros((self.n, self.d)), 0

    def _phi(self):
        return np.concatenate([self.lags, np.minimum(self.lags**2, SQUARE_CAP), np.ones((self.n, self.d, 1))], axis=2)

    @rule(y=values)
    def observe(self, y):
        y = np.full(self.d, y)
        for fc in self.fcs.values():
            fc.observe(y)
        eps = np.empty((self.n, self.d))
        for k in range(-(-self.n // self.block)):
            bitgen = self._bitgen(k)
            bitgen.advance((self.t + 1) << 64)
            lo, hi = k * self.block, min((k + 1) * self.block, self.n)
            eps[lo:hi] = np.random.Generator(bitgen).standard_normal((hi - lo, self.d))
        z = y + self.sigma[:, None] * eps
        if self.t >= 1:
            phi = self._phi()
            e = z - (self.w * phi).sum(axis=2)
            self.w += self.mu * e[:, :, None] * phi / (phi**2).sum(axis=2)[:, :, None]
        self.lags = np.concatenate([z[:, :, None], self.lags[:, :, :-1]], axis=2)
        self.out = (self.w * self._phi()).sum(axis=2)
        self.t += 1

    @rule()
    def reset(self):
        for fc in self.fcs.values():
            fc.reset()
        self._reset_shadow()

    @rule(via=st.sampled_from(["state", "pickle", "copy"]))
    def reload(self, via):
        """Each object replaced by a new one (two threads) holding its state: the draws continue where they were."""
        for backend, fc in list(self.fcs.items()):
            if via == "state":
                new = ClientForecasters(self.n, self.d, backend=backend, threads=2, parallel_threshold=1, **self.kw)
                new.load_state_dict(fc.state_dict())
            else:
                new = pickle.loads(pickle.dumps(fc)) if via == "pickle" else copy.deepcopy(fc)
            self.fcs[backend] = new

    @rule(case=st.integers(0, 4))
    def invalid_call(self, case):
        d, n, p = self.d, self.n, self.p
        calls = [
            lambda f: f.observe(np.full(d, np.nan)),
            lambda f: f.observe(np.full(d, 1e31)),
            lambda f: f.observe(np.zeros(d + 1)),
            lambda f: f.load_state_dict({"agents": {**f.state_dict()["agents"], "weights": np.full((n, d, 2 * p + 1), 1e300)},
                                         "shared": f.state_dict()["shared"]}),
            lambda f: f.load_state_dict({"agents": f.state_dict()["agents"], "shared": {"t": np.array(-1), "y": np.zeros(d)}}),
        ]
        for fc in self.fcs.values():
            before = fc.state_dict()
            try:
                calls[case](fc)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"invalid call {case} was accepted")
            after = fc.state_dict()
            for part in ("agents", "shared"):
                for key, value in before[part].items():
                    np.testing.assert_array_equal(after[part][key], value, err_msg=key)

    @invariant()
    def matches_the_docstring(self):
        for fc in self.fcs.values():
            assert fc.t == self.t
            agents = fc.state_dict()["agents"]
            for key, want in (("weights", self.w), ("lags", self.lags), ("signals", self.out)):
                np.testing.assert_allclose(agents[key], want, rtol=1e-9, atol=1e-12, err_msg=key)


class PipelineMachine(RuleBasedStateMachine):
    """Pipeline: round by round (numba, one thread) = run (numba, two threads) bitwise, = the NumPy reference to 1e-9."""

    @initialize(n=st.integers(1, 6), d=st.integers(1, 2), rule_=st.sampled_from(["eg", "hedge"]),
                alpha=st.sampled_from([0.0, 0.01]), seed=st.integers(0, 2**16))
    def build(self, n, d, rule_, alpha, seed):
        self.rng, self.d = np.random.default_rng(seed), d
        kw = dict(rule=rule_, alpha=alpha, seed=seed)
        self.pipes = {"round": Pipeline(n, d, threads=1, **kw), "run": Pipeline(n, d, threads=2, parallel_threshold=1, **kw),
                      "numpy": Pipeline(n, d, backend="numpy", **kw)}

    @staticmethod
    def _state(pipe) -> dict:
        names = ("_x", "_s", "_J", "_sq_err", "_sq_sig", "_weights", "_lag_buf", "_yhat", "_field")
        out = {name: getattr(pipe, name).copy() for name in names}  # (the log-weights or the weights are a scratch)
        stats = pipe._stats[:pipe._kern.S_TOP].copy()  # (the log-sum-exp pieces after it are a scratch too)
        out.update(p=pipe.weights, stats=stats, t=pipe.t, n_recorded=pipe.n_recorded, discount=pipe._discount)
        return out

    @rule(T=st.integers(0, 4), record=st.booleans())
    def run(self, T, record):
        ys = self.rng.normal(size=(T, self.d))
        got = np.array([self.pipes["round"].round(y, record=record).copy() for y in ys]).reshape(T, self.d)
        np.testing.assert_array_equal(self.pipes["run"].run(ys, record=record), got)
        self.pipes["numpy"].run(ys, record=record)

    @rule()
    def reset(self):
        for pipe in self.pipes.values():
            pipe.reset()

    @rule(via=st.sampled_from(["pickle", "copy"]))
    def reload(self, via):
        for name, pipe in list(self.pipes.items()):
            self.pipes[name] = pickle.loads(pickle.dumps(pipe)) if via == "pickle" else copy.deepcopy(pipe)

    @rule(case=st.integers(0, 4))
    def invalid_call(self, case):
        d = self.d
        calls = [
            lambda p: p.round(np.full(d, np.nan)),
            lambda p: p.round(np.full(d, 1e31)),
            lambda p: p.round(np.zeros(d), record="no"),
            lambda p: p.run(np.concatenate([np.zeros((2, d)), np.full((1, d), np.inf)])),
            lambda p: p.run(np.zeros((3, d)), out=np.zeros((2, d))),
        ]
        for pipe in self.pipes.values():
            before = self._state(pipe)
            try:
                calls[case](pipe)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"invalid call {case} was accepted")
            _assert_same(before, self._state(pipe), f"invalid call {case}")

    @invariant()
    def agree(self):
        ref = self._state(self.pipes["round"])
        _assert_same(ref, self._state(self.pipes["run"]), "round vs run")
        _assert_same(ref, self._state(self.pipes["numpy"]), "numba vs numpy", rtol=1e-9)


class TrustMachine(RuleBasedStateMachine):
    """TrustPopulation (numba and numpy) and a deep copy, through steps, targets, re-classings and refused calls."""

    @initialize(n=st.integers(2, 8), k=st.integers(1, 3), reclass=st.integers(1, 3), rule_=st.sampled_from(["error", "minimax"]),
                seed=st.integers(0, 2**16))
    def build(self, n, k, reclass, rule_, seed):
        self.rng, self.n = np.random.default_rng(seed), n
        kw = dict(n_classes=min(k, n), reclass=reclass, rule=rule_, powers=(1.0, 1.5, 3.0))
        self.tps = {b: TrustPopulation(n, 1, backend=b, **kw) for b in ("numba", "numpy")}
        self.twin = None

    def _all(self):
        yield from self.tps.values()
        if self.twin is not None:
            yield self.twin

    @staticmethod
    def _state(tp) -> dict:
        out = {"t": tp.t, "n_reclassed": tp.n_reclassed, "leader": tp.leader, "errors": tp.trust.errors.copy(),
               "class_costs": tp.class_costs.copy(), "costs": np.array(tp.costs), "games": [g.to_dict() for g in tp.games]}
        for i, pop in enumerate(tp.populations):
            out[f"states{i}"], out[f"labels{i}"] = np.array(pop.states), np.array(pop.labels)
        return out

    @rule(invalid=st.booleans())
    def step(self, invalid):
        s = self.rng.normal(size=(self.n, 1)) * self.rng.exponential(size=(self.n, 1))
        if invalid:
            s[self.rng.integers(self.n)] = np.nan
        for tp in self._all():
            tp.step(s)

    @rule(y=values)
    def observe(self, y):
        for tp in self._all():
            tp.observe(y)

    @rule(via=st.sampled_from(["pickle", "copy"]))
    def copy_twin(self, via):
        self.twin = pickle.loads(pickle.dumps(self.tps["numba"])) if via == "pickle" else copy.copy(self.tps["numba"])

    @rule(case=st.integers(0, 2))
    def invalid_call(self, case):
        calls = [lambda tp: tp.step(np.zeros((self.n + 1, 1))), lambda tp: tp.observe(np.nan), lambda tp: tp.observe(1e31)]
        for tp in self._all():
            before = self._state(tp)
            try:
                calls[case](tp)
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"invalid call {case} was accepted")
            _assert_same(before, self._state(tp), f"invalid call {case}")

    @invariant()
    def agree(self):
        ref = self._state(self.tps["numba"])
        _assert_same(ref, self._state(self.tps["numpy"]), "numba vs numpy", rtol=1e-9)
        if self.twin is not None:
            _assert_same(ref, self._state(self.twin), "copy")


TestPopulationMachine = PopulationMachine.TestCase
TestServerMachine = ServerMachine.TestCase
TestForecasterMachine = ForecasterMachine.TestCase
TestPipelineMachine = PipelineMachine.TestCase
TestTrustMachine = TrustMachine.TestCase
for _case in (TestPopulationMachine, TestServerMachine, TestForecasterMachine, TestPipelineMachine, TestTrustMachine):
    _case.settings = SETTINGS
del _case
