"""One validator per saved state: what ``load_state_dict``, the checkpoint reader and Dask all call.

Each validator is a pure function: it reads a state dict, checks every key
against the object that will take it, and returns a clean copy (C-contiguous
float64 arrays, int64 labels, Python ints and floats) that the caller can
install without another check. It changes nothing, not even its input, and
either returns everything or raises :class:`ValueError` naming the key, the
value and what is accepted. A loader therefore checks first and writes
second, and an object is never left half-changed.

- :func:`check_population_state`: a population's state (the states, costs,
  labels and mean fields of the last step, the step counter and discount);
- :func:`check_server_state`: a server's log-weights and update counter;
- :func:`check_source_layout`: the generic ``{"agents": ..., "shared": ...}``
  form of a signal source's state, and :func:`check_source_state`, the
  same against a declared list of arrays and the source's own settings
  (what a source's own ``validate_state_dict`` calls); :func:`source_settings`,
  the form in which a source's ``state_dict`` records those settings.

Only the core is imported here (no engine, no population or server class),
so that every engine can import this module.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import numpy as np

from ._validation import MAX_COUNT, as_float64, scalar_of
from .kernels import SIGNAL_LIMIT

__all__ = [
    "INITIAL_LIMIT", "RULES", "POPULATION_KEYS", "SERVER_KEYS", "STATE_LIMIT", "check_population_state", "check_server_state",
    "check_source_layout", "check_source_state", "n_classes_of", "source_settings",
]

#: Server rules (the names; the kernels' codes are ``RULE_EG``, ``RULE_HEDGE``).
RULES = ("eg", "hedge")

#: Keys of a population state. ``labels`` and ``class_mean_signal`` may be
#: absent for a single-class game; ``n_finite_signals`` is the older name of
#: ``n_valid_signals`` (either is read, one is required); ``source`` (a signal
#: source's state, see :func:`check_source_layout`) is passed over here.
POPULATION_KEYS = (
    "states", "costs", "labels", "mean_state", "mean_signal", "class_mean_signal", "class_signalled", "t", "discount",
    "n_valid_signals", "n_finite_signals", "game", "source",
)
#: Keys of a server state.
SERVER_KEYS = ("log_weights", "n_updates", "rule", "eta", "alpha")

_LSE_TOL = 1e-9
_DISCOUNT_TOL = 1e-9

#: Largest ``|x|`` of a saved state's states and mean fields: ``SIGNAL_LIMIT`` (``1e50``) with a margin of
#: ``2**-20`` relative for rounding. Every policy moves a state to a combination of states and valid signals
#: with nonnegative weights summing to 1 (:attr:`memoa_fast.Game.table`), so in exact arithmetic the states
#: never leave ``max(max |x(0)|, SIGNAL_LIMIT)``; in floating point each step may round a few ulps beyond it
#: (three states and signals at ``-1e50`` gave ``-1.0000000000000003e50`` in one step of
#: ``Game(q=1, kappa=30, r=0.1, gamma=0.9)``), and a mean of valid signals likewise. The states and means a
#: population reaches must save and load: the margin is about ``4e9`` ulps, and costs built from states within
#: it are as finite as from states within ``SIGNAL_LIMIT``.
STATE_LIMIT = SIGNAL_LIMIT * (1.0 + 2.0**-20)

#: Largest ``|x|`` of initial states (``Population(initial_states=...)``, :meth:`Population.reset`, the Dask engine's):
#: ``SIGNAL_LIMIT`` with half the margin of a saved state's (:data:`STATE_LIMIT`, ``2**-20``).
#: Every policy moves a state to a weighted mean of states and valid signals, but each step may round a few ulps
#: beyond the largest: states that start at ``STATE_LIMIT`` itself stepped beyond it and could no longer be saved.
#: From within this limit a population stays within ``STATE_LIMIT`` (a gap of 2**31 ulps), and the states it reaches
#: from within ``SIGNAL_LIMIT`` (a few ulps beyond it) are accepted here as initial states.
INITIAL_LIMIT = SIGNAL_LIMIT * (1.0 + 2.0**-21)


# =========================================================================== small checks
def _fail(key, message):
    raise ValueError(f"state[{key!r}] {message}")


def _mapping(state, what):
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(state).__name__}")


def _keys(state, allowed, required, what):
    unknown = sorted(map(repr, set(state) - set(allowed)))
    if unknown:
        raise ValueError(f"{what} has unknown key(s) {', '.join(unknown)}; accepted keys: {', '.join(allowed)}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"{what} is missing key(s) {', '.join(map(repr, missing))}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _real_array(key, value, shape, *, limit=None, nonnegative=False, finite=True) -> np.ndarray:
    """A float64 C-contiguous *copy* of ``value`` after checking dtype class, shape, finiteness and range."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        if isinstance(value, (str, bytes, Mapping)) or value is None:
            _fail(key, f"must be an array of real numbers of shape {shape}, got {type(value).__name__} {_short(value)}")
        try:
            value = np.asarray(value)
        except (TypeError, ValueError) as exc:
            _fail(key, f"must be an array of real numbers of shape {shape}, got {type(value).__name__}: {exc}")
        dtype = value.dtype
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iuf":
        _fail(key, f"must hold real numbers (an integer or floating dtype), got dtype {dtype}")
    arr = np.asarray(value)
    if arr.shape != shape:
        _fail(key, f"must have shape {shape}, got shape {arr.shape}")
    out = as_float64(arr, copy=True)
    if out.size == 0:
        return out
    # Fast path, one pass: the largest magnitude is NaN if any entry is.
    top = float(np.max(np.abs(out)))
    if finite and math.isfinite(top) and (limit is None or top <= limit) and (not nonnegative or float(out.min()) >= 0):
        return out
    if finite:
        bad = ~np.isfinite(out)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            _fail(key, f"must be finite; entry {at} is {out[at].item()!r}")
    if limit is not None:
        over = np.abs(out) > limit
        if over.any():
            at = tuple(int(i) for i in np.argwhere(over)[0])
            _fail(key, f"must be at most {SIGNAL_LIMIT:g} in magnitude (SIGNAL_LIMIT, with a margin of 2**-20 for rounding: "
                       f"{limit!r}); entry {at} is {out[at].item()!r}")
    if nonnegative:
        neg = out < 0
        if neg.any():
            at = tuple(int(i) for i in np.argwhere(neg)[0])
            _fail(key, f"must be >= 0; entry {at} is {out[at].item()!r}")
    return out


def _int(key, value, *, low=0, high=None) -> int:
    """A Python int: Python or NumPy integers and 0-d integer arrays; never bool, float or str."""
    value = scalar_of(value, "iu")
    top = "inf" if high is None else "2**63 - 1" if high == MAX_COUNT else str(high)
    accepted = f"an integer in [{low}, {top}]"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        _fail(key, f"must be {accepted}, got {_short(value)} of type {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        _fail(key, f"must be {accepted}, got {value}")
    return value


def _real(key, value) -> float:
    """A finite Python float: Python or NumPy reals and 0-d real arrays; never bool or str."""
    value = scalar_of(value, "iuf")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        _fail(key, f"must be a finite real number, got {_short(value)} of type {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        _fail(key, f"must be finite, got {value!r}")
    return value


def _labels(value, n, K) -> np.ndarray:
    """An int64 copy of class labels: shape (N,) with values in [0, K), or (0,) ("all class 0") when K = 1."""
    dtype = getattr(value, "dtype", None)
    if dtype is None and not isinstance(value, (str, bytes, Mapping)) and value is not None:
        try:
            value = np.asarray(value)
        except (TypeError, ValueError):
            pass
        dtype = getattr(value, "dtype", None)
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iu":
        _fail("labels", f"must be an integer array of shape ({n},) with values in [0, {K}), got {_short(value)} (dtype {dtype})")
    arr = np.asarray(value)
    if arr.shape != (n,) and not (K == 1 and arr.shape == (0,)):
        accepted = f"({n},)" + (" or (0,) (every agent in class 0)" if K == 1 else "")
        _fail("labels", f"must have shape {accepted}, got shape {arr.shape}")
    bad = (arr < 0) | (arr >= K)
    if bad.any():
        at = int(np.argmax(bad))
        _fail("labels", f"must be class numbers in [0, {K}); labels[{at}] is {arr[at].item()!r}")
    return np.array(arr, dtype=np.int64, order="C", copy=True)


def n_classes_of(game) -> int:
    """K, the number of classes of ``game`` (``game.n_classes``, 1 for a game without the attribute)."""
    return int(game.n_classes) if hasattr(game, "n_classes") else 1


# =========================================================================== population
def check_population_state(state, *, game, n_agents: int, dim: int) -> dict:
    """Check a population state against a population of ``game`` with ``n_agents`` agents in dimension ``dim``.

    Parameters
    ----------
    state : dict
        As written by a population's ``state_dict()`` (any engine) or read
        from a checkpoint.
    game : Game
        The target's game: ``state["game"]`` must equal ``game.to_dict()``;
        K = ``game.n_classes`` (1 if the game has no such attribute).
    n_agents, dim : int
        The target's N and d.

    Returns
    -------
    dict
        A clean copy with the keys ``states`` (N, d), ``costs`` (N,),
        ``labels`` (int64; shape (N,), or (0,) meaning "every agent in
        class 0", the kernels' convention, when K = 1 and the state had none
        or had (0,)), ``mean_state`` (d,),
        ``mean_signal`` (d,), ``class_mean_signal`` (K, d), ``class_signalled``
        (bool (K,): which classes have had a valid signal; None when the state
        has none, older states: derived from ``t``), ``t`` (int),
        ``discount`` (float), ``n_valid_signals`` (int) and ``game`` (dict).
        Arrays are float64, C-contiguous and owned by the copy.

    Raises
    ------
    ValueError
        Naming the key, the value and what is accepted, when any of these
        fails:

        - the keys: only :data:`POPULATION_KEYS` (``source`` is passed over);
          ``labels`` and ``class_mean_signal`` may be absent only when K = 1;
          one of ``n_valid_signals``/``n_finite_signals`` (equal if both);
        - every array: a real integer or floating dtype (no bool, complex,
          string, datetime or object), the exact shape, finite;
        - ``states``, ``mean_state``, ``mean_signal``, ``class_mean_signal``:
          ``|x| <= STATE_LIMIT`` (``SIGNAL_LIMIT`` with a margin of ``2**-20``
          for rounding: see :data:`STATE_LIMIT`); ``costs >= 0``;
          ``mean_state`` is not compared with the states: it is derived data, and
          every engine derives ``m(t)`` and ``m_l(t)`` from the states it
          installs (one machine from its states, a Dask population from its
          shards' sums), on every path (``load_state_dict``, a single-file or
          a sharded restore), so a saved copy out of step with the states has
          no effect (comparing it would cost a pass over the states, or on
          Dask a round of shard sums, to refuse what is recomputed anyway);
        - ``labels``: an integer dtype, shape (N,) (or (0,) when K = 1), values in [0, K);
        - ``class_signalled`` (optional): K integer or bool flags, each 0 or 1;
        - ``t``: an integer in [0, 2**63) (``1.7``, ``True``, ``"3"`` and
          ``3.0`` are refused; NumPy integers are accepted);
        - ``discount``: equal to ``gamma**t`` within
          ``min(1e-9 + t 2**-52, 1e-6)`` relative (the engines keep it as a
          running product, whose rounding grows with t), or within ``1e-300``
          absolute (where ``gamma**t`` underflows); in [0, 1];
        - ``n_valid_signals``: an integer in [0, N];
        - ``game``: equal to ``game.to_dict()``.
    """
    _mapping(state, "a population state")
    n, d = int(n_agents), int(dim)
    K = n_classes_of(game)
    required = ["states", "costs", "mean_state", "mean_signal", "t", "discount", "game"]
    if K > 1:
        required += ["labels", "class_mean_signal"]
    _keys(state, POPULATION_KEYS, required, "a population state")

    expected_game = game.to_dict()
    saved_game = state["game"]
    if not isinstance(saved_game, Mapping) or dict(saved_game) != expected_game:
        _fail("game", f"is {_short(saved_game)}, but this population plays {expected_game!r}")

    states = _real_array("states", state["states"], (n, d), limit=STATE_LIMIT)
    costs = _real_array("costs", state["costs"], (n,), nonnegative=True)
    if "labels" in state:
        labels = _labels(state["labels"], n, K)
    else:
        labels = np.empty(0, dtype=np.int64)
    mean_state = _real_array("mean_state", state["mean_state"], (d,), limit=STATE_LIMIT)
    mean_signal = _real_array("mean_signal", state["mean_signal"], (d,), limit=STATE_LIMIT)
    if "class_mean_signal" in state:
        class_mean_signal = _real_array("class_mean_signal", state["class_mean_signal"], (K, d), limit=STATE_LIMIT)
    else:
        class_mean_signal = mean_signal.reshape(1, d).copy()
    class_signalled = None  # absent (states saved before it, K = 1): every class has signalled iff t > 0
    if state.get("class_signalled") is not None:  # (None: a checked state's "absent")
        flags = np.asarray(state["class_signalled"])
        if flags.shape != (K,) or flags.dtype.kind not in "biu" or not np.isin(flags, (0, 1)).all():
            _fail("class_signalled", f"must be {K} flags (0 or 1, one per class: whether it has had a valid signal), "
                                     f"got {_short(state['class_signalled'])}")
        class_signalled = flags.astype(bool)

    t = _int("t", state["t"], low=0, high=MAX_COUNT)
    discount = _real("discount", state["discount"])
    gamma = float(game.gamma)
    expected = gamma**t
    rel = min(_DISCOUNT_TOL + t * 2.0**-52, 1e-6)
    if not (0.0 <= discount <= 1.0) or not math.isclose(discount, expected, rel_tol=rel, abs_tol=1e-300):
        _fail("discount", f"is {discount!r}, but it must be gamma**t = {gamma!r}**{t} = {expected!r} (relative tolerance {rel:.3g})")

    if "n_valid_signals" in state:
        n_valid = _int("n_valid_signals", state["n_valid_signals"], low=0, high=n)
        if "n_finite_signals" in state:
            old = _int("n_finite_signals", state["n_finite_signals"], low=0, high=n)
            if old != n_valid:
                _fail("n_finite_signals", f"is {old}, but n_valid_signals is {n_valid}: the two names must agree")
    elif "n_finite_signals" in state:
        n_valid = _int("n_finite_signals", state["n_finite_signals"], low=0, high=n)
    else:
        raise ValueError("a population state is missing key 'n_valid_signals' (older states: 'n_finite_signals')")

    return {
        "states": states,
        "costs": costs,
        "labels": labels,
        "mean_state": mean_state,
        "mean_signal": mean_signal,
        "class_mean_signal": class_mean_signal,
        "class_signalled": class_signalled,
        "t": t,
        "discount": discount,
        "n_valid_signals": n_valid,
        "game": dict(expected_game),
    }


# =========================================================================== server
def server_state(log_weights: np.ndarray, n_updates: int, rule: str, eta: float, alpha: float) -> dict:
    """A server's ``state_dict()``: the log-weights (a copy) and what :func:`check_server_state` checks them against.

    One builder for :class:`~memoa_fast.Server` and the Dask server, so that the two cannot drift apart.
    """
    return {"log_weights": np.array(log_weights, dtype=np.float64), "n_updates": n_updates, "rule": rule, "eta": eta,
            "alpha": alpha}


def check_server_state(state, *, n_agents: int, rule: str, eta: float, alpha: float) -> dict:
    r"""Check a server state against a server of ``n_agents`` clients with this ``rule``, ``eta`` and ``alpha``.

    Parameters
    ----------
    state : dict
        As written by a server's ``state_dict()`` or read from a checkpoint.
    n_agents : int
        The target's N.
    rule, eta, alpha
        The target's parameters; the state's must be equal.

    Returns
    -------
    dict
        A clean copy: ``log_weights`` (float64 (N,), owned), ``n_updates``
        (int), ``rule`` (str), ``eta`` and ``alpha`` (float).

    Raises
    ------
    ValueError
        Naming the key, the value and what is accepted, when any of these fails:

        - the keys are exactly :data:`SERVER_KEYS`;
        - ``rule``, ``eta``, ``alpha`` equal the target's (``eta``, ``alpha``
          real numbers, not bool or str);
        - ``log_weights``: a real dtype, shape (N,), no NaN and no ``+inf``
          (``-inf`` is a zero weight, which a server without fixed share
          reaches after an overflowing loss), not all ``-inf``, and
          normalised:

          .. math:: \left|\log \sum_i e^{\log p_i}\right| \le 10^{-9},

          computed as ``top + log(sum(exp(log p - top)))`` with ``top`` the
          largest entry;
        - ``n_updates``: an integer in [0, 2**63).
    """
    _mapping(state, "a server state")
    _keys(state, SERVER_KEYS, SERVER_KEYS, "a server state")
    if not isinstance(state["rule"], str) or state["rule"] != rule:
        _fail("rule", f"is {_short(state['rule'])}, but this server has rule={rule!r}")
    for key, want in (("eta", eta), ("alpha", alpha)):
        got = _real(key, state[key])
        if got != float(want):
            _fail(key, f"is {got!r}, but this server has {key}={float(want)!r}")
    log_p = _real_array("log_weights", state["log_weights"], (int(n_agents),), finite=False)
    if np.isnan(log_p).any():
        _fail("log_weights", f"must not be NaN; entry {int(np.argmax(np.isnan(log_p)))} is nan")
    if (log_p == np.inf).any():
        _fail("log_weights", f"must not be +inf; entry {int(np.argmax(log_p == np.inf))} is inf")
    top = float(log_p.max())
    if top == -np.inf:
        _fail("log_weights", "are all -inf (every weight zero); accepted: log-weights whose weights sum to 1")
    total = top + math.log(float(np.exp(log_p - top).sum()))
    if not abs(total) <= _LSE_TOL:
        _fail("log_weights", f"are not normalised: log-sum-exp is {total!r}, accepted: within {_LSE_TOL:g} of 0")
    n_updates = _int("n_updates", state["n_updates"], low=0, high=MAX_COUNT)
    return {"log_weights": log_p, "n_updates": n_updates, "rule": rule, "eta": float(eta), "alpha": float(alpha)}


# =========================================================================== signal sources
def check_source_layout(state, *, n_agents: int) -> dict:
    """Check the generic form of a signal source's state; return a clean copy.

    ``{"agents": {name: array (N, ...)}, "shared": {name: array}}``: string
    names without ``/``, arrays of a real integer or floating dtype (numbers
    only: no object, string or bool arrays), per-agent arrays with one row per
    agent. The meaning of each array is the source's business: a source checks
    it with its own ``validate_state_dict`` (see :func:`check_source_state`).
    """
    if not isinstance(state, Mapping) or set(state) != {"agents", "shared"}:
        got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"a signal source's state must be {{'agents': {{...}}, 'shared': {{...}}}}, got {got}")
    out = {}
    for part in ("agents", "shared"):
        if not isinstance(state[part], Mapping):
            raise ValueError(f"source state[{part!r}] must be a dict of arrays, got {type(state[part]).__name__}")
        out[part] = {}
        for name, value in state[part].items():
            key = f"source/{part}/{name}"
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"source state[{part!r}] has an invalid name {name!r}; accepted: non-empty strings without '/'")
            arr = np.asarray(value) if not isinstance(value, (str, bytes)) else None
            if arr is None or arr.dtype.kind not in "iuf":
                _fail(key, f"must hold real numbers (an integer or floating dtype), got {_short(value)}")
            if part == "agents" and (arr.ndim < 1 or arr.shape[0] != int(n_agents)):
                _fail(key, f"must have {int(n_agents)} rows (one per agent), got shape {arr.shape}")
            out[part][name] = np.array(arr, order="C", copy=True)
    return out


def source_settings(settings: Mapping) -> dict:
    """The saved form of a signal source's settings, for the ``"shared"`` part of its ``state_dict()``.

    A source's later rounds depend on some of its constructor's arguments
    (its seed, its noise range...): a saved state continues the run only in
    a source made with the same ones. The source records them in its state
    with this function and hands the same mapping to
    :func:`check_source_state` (``settings=``), which refuses a state saved
    with other values.

    Parameters
    ----------
    settings : mapping
        ``{name: value}``, each value one of: an integer in ``[0, 2**63 -
        1]`` (a seed, a block size), a finite float, or a tuple of finite
        floats (a range). Not a bool.

    Returns
    -------
    dict
        ``{name: array}``: an integer as a 0-d ``int64`` array (exact: a
        seed up to ``2**63 - 1`` is never rounded through a float), a float
        as a 0-d ``float64`` array, a tuple as a ``float64`` array of its
        length.
    """
    out = {}
    for name, value in settings.items():
        kind = _setting_kind(name, value)
        if kind == "int":
            out[name] = np.array(int(value), dtype=np.int64)
        else:
            out[name] = np.array(value, dtype=np.float64)
    return out


def _setting_kind(name, value) -> str:
    """``"int"``, ``"float"`` or ``"floats"``: the kind of a source's own setting (a programming error otherwise)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"source setting {name!r} must be an int, a float or a tuple of floats, got the bool {value!r}")
    if isinstance(value, numbers.Integral):
        if not 0 <= int(value) <= MAX_COUNT:
            raise ValueError(f"source setting {name!r} must be an integer in [0, 2**63 - 1], got {value!r}")
        return "int"
    if isinstance(value, numbers.Real) and math.isfinite(float(value)):
        return "float"
    if isinstance(value, tuple) and all(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
                                        and math.isfinite(float(v)) for v in value):
        return "floats"
    raise TypeError(f"source setting {name!r} must be an int, a finite float or a tuple of finite floats, got {value!r}")


def _check_setting(name, saved, own):
    """The saved value of setting ``name`` in its exact type, equal to the source's own ``own``; its saved form."""
    key = f"source/shared/{name}"
    kind = _setting_kind(name, own)
    if kind == "int":
        got = _int(key, saved, low=0, high=MAX_COUNT)  # a float (even 3.0) or a bool is refused, never rounded
        same, shown, mine = got == int(own), repr(got), repr(int(own))
        form = np.array(got, dtype=np.int64)
    elif kind == "float":
        got = _real(key, saved)
        same, shown, mine = got == float(own), repr(got), repr(float(own))
        form = np.array(got, dtype=np.float64)
    else:
        mine_t = tuple(float(v) for v in own)
        form = _real_array(key, saved, (len(mine_t),))
        got_t = tuple(float(v) for v in form)
        same, shown, mine = got_t == mine_t, repr(got_t), repr(mine_t)
    if not same:
        _fail(key, f"is {shown}, but this source has {name}={mine}: the state was saved by a source with other "
                   f"settings, and its later rounds would differ from the run that saved it (make the source with "
                   f"{name}={shown} to continue that run)")
    return form


def check_source_state(state, *, n_agents: int, agents: Mapping, shared: Mapping, settings: Mapping | None = None) -> dict:
    """Check a signal source's state against its declared arrays and its own settings; return a clean copy.

    For a source's ``validate_state_dict``. ``agents`` maps each per-agent
    array's name to its shape without the leading N; ``shared`` maps each
    shared array's name to its shape, or to ``"count"`` for an integer
    >= 0 (a 0-d integer array or a Python/NumPy integer). Float arrays must
    be finite. The names must match exactly.

    ``settings`` maps the name of each constructor argument the source's
    later rounds depend on (its seed, its noise range, ...) to the source's
    own value; its ``state_dict`` records them in ``"shared"`` with
    :func:`source_settings`. A state that records them must record all of
    them, each in its exact type (an integer setting as an integer, never a
    float, so that a seed up to ``2**63 - 1`` compares exactly) and equal to
    the source's own: a state saved by a source with another seed would
    continue with other noise, silently. A state that records none of them
    (written before the settings were saved) is accepted as before: nothing
    a user saved is lost.

    Parameters
    ----------
    state : dict
        ``{"agents": {...}, "shared": {...}}``, as the source's ``state_dict`` wrote it.
    n_agents : int
        The source's N (rows of every per-agent array).
    agents, shared : mapping
        The declared arrays (see above).
    settings : mapping, optional
        ``{name: own value}`` (see :func:`source_settings` for the kinds);
        none by default.

    Returns
    -------
    dict
        ``{"agents": {...}, "shared": {...}}``: owned C-contiguous copies,
        float64 arrays, counts as 0-d int64 arrays, and the settings (when
        the state records them) in the form :func:`source_settings` gives.

    Raises
    ------
    ValueError
        Naming the key (``state['source/shared/seed']``, ...) and what is
        accepted: a missing or unknown name, a wrong dtype or shape, a
        non-finite value, some settings recorded but not all, or a setting
        whose saved value differs from the source's own (the message gives
        both). Nothing is changed.

    Examples
    --------
    :class:`~memoa_fast.ClientForecasters` with N clients, dimension d and
    p lags::

        check_source_state(state, n_agents=N, agents={"weights": (d, 2 * p + 1), "lags": (d, p),
                           "signals": (d,)}, shared={"y": (d,), "t": "count"},
                           settings={"seed": seed, "noise_range": (low, high), "mu": mu, "block_size": B})
    """
    settings = {} if settings is None else dict(settings)
    clash = sorted(set(settings) & (set(shared) | set(agents)))
    if clash:
        raise TypeError(f"source settings {clash} are also declared as arrays")
    layout = check_source_layout(state, n_agents=n_agents)
    out = {"agents": {}, "shared": {}}
    for part, spec in (("agents", agents), ("shared", shared)):
        got = layout[part]
        names = set(got)
        if part == "shared":
            names -= set(settings)
        if names != set(spec):
            also = f" and the settings {sorted(settings)} (or none of them, in a state saved before they were recorded)" \
                if part == "shared" and settings else ""
            raise ValueError(
                f"source state[{part!r}] must hold exactly {sorted(spec)}{also}, got {sorted(got)}"
            )
        for name, shape in spec.items():
            key = f"source/{part}/{name}"
            if shape == "count":
                out[part][name] = np.array(_int(key, got[name], low=0), dtype=np.int64)
                continue
            full = ((int(n_agents),) if part == "agents" else ()) + tuple(shape)
            out[part][name] = _real_array(key, got[name], full)
    saved = [name for name in settings if name in layout["shared"]]
    if saved and len(saved) != len(settings):
        missing = sorted(set(settings) - set(saved))
        raise ValueError(
            f"source state['shared'] records the settings {sorted(saved)} but not {missing}: a source's state records "
            f"all of its settings {sorted(settings)}, or none of them (a state saved before they were recorded)"
        )
    for name in saved:
        out["shared"][name] = _check_setting(name, layout["shared"][name], settings[name])
    return out
