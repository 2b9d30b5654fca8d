"""The shard: agents ``[lo, hi)`` of a population, resident on one worker as a Dask actor.

The client drives it with lists of ``(op, args)``; each op is a method
``_<op>`` below. A step runs the same two kernel passes as one machine's
``fused_step`` (:mod:`memoa_fast.kernels`): ``signal_pass`` (answered with the
chunks' partial rows, which the client merges with the kernels' own
``merge_signals``), then ``move``, which travels with the next message.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .. import _backends
from .. import checkpoint as _ckpt
from .._state import check_source_layout
from .._validation import as_float_array, checked_installer, load_checked, quietly_validated, validates_quietly
from ..kernels import used_columns, work_shape
from ..population import check_labels, first_max, state_sums


class Kept:
    """What a "load" sends in place of a source-state slice: the clean copy that the "check_source" given ``token`` kept.

    The token names the check: a load installs the copy of its own check only. Another call's check in between (a
    second thread's load) replaces the shard's kept copy, and the load then refuses (:meth:`Shard._take_kept`) rather
    than install that other state's copy beside its own states and costs.
    """

    __slots__ = ("token",)

    def __init__(self, token: str):
        self.token = token

    def __reduce__(self):
        return Kept, (self.token,)


def shard_threads(threads):
    """Kernel threads of a shard: ``threads``, or the worker's thread count (at most the cores it may use)."""
    if threads is not None:
        return threads
    try:
        from distributed import get_worker

        worker = get_worker()
        return max(1, min(getattr(worker, "state", worker).nthreads, _backends.available_threads()))
    except (ImportError, ValueError):
        return 1


class Shard:
    """Agents ``[lo, hi)`` of a population of ``n_agents`` (see the module docstring).

    Holds states, costs, labels, the signal buffer, a work array, the
    server log-weights of each :class:`DaskServer` (by id) and, optionally,
    its own signal source.
    """

    #: Ops that change nothing a step, a gather or a save reads: when one of them fails, and it is the
    #: message's last op (every queued op before it completed), the shard is as consistent as before.
    READ_ONLY = frozenset(["rows", "worst", "gather", "info", "save_file", "stage", "discard", "check_source"])
    _OPS = frozenset(
        ["signal_pass", "move", "rows", "observe", "predict", "reweight", "share", "add_server", "drop_server", "load", "reset",
         "gather", "worst", "info", "save_file", "stage", "commit", "discard", "check_source"]
    )

    def __init__(self, index, lo, hi, n_agents, lay, threads, parallel_threshold, exact, factory, seed):
        self.index, self.lo, self.hi, self.n_agents, self.exact = index, lo, hi, n_agents, exact
        n, d = hi - lo, lay.dim
        self.lay = lay
        self.threads, self._threads_used = _backends.resolve_threads(shard_threads(threads), n, parallel_threshold, d)
        self.kern = _backends.load("numba")
        self.x = np.zeros((n, d))
        self.J = np.zeros(n)
        self.s = np.zeros((n, d))
        self.labels = np.empty(0, dtype=np.int64)
        self.work = np.zeros(work_shape(n, lay))
        self.mean_ready = False  # the work array's state columns hold the sums of the current states
        self.columns = {part: used_columns(lay, part) for part in ("step", "mixture", "lse")}
        self.log_p: dict[str, np.ndarray] = {}
        self.source = None if factory is None else factory(lo, hi, seed)
        self._staged = None  # a checkpoint's rows, checked, waiting for "commit"
        self._kept = None  # (token, clean copy) of a source state "check_source" kept, waiting for "load" (sent Kept(token))

    def run(self, ops):
        """Execute ``ops`` in order; returns the last op's result.

        An exception carries ``shard_ops_done``, how many ops had completed
        before it (the client tells from it whether the live state changed).
        """
        result = None
        for done, (name, args) in enumerate(ops):
            try:
                if name not in self._OPS:
                    raise ValueError(f"unknown shard op {name!r}")
                result = getattr(self, "_" + name)(*args)
            except Exception as exc:
                exc.shard_ops_done = done
                raise
        return result

    def _partials(self, work, part="step"):
        """The used columns of the chunks' partial rows (exact mode), or of their fold into one row."""
        cols = self.columns[part]
        if self.exact:
            return work[:, cols]
        out = np.empty((1, work.shape[1]))
        self.kern.fold_rows(work, self.lay, out[0])
        return out[:, cols]

    # ------------------------------------------------------------------ population
    def _signal_pass(self, signals):
        """Pass 1 on this step's signals; returns the partial rows (states sums included)."""
        n, d = self.x.shape
        if signals is None:
            if self.source is None:
                raise ValueError("this population has no worker-side signal source: pass signals to step()")
            signals = as_float_array(f"signals of shard {self.index} (agents [{self.lo}, {self.hi}))",
                                     self.source.next(), (n, d), allow_nonfinite=True)
        self.s[...] = signals
        self.kern.signal_pass(self.x, self.s, self.labels, self.work, self.lay, not self.mean_ready, self._threads_used)
        return self._partials(self.work)

    def _move(self, coef, field, discount):
        """Pass 2 with the client's merged mean field (offsets and ``m(t)``)."""
        # Arrays arrive as read-only buffers; writable copies keep one compiled signature.
        coef, field = np.array(coef, dtype=np.float64), np.array(field, dtype=np.float64)
        self.kern.move_pass(self.x, self.s, self.labels, self.J, self.work, self.lay, coef, field, discount,
                            np.empty(0), self._threads_used)
        self.mean_ready = True

    def _rows(self):
        """The partial rows left by the last move pass (sums of the moved states, worst cost)."""
        return self._partials(self.work)

    def _observe(self, y):
        if self.source is not None and hasattr(self.source, "observe"):
            self.source.observe(y)

    def _worst(self):
        """The shard's largest cost and its first agent, a NaN never larger (the kernels' rule); ``(-inf, -1)`` if none."""
        if not (self.J > -np.inf).any():
            return -math.inf, -1
        i = first_max(self.J)
        return float(self.J[i]), self.lo + i

    # ------------------------------------------------------------------ server
    def _add_server(self, sid):
        self.log_p[sid] = np.full(self.hi - self.lo, -math.log(self.n_agents))

    def _drop_server(self, sid):
        self.log_p.pop(sid, None)

    def _predict(self, sid, centre=None):
        """The shard's partial rows of ``sum_i p_i x_i``, or of ``sum_i p_i (x_i - centre)`` (eg's mixture error)."""
        out = np.empty(self.lay.dim)
        if centre is not None:
            centre = np.array(centre, dtype=np.float64)
        self.kern.mixture_predict(self.log_p[sid], self.x, self.work, self.lay, out, self._threads_used, centre)
        return self._partials(self.work, "mixture")

    def _reweight(self, sid, y, err, rule, eta):
        """Gradient step on the log-weights (``err``: eg's mixture error); returns the rows holding the log-sum-exp pieces."""
        y, err = np.array(y, dtype=np.float64), np.array(err, dtype=np.float64)
        self.kern.mixture_reweight(self.log_p[sid], self.x, y, err, rule, eta, self.work, self.lay, self._threads_used)
        if self.exact:
            return self.work[:, self.columns["lse"]]
        top, log_total = self.kern.merge_log_sum_exp(self.work, self.lay)
        return np.array([[top, math.exp(log_total)]])

    def _share(self, sid, top, log_total, alpha):
        self.kern.mixture_share(self.log_p[sid], top, log_total, alpha, self.n_agents, self._threads_used)

    # ------------------------------------------------------------------ bulk state
    def _load(self, states, costs, labels, log_p, source_state):
        """Replace what is given (all checked by the client); the mean field is re-summed at the next step.

        ``source_state``: this shard's slice, checked by "check_source" first, or :class:`Kept` for the clean copy
        that check kept (taken first: a load whose check's copy is gone writes nothing).

        Answers ``{"sum", "class_sums"}`` of the states it now holds (:func:`state_sums`), for the
        client's means after new labels.
        """
        kept = self._take_kept(source_state.token) if isinstance(source_state, Kept) else None
        if states is not None:
            self.x[...] = states
        if costs is not None:
            self.J[...] = costs
        if labels is not None:
            self.labels = check_labels(labels, self.hi - self.lo, self.lay.n_classes) if len(labels) else labels
        for sid, value in log_p.items():
            if value is None:
                self._add_server(sid)
            else:
                self.log_p[sid] = np.array(value, dtype=np.float64)
        if kept is not None:  # the clean copy of this load's check, not sent again
            load_checked(self.source, kept)
        elif source_state is not None:  # checked by _check_source first, whose warnings the client issued
            if validates_quietly(self.source):  # the clean copy, which loads without issuing them again (and unchecked, ours)
                load_checked(self.source, self.source._validated(source_state)[0])
            else:
                self.source.load_state_dict(source_state)
        if states is not None or labels is not None:
            self.mean_ready = False
        total, class_sums = state_sums(self.x, self.labels, self.lay.n_classes)
        return {"sum": total, "class_sums": class_sums}

    def _reset(self, states):
        """Round 0: states to ``states`` (zeros if None, written here: nothing of size N is sent), costs to 0."""
        if states is None:
            self.x[...] = 0.0
        else:
            self.x[...] = states
        self.J[...] = 0.0
        self.mean_ready = False

    def _gather(self, what, sid=None):
        if what == "states":
            return self.x
        if what == "costs":
            return self.J
        if what == "labels":
            return self.labels
        if what == "log_p":
            return self.log_p[sid]
        if what == "source":
            if self.source is None or not hasattr(self.source, "state_dict"):
                return None
            return self.source.state_dict()
        raise ValueError(f"cannot gather {what!r}")

    def _info(self):
        return {"pid": os.getpid(), "lo": self.lo, "hi": self.hi, "threads": self._threads_used}

    # ------------------------------------------------------------------ checkpoints written by the shards
    def _where(self):
        return f"shard {self.index} (agents [{self.lo}, {self.hi}))"

    def _save_file(self, folder, token, globals_, game, sid):
        """Check this shard's rows, then write them to its own file; returns what the manifest needs.

        A state that could not be restored is refused before anything is
        written, and answered (not raised: the population stays usable) as
        ``{"error": message}``; so is a failed write (``"os_error"``).
        """
        n, d = self.x.shape
        arrays = {"states": self.x, "costs": self.J}
        if self.lay.n_classes > 1:
            arrays["labels"] = self.labels
        answer = {"lse": None, "source_shared": None, "source_agents": None}
        try:
            _ckpt.check_rows_state(arrays, globals_, game, d)
            if sid is not None:
                answer["lse"] = _ckpt.check_log_weight_rows(self.log_p[sid])
                arrays["server_log_weights"] = self.log_p[sid]
            if self.source is not None and hasattr(self.source, "state_dict"):
                state = check_source_layout(self.source.state_dict(), n_agents=n)
                for name, value in state["agents"].items():
                    arrays[_ckpt._SOURCE_AGENTS + name] = value
                answer["source_agents"] = {name: (v.dtype.str, v.shape[1:]) for name, v in state["agents"].items()}
                answer["source_shared"] = state["shared"]
        except ValueError as exc:
            return {"error": f"{self._where()}: {exc}"}
        try:
            answer.update(_ckpt.write_shard_file(folder, token, self.index, self.lo, self.hi, self.n_agents, arrays))
        except OSError as exc:
            return {"os_error": f"{self._where()} could not write its file in {folder}: {exc}"}
        return answer

    def _stage(self, manifest, sid):
        """Read this shard's rows of a sharded checkpoint and check them; keep them for :meth:`_commit`.

        Nothing live changes. Answers ``{"lse": pieces or None, "sum", "class_sums", "sizes"}`` (the
        sums of the rows' states, and for a K-class game how many of its rows are in each class:
        the client's class sizes, so that the N labels never travel to it), or ``{"error": message}``
        when a file or a row does not pass.
        """
        self._staged = None
        n, d = self.x.shape
        try:
            rows = _ckpt.read_shard_rows(manifest, self.lo, self.hi)
            clean = _ckpt.check_rows_state(rows, manifest.population, manifest.game, d)
            staged = {"states": clean["states"], "costs": clean["costs"],
                      "labels": clean["labels"] if "labels" in rows else None, "log_p": None, "source": None}
            # The sums of the rows' states: the client's m(t) and m_l(t) after the restore come from the states
            # themselves, never from the manifest's copy of the means.
            labels = staged["labels"] if staged["labels"] is not None else self.labels
            total, class_sums = state_sums(clean["states"], labels, self.lay.n_classes)
            sizes = np.bincount(labels, minlength=self.lay.n_classes) if self.lay.n_classes > 1 else None
            answer = {"lse": None, "sum": total, "class_sums": class_sums, "sizes": sizes}
            if sid is not None:
                answer["lse"] = _ckpt.check_log_weight_rows(rows["server_log_weights"])
                staged["log_p"] = rows["server_log_weights"]
            if manifest.source_agents is not None and self.source is not None:
                agents = {name: rows[_ckpt._SOURCE_AGENTS + name] for name in manifest.source_agents}
                state = check_source_layout({"agents": agents, "shared": manifest.source_shared}, n_agents=n)
                staged["source"], answer["warnings"] = self._checked_source_state(state)
        except (ValueError, KeyError, TypeError) as exc:  # CheckpointError is a ValueError
            return {"error": f"{self._where()}: {exc}"}
        self._staged = staged
        return answer

    def _checked_source_state(self, state):
        """``state`` as this shard's source will load it, and the warnings to issue about it; changes nothing.

        ``(clean, [(category, message), ...])``. A source of this package reports its validator's warnings as
        data (its ``_validated``: :func:`~memoa_fast._validation.quietly_validated`), for the client to issue
        (:func:`~memoa_fast._validation.issue_notices`). Any other validator (a user's source, a subclass that
        overrides ``validate_state_dict``) is called plainly: what it warns is issued here, on the worker
        (see :mod:`memoa_fast.distributed.signals`). Never captured: ``warnings.catch_warnings`` swaps the warning
        filters and ``showwarning`` of the whole process, and is not thread-safe; a worker runs tasks in threads,
        in the user's process with ``processes=False``, where another thread's warnings were taken for the
        source's and interleaved captures left the user's filters replaced.

        Raises ``TypeError`` when the source cannot load a state at all, or what its validator raises.
        """
        if not hasattr(self.source, "load_state_dict"):
            raise TypeError(f"its signal source {type(self.source).__name__} has no load_state_dict(): it cannot resume "
                            "from a saved state")
        if not hasattr(self.source, "validate_state_dict"):
            return state, []
        return quietly_validated(self.source, state)

    def _take_kept(self, token):
        """The clean copy the check ``token`` kept (:meth:`_check_source`), taken; ``RuntimeError`` if another call's replaced it."""
        kept, self._kept = self._kept, None
        if kept is None or kept[0] != token:
            raise RuntimeError(
                f"{self._where()} no longer holds the source state this load's check kept: another call checked its own "
                "since, or discarded it (a DaskPopulation serves one call at a time, not calls from two threads at "
                "once); this shard loaded nothing")
        return kept[1]

    def _check_source(self, state, keep=None):
        """Would this shard's source take ``state`` (its slice)? Changes nothing live.

        Answers ``{"error": message}``, or ``{"warnings": [(category, message), ...], "kept": bool}`` (its source's
        warnings, for the client to issue: :meth:`_checked_source_state`). With ``keep`` (a token naming this check), the
        clean copy of a source that installs one unchecked (:func:`~memoa_fast._validation.checked_installer`) is kept
        for the load of the same call, which the client then sends ``Kept(keep)`` in place of the slice
        (``"kept": True``): the O(N) slice is checked once and travels once. Any earlier kept copy goes.
        """
        self._kept = None
        try:
            clean, notices = self._checked_source_state(check_source_layout(state, n_agents=self.hi - self.lo))
        except (ValueError, KeyError, TypeError) as exc:
            return {"error": f"{self._where()}: {exc}"}
        if keep is not None and checked_installer(self.source) is not None:
            self._kept = (keep, clean)
        return {"warnings": notices, "kept": self._kept is not None}

    def _commit(self, sid):
        """Install the staged checkpoint rows (the client checked every shard's first)."""
        staged, self._staged = self._staged, None
        if staged is None:
            raise RuntimeError(f"{self._where()} has no staged checkpoint to commit")
        self.x[...] = staged["states"]
        self.J[...] = staged["costs"]
        if staged["labels"] is not None:
            self.labels = staged["labels"]
        if sid is not None:
            self.log_p[sid] = staged["log_p"]
        if staged["source"] is not None:  # the clean copy _stage's check returned
            load_checked(self.source, staged["source"])
        self.mean_ready = False

    def _discard(self):
        self._staged = self._kept = None
