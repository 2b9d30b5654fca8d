"""The Dask engine's server: the mixture's log-weights live on the shards, beside the states."""
from __future__ import annotations

import math
import uuid
import weakref

import numpy as np

from .._state import check_server_state, server_state
from .._validation import as_float_array, check_choice, check_out, check_real, readonly_view
from ..server import RULE_CODES, RULES, check_update_count
from .population import DaskPopulation, ShardedStates, _one_caller


class DaskServer:
    """:class:`~memoa_fast.Server` for a :class:`DaskPopulation`: log-weights live on the shards.

    Parameters
    ----------
    population : DaskPopulation
        Whose resident states this server mixes.
    rule, eta, alpha
        As for :class:`~memoa_fast.Server`.

    Notes
    -----
    :meth:`predict` gathers the shards' partial rows of ``sum_i p_i x_i``
    (d numbers each) and sums them in order; :meth:`update` runs the
    kernels' ``mixture_reweight`` on every shard, gathers the log-sum-exp
    pieces ``(top_k, sum_{i in k} exp(v_i - top_k))``, merges them with the
    kernels' ``merge_log_sum_exp`` into ``(top, log_total)`` and queues the
    normalisation and fixed share (``mixture_share`` over the whole
    population's N) for the next message. Rule ``eg`` needs the mixture's
    error ``yhat - y`` of the states being scored, gathered as the shards'
    partial rows of ``sum_i p_i (x_i - y)`` (a sum of differences, as
    :class:`~memoa_fast.Server` computes it): one more round trip.

    One caller at a time: a server sends its messages through its
    population and shares its guard (see :class:`DaskPopulation`): a call
    while another thread is inside a call of the server, of the population
    or of another of its servers raises ``RuntimeError`` at once and changes
    nothing.
    """

    def __init__(self, population: DaskPopulation, *, rule: str = "hedge", eta: float = 1.0, alpha: float = 0.0):
        if not isinstance(population, DaskPopulation):
            raise TypeError(f"population must be a DaskPopulation, got {type(population).__name__}")
        self.population = population
        self.n_agents, self.dim = population.n_agents, population.dim
        self.rule = check_choice("rule", rule, RULES)
        self.eta = check_real("eta", eta, low=0.0)
        self.alpha = check_real("alpha", alpha, low=0.0, high=1.0)
        self.sid = uuid.uuid4().hex
        self.n_updates = 0
        self._interrupted: str | None = None  # set from a mutating call's first write to its last (see _check_usable)
        self._lay = population._lay
        self._yhat = np.zeros(self.dim)
        self._register()
        # When this object goes, its weights leave the workers with the next message. Not under the guard: the
        # collector runs the finalizer in any thread, also inside a call (_call keeps an op queued meanwhile).
        weakref.finalize(self, population._queue, ("drop_server", (self.sid,)))

    @_one_caller("DaskServer()", of_population=True)
    def _register(self) -> None:
        """Give this server weights on the population's shards (with the next message)."""
        self.population._servers[self.sid] = self
        self.population._queue(("add_server", (self.sid,)))

    @_one_caller("DaskServer.reset", of_population=True)
    def reset(self) -> None:
        """Uniform weights ``p = 1/N``; the update counter back to 0."""
        self._reset()

    def _reset(self) -> None:
        """:meth:`reset`, for a caller that holds the population's guard (its restore)."""
        self._interrupted = "a reset"
        self.population._queue(("add_server", (self.sid,)))
        self.n_updates = 0
        self._interrupted = None

    def _check_usable(self) -> None:
        """``RuntimeError`` while a mutating call of this server was cut short by an interrupt (between its first and last write)."""
        if self._interrupted is not None:
            raise RuntimeError(
                f"this DaskServer was interrupted in the middle of {self._interrupted} (KeyboardInterrupt, or another "
                "exception, between its first and last write): its weights and update count may be a round apart, so it "
                "refuses every call until restored: load_state_dict(...) of a state_dict taken before, reset(), or its "
                "population's restore(checkpoint, server=...)"
            )

    def _states(self, states) -> None:
        pop = self.population
        if states is None or states is pop or (isinstance(states, ShardedStates) and states.population is pop):
            return
        raise TypeError(
            "a DaskServer mixes the states resident on its population's workers: pass population.step()'s result, "
            f"population.resident_states or None, not {type(states).__name__}"
        )

    @property
    @_one_caller("DaskServer.log_weights", of_population=True)
    def log_weights(self) -> np.ndarray:
        """``log p``, gathered from the workers (a read-only copy)."""
        return self._log_weights()

    def _log_weights(self) -> np.ndarray:
        """:attr:`log_weights`, for a caller that holds the population's guard."""
        self._check_usable()
        return readonly_view(self.population._gather_agents("log_p", (self.n_agents,), sid=self.sid))

    @property
    @_one_caller("DaskServer.weights", of_population=True)
    def weights(self) -> np.ndarray:
        """``p = exp(log p)`` (a new array)."""
        return np.exp(self._log_weights())

    @_one_caller("DaskServer.predict", of_population=True)
    def predict(self, states=None, out: np.ndarray | None = None) -> np.ndarray:
        """The mixture ``yhat = sum_i p_i x_i`` of the population's current states, shape (d,) (written into ``out`` when given)."""
        if out is not None:
            check_out(out, (self.dim,))  # before any work: a bad out changes nothing
        self._states(states)
        return self._predict(out)

    def _predict(self, out=None) -> np.ndarray:
        """:meth:`predict` of the resident states, for a caller that holds the population's guard (``out`` checked)."""
        self._check_usable()
        self._yhat[...] = self._gather_mixture(None)
        if out is None:
            return self._yhat.copy()
        out[...] = self._yhat
        return out

    def _gather_mixture(self, centre) -> np.ndarray:
        """``sum_i p_i (x_i - centre)`` (``centre`` None: ``sum_i p_i x_i``) of the resident states, from the shards' rows."""
        pop = self.population
        rows = pop._unpack(pop._call(("predict", (self.sid,) if centre is None else (self.sid, centre.copy()))), "mixture")
        folded = np.empty(rows.shape[1])
        pop._kernels.fold_rows(rows, self._lay, folded)  # the chunk sums, in chunk order
        return folded[self._lay.mixture:self._lay.mixture + self.dim]

    @_one_caller("DaskServer.update", of_population=True)
    def update(self, states, target) -> None:
        """Reweight the clients once the target ``y`` of the current states is known (shape (d,)).

        As :meth:`Server.update <memoa_fast.Server.update>`: after update ``2**63 - 1`` (a loaded state's count),
        ``ValueError`` and nothing changes.
        """
        self._states(states)
        y = as_float_array("target", target, (self.dim,))
        check_update_count(self.n_updates)
        self._check_usable()
        pop = self.population
        # eg's gradient needs the mixture's error yhat - y of these states, as sum_i p_i (x_i - y); hedge ignores it
        err = self._gather_mixture(y) if self.rule == "eg" else np.zeros(self.dim)
        pop._check_usable()  # before the mark: an update its population refuses changes nothing
        self._interrupted = "an update"
        parts = pop._call(("reweight", (self.sid, y.copy(), err, RULE_CODES[self.rule], self.eta)))
        top, log_total = pop._kernels.merge_log_sum_exp(pop._unpack(parts, "lse"), self._lay)
        if top == -math.inf:  # cannot happen from normalised weights; keep them rather than divide by 0
            top, log_total = 0.0, 0.0
        pop._queue(("share", (self.sid, top, log_total, self.alpha)))
        self.n_updates += 1
        self._interrupted = None  # the last write: an interrupt before it leaves the server refusing

    @_one_caller("DaskServer.state_dict", of_population=True)
    def state_dict(self) -> dict:
        """Everything needed to resume this server exactly (:meth:`Server.state_dict`'s keys, gathered)."""
        return server_state(self._log_weights(), self.n_updates, self.rule, self.eta, self.alpha)

    @_one_caller("DaskServer.load_state_dict", of_population=True)
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; checks everything before changing anything."""
        clean = check_server_state(state, n_agents=self.n_agents, rule=self.rule, eta=self.eta, alpha=self.alpha)
        pop = self.population
        args = [(None, None, None, {self.sid: clean["log_weights"][lo:hi]}, None) for lo, hi in pop.bounds]
        pop._check_usable()  # before the mark: a server whose population refuses keeps its mark
        self._interrupted = "a load_state_dict"
        pop._call(("load", None), per_shard_args=args)
        self.n_updates = clean["n_updates"]
        self._interrupted = None

    def __reduce__(self):
        # As DaskPopulation's: its log-weights live on the population's shards, which a copy would share.
        raise TypeError(f"a {type(self).__name__} cannot be pickled or copied: its log-weights live on the workers' shards, "
                        "which a copy would share; save it with mf.save_checkpoint(path, population, server) and restore "
                        "that into a new DaskServer")

    def __repr__(self) -> str:
        return f"DaskServer(n_agents={self.n_agents}, dim={self.dim}, rule={self.rule!r}, eta={self.eta!r}, alpha={self.alpha!r})"
