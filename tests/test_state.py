"""The saved-state validators: every valid state passes as a clean copy, every corruption is a ValueError naming its key."""
import copy
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memoa_fast import Game
from memoa_fast._state import (
    POPULATION_KEYS,
    SERVER_KEYS,
    check_population_state,
    check_server_state,
    check_source_layout,
    check_source_state,
    source_settings,
)
from memoa_fast.kernels import SIGNAL_LIMIT

GAME = Game(q=1.0, kappa=2.0, r=0.5, gamma=0.95)
SETTINGS = settings(max_examples=40, deadline=None)


class ClassGame:
    """A stand-in for a game of K classes: the validators read only n_classes, gamma and to_dict()."""

    def __init__(self, n_classes, gamma=0.9):
        self.n_classes, self.gamma = n_classes, gamma

    def to_dict(self):
        return {"n_classes": self.n_classes, "gamma": self.gamma}


# =========================================================================== valid states
finite = st.floats(-1e50, 1e50, allow_nan=False)


@st.composite
def population_states(draw, game=GAME):
    n, d = draw(st.integers(1, 12)), draw(st.integers(1, 3))
    K = getattr(game, "n_classes", 1)
    arrays = lambda shape, elements=finite: np.array(draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))).reshape(shape)  # noqa: E731
    t = draw(st.integers(0, 2000))
    discount = 1.0
    for _ in range(t):  # the engines' running product
        discount *= game.gamma
    state = {
        "states": arrays((n, d)),
        "costs": arrays((n,), st.floats(0, 1e308)),
        "mean_state": arrays((d,)),
        "mean_signal": arrays((d,)),
        "t": draw(st.sampled_from([int, np.int64, np.int32, np.uint64]))(t),
        "discount": discount,
        "n_valid_signals": draw(st.integers(0, n)),
        "game": game.to_dict(),
    }
    if K > 1 or draw(st.booleans()):
        state["labels"] = np.array(draw(st.lists(st.integers(0, K - 1), min_size=n, max_size=n)), dtype=draw(st.sampled_from([np.int64, np.int8, np.uint16])))
        state["class_mean_signal"] = arrays((K, d))
    return state


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k] and type(a[k]) is type(b[k])


@SETTINGS
@given(state=population_states())
def test_a_valid_population_state_passes_as_a_clean_independent_copy(state):
    n, d = state["states"].shape
    original = copy.deepcopy(state)
    clean = check_population_state(state, game=GAME, n_agents=n, dim=d)
    _same(state, original)  # the input is not changed
    for key in ("states", "costs", "mean_state", "mean_signal", "class_mean_signal"):
        assert clean[key].dtype == np.float64 and clean[key].flags.c_contiguous and clean[key].flags.owndata
        assert not np.shares_memory(clean[key], state.get(key, np.empty(0)))
    assert clean["labels"].dtype == np.int64 and clean["labels"].shape in ((n,), (0,))
    assert type(clean["t"]) is int and type(clean["discount"]) is float and type(clean["n_valid_signals"]) is int
    np.testing.assert_array_equal(clean["states"], state["states"])
    _same(check_population_state(clean, game=GAME, n_agents=n, dim=d), clean)  # idempotent


def test_several_classes_need_labels_and_class_means():
    game = ClassGame(3)
    state = {
        "states": np.zeros((4, 2)), "costs": np.zeros(4), "labels": np.array([0, 2, 1, 2]), "mean_state": np.zeros(2),
        "mean_signal": np.zeros(2), "class_mean_signal": np.zeros((3, 2)), "t": 0, "discount": 1.0,
        "n_valid_signals": 0, "game": game.to_dict(),
    }
    clean = check_population_state(state, game=game, n_agents=4, dim=2)
    np.testing.assert_array_equal(clean["labels"], [0, 2, 1, 2])
    for key, match in (("labels", "missing key.*'labels'"), ("class_mean_signal", "missing key.*'class_mean_signal'")):
        with pytest.raises(ValueError, match=match):
            check_population_state({k: v for k, v in state.items() if k != key}, game=game, n_agents=4, dim=2)
    for bad, match in (
        (np.array([0, 3, 1, 2]), r"class numbers in \[0, 3\); labels\[1\] is 3"),
        (np.array([0, -1, 1, 2]), r"labels\[1\] is -1"),
        (np.zeros(0, dtype=np.int64), r"shape \(4,\), got shape \(0,\)"),
        (np.array([0.0, 1.0, 1.0, 2.0]), "must be an integer array"),
        (np.array([True, False, True, True]), "must be an integer array"),
        ("0123", "must be an integer array"),
    ):
        with pytest.raises(ValueError, match=match):
            check_population_state({**state, "labels": bad}, game=game, n_agents=4, dim=2)
    with pytest.raises(ValueError, match=r"'class_mean_signal'\] must have shape \(3, 2\)"):
        check_population_state({**state, "class_mean_signal": np.zeros((1, 2))}, game=game, n_agents=4, dim=2)


def test_a_single_class_state_without_labels_or_class_means():
    state = {"states": np.ones((3, 1)), "costs": np.zeros(3), "mean_state": np.ones(1), "mean_signal": np.full(1, 2.0),
             "t": 0, "discount": 1.0, "n_finite_signals": 3, "game": GAME.to_dict()}
    clean = check_population_state(state, game=GAME, n_agents=3, dim=1)
    assert clean["labels"].shape == (0,) and clean["n_valid_signals"] == 3
    np.testing.assert_array_equal(clean["class_mean_signal"], [[2.0]])
    assert "n_finite_signals" not in clean
    check_population_state({**state, "n_valid_signals": 3}, game=GAME, n_agents=3, dim=1)  # both names, equal
    with pytest.raises(ValueError, match="is 2, but n_valid_signals is 3"):
        check_population_state({**state, "n_valid_signals": 3, "n_finite_signals": 2}, game=GAME, n_agents=3, dim=1)
    for bad_game in (np.array([1.0, 2.0]), None, GAME.with_policy("greedy").to_dict(), list(GAME.to_dict().items())):
        with pytest.raises(ValueError, match=r"state\['game'\] is .*, but this population plays"):
            check_population_state({**state, "game": bad_game}, game=GAME, n_agents=3, dim=1)
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'stats'; accepted keys: states, costs"):
        check_population_state({**state, "stats": 1}, game=GAME, n_agents=3, dim=1)
    with pytest.raises(ValueError, match="a population state must be a dict, got list"):
        check_population_state([state], game=GAME, n_agents=3, dim=1)


# =========================================================================== corruptions
BAD_INTS = [1.7, 3.0, True, np.bool_(True), "3", None, np.float64(2.0), np.array([1]), np.array(2.0), -1, 2**70]
BAD_REALS = [float("nan"), float("inf"), "0.5", None, True, np.array([1.0]), 1 + 0j]
BAD_ARRAY_DTYPES = ["bool", "complex128", "<U4", "S4", "datetime64[s]", "timedelta64[s]", "object"]


def _bad_array(like, kind, draw):
    if kind == "dtype":
        dtype = draw(st.sampled_from(BAD_ARRAY_DTYPES))
        return np.zeros(like.shape, dtype=dtype) if dtype != "object" else np.full(like.shape, None, dtype=object)
    if kind == "shape":
        shape = draw(st.sampled_from([like.shape + (1,), like.shape[:-1], (like.shape[0] + 1,) + like.shape[1:], ()]))
        return np.zeros(shape)
    if kind == "type":
        return draw(st.sampled_from(["states", None, {"a": 1}, [["x"]], object()]))
    out = np.array(like, dtype=np.float64)
    out.reshape(-1)[draw(st.integers(0, out.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e51, -1e300]))
    return out


@st.composite
def corrupted_population_states(draw):
    state = draw(population_states())
    key = draw(st.sampled_from(["states", "costs", "mean_state", "mean_signal", "class_mean_signal", "labels", "t",
                                "discount", "n_valid_signals", "game", "missing", "unknown"]))
    n, d = state["states"].shape
    if key == "missing":
        key = draw(st.sampled_from(["states", "costs", "mean_state", "mean_signal", "t", "discount", "n_valid_signals", "game"]))
        del state[key]
    elif key == "unknown":
        key = draw(st.sampled_from(["stats", "n_finite", "Game", "labels_"]))
        state[key] = 0
    elif key in ("t", "n_valid_signals"):
        state[key] = draw(st.sampled_from(BAD_INTS + ([n + 1] if key == "n_valid_signals" else [])))
    elif key == "discount":
        state[key] = draw(st.sampled_from(BAD_REALS + [state["discount"] * (1 + 1e-6) + 1e-200, 1.5, -0.0 - 1e-3]))
    elif key == "game":
        state[key] = draw(st.sampled_from([{**GAME.to_dict(), "q": 1.5}, GAME.to_dict() | {"policy": "greedy"}, None, "memoa",
                                           np.array([1.0, 2.0]), list(GAME.to_dict().items())]))
    elif key == "labels":
        kind = draw(st.sampled_from(["dtype", "shape", "value"]))
        if kind == "value":
            labels = np.zeros(n, dtype=np.int64)
            labels[draw(st.integers(0, n - 1))] = draw(st.sampled_from([1, -1, 7]))
            state[key] = labels
        else:
            state[key] = np.zeros((n, 1), dtype=np.int64) if kind == "shape" else np.zeros(n, dtype=draw(st.sampled_from(["float64", "bool", "<U1"])))
    else:
        like = state.get(key, np.zeros((1, d)))
        kind = draw(st.sampled_from(["dtype", "shape", "type", "value"]))
        if key == "costs" and kind == "value" and draw(st.booleans()):
            state[key] = state[key].copy()
            state[key][draw(st.integers(0, n - 1))] = -draw(st.floats(1e-300, 1e300))
        else:
            state[key] = _bad_array(like, kind, draw)
    return state, key, n, d


@SETTINGS
@given(case=corrupted_population_states())
def test_every_corruption_of_a_population_state_is_a_value_error_naming_its_key(case):
    state, key, n, d = case
    arrays = {k: v.copy() for k, v in state.items() if isinstance(v, np.ndarray) and v.dtype != object}
    with pytest.raises(ValueError) as info:
        check_population_state(state, game=GAME, n_agents=n, dim=d)
    assert repr(key) in str(info.value), (key, str(info.value))
    for k, v in arrays.items():  # nothing changed
        np.testing.assert_array_equal(state[k], v)


@pytest.mark.parametrize("bad", BAD_INTS)
def test_t_must_be_a_true_integer(bad):
    state = {"states": np.zeros((2, 1)), "costs": np.zeros(2), "mean_state": np.zeros(1), "mean_signal": np.zeros(1),
             "t": bad, "discount": 1.0, "n_valid_signals": 0, "game": GAME.to_dict()}
    with pytest.raises(ValueError, match=r"state\['t'\] must be an integer in \[0, 2\*\*63 - 1\], got"):
        check_population_state(state, game=GAME, n_agents=2, dim=1)


@pytest.mark.parametrize("good", [3, np.int8(3), np.uint64(3), np.int64(3), np.array(3), np.array(3, dtype=np.uint8)])
def test_t_accepts_numpy_integers(good):
    state = {"states": np.zeros((2, 1)), "costs": np.zeros(2), "mean_state": np.zeros(1), "mean_signal": np.zeros(1),
             "t": good, "discount": GAME.gamma**3, "n_valid_signals": 0, "game": GAME.to_dict()}
    assert check_population_state(state, game=GAME, n_agents=2, dim=1)["t"] == 3


@pytest.mark.parametrize("gamma, t", [(0.95, 10**5), (0.999999, 10**6), (1.0, 10**7), (0.5, 1100)])
def test_discount_of_a_long_run_is_accepted(gamma, t):
    """A running product over t steps (or its underflow to 0) passes; a discount off by 1e-6 does not."""
    game = Game(gamma=gamma)
    discount = 1.0
    for _ in range(min(t, 10**6)):
        discount *= gamma
    if t > 10**6:
        discount = discount ** (t / 10**6) if gamma < 1 else 1.0
    state = {"states": np.zeros((2, 1)), "costs": np.zeros(2), "mean_state": np.zeros(1), "mean_signal": np.zeros(1),
             "t": t, "discount": discount, "n_valid_signals": 0, "game": game.to_dict()}
    check_population_state(state, game=game, n_agents=2, dim=1)
    if discount > 1e-290:
        with pytest.raises(ValueError, match=r"state\['discount'\] is .* must be gamma\*\*t"):
            check_population_state({**state, "discount": discount * (1 + 1e-6)}, game=game, n_agents=2, dim=1)


# =========================================================================== server
@st.composite
def log_weights(draw):
    n = draw(st.integers(1, 30))
    raw = np.array(draw(st.lists(st.floats(-700, 700), min_size=n, max_size=n)))
    zero = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    zero[draw(st.integers(0, n - 1))] = False  # at least one weight
    raw[zero] = -np.inf
    top = raw.max()
    return (raw - top) - np.log(np.exp(raw - top).sum())


def _server(log_p, **changes):
    return {"log_weights": log_p, "n_updates": 4, "rule": "hedge", "eta": 0.5, "alpha": 0.0, **changes}


@SETTINGS
@given(log_p=log_weights())
def test_normalised_log_weights_pass_zero_weights_included(log_p):
    state = _server(log_p)
    clean = check_server_state(state, n_agents=log_p.size, rule="hedge", eta=0.5, alpha=0.0)
    np.testing.assert_array_equal(clean["log_weights"], log_p)
    assert not np.shares_memory(clean["log_weights"], log_p) and clean["n_updates"] == 4
    assert clean == {**clean, "rule": "hedge", "eta": 0.5, "alpha": 0.0}


@SETTINGS
@given(log_p=log_weights(), key=st.sampled_from(["log_weights", "n_updates", "rule", "eta", "alpha", "missing", "unknown"]),
       pick=st.integers(0, 10**6))
def test_every_corruption_of_a_server_state_is_a_value_error_naming_its_key(log_p, key, pick):
    n = log_p.size
    state = _server(log_p.copy())
    if key == "log_weights":
        options = [np.full(n, np.nan), np.where(np.arange(n) == 0, np.inf, log_p), log_p + 1e-6, np.full(n, -np.inf),
                   log_p.astype(np.complex128), log_p[:-1], log_p.reshape(n, 1), log_p.astype(str), None]
        state[key] = options[pick % len(options)]
    elif key == "n_updates":
        state[key] = BAD_INTS[pick % len(BAD_INTS)]
    elif key in ("eta", "alpha"):
        state[key] = [0.25, "0.5", None, True, float("nan"), np.array([0.5])][pick % 6]
    elif key == "rule":
        state[key] = ["eg", "Hedge", None, 1][pick % 4]
    elif key == "missing":
        key = SERVER_KEYS[pick % len(SERVER_KEYS)]
        del state[key]
    else:
        key = "weights"
        state[key] = np.exp(log_p)
    with pytest.raises(ValueError) as info:
        check_server_state(state, n_agents=n, rule="hedge", eta=0.5, alpha=0.0)
    assert repr(key) in str(info.value), (key, str(info.value))


def test_server_messages():
    log_p = np.log(np.full(4, 0.25))
    with pytest.raises(ValueError, match=r"'log_weights'\] are not normalised: log-sum-exp is .*within 1e-09 of 0"):
        check_server_state(_server(log_p + 1e-8), n_agents=4, rule="hedge", eta=0.5, alpha=0.0)
    with pytest.raises(ValueError, match=r"'log_weights'\] must not be \+inf; entry 2"):
        check_server_state(_server(np.array([0.0, -np.inf, np.inf, -np.inf])), n_agents=4, rule="hedge", eta=0.5, alpha=0.0)
    with pytest.raises(ValueError, match=r"'rule'\] is 'eg', but this server has rule='hedge'"):
        check_server_state(_server(log_p, rule="eg"), n_agents=4, rule="hedge", eta=0.5, alpha=0.0)
    with pytest.raises(ValueError, match=r"'n_updates'\] must be an integer in \[0, 2\*\*63 - 1\], got 1.5"):
        check_server_state(_server(log_p, n_updates=1.5), n_agents=4, rule="hedge", eta=0.5, alpha=0.0)


# =========================================================================== signal sources
def test_source_layout_and_declared_state():
    state = {"agents": {"w": np.zeros((5, 2, 3))}, "shared": {"t": 4, "y": [1.0, 2.0]}}
    clean = check_source_state(state, n_agents=5, agents={"w": (2, 3)}, shared={"t": "count", "y": (2,)})
    assert clean["shared"]["t"].dtype == np.int64 and int(clean["shared"]["t"]) == 4
    assert not np.shares_memory(clean["agents"]["w"], state["agents"]["w"])
    for bad, match in (
        ({"agents": {"w": np.zeros((4, 2, 3))}, "shared": state["shared"]}, "must have 5 rows"),
        ({"agents": state["agents"], "shared": {"t": 4.0, "y": [1.0, 2.0]}}, r"'source/shared/t'\] must be an integer"),
        ({"agents": state["agents"], "shared": {"t": True, "y": [1.0, 2.0]}}, "must hold real numbers"),
        ({"agents": state["agents"], "shared": {"t": 4, "y": [1.0, np.nan]}}, "must be finite"),
        ({"agents": state["agents"], "shared": {"t": 4}}, r"must hold exactly \['t', 'y'\]"),
        ({"agents": state["agents"]}, "must be {'agents'"),
        ({"agents": {"a/b": np.zeros(5)}, "shared": {}}, "invalid name 'a/b'"),
        ({"agents": state["agents"], "shared": {"t": 4, "y": np.array(["1", "2"])}}, "must hold real numbers"),
    ):
        with pytest.raises(ValueError, match=match):
            check_source_state(bad, n_agents=5, agents={"w": (2, 3)}, shared={"t": "count", "y": (2,)})
    assert check_source_layout({"agents": {}, "shared": {}}, n_agents=1) == {"agents": {}, "shared": {}}


# A source's settings: an integer (a seed, up to 2**63 - 1), a float, a range of floats.
_OWN = {"seed": 2**63 - 1, "mu": 0.1, "noise_range": (0.02, 1.0)}
_SPEC = dict(n_agents=3, agents={"w": (2,)}, shared={"t": "count", "y": (2,)})


def _source_state(**settings):
    return {"agents": {"w": np.ones((3, 2))}, "shared": {"t": np.array(4), "y": np.zeros(2), **source_settings(settings)}}


def test_source_settings_are_saved_in_their_exact_types_and_checked_against_the_sources():
    """The settings a source's later rounds depend on round-trip exactly (the largest seed as an int64, never a float)
    and a state saved with another value of any of them is refused, naming the key, the saved value and the source's.
    """
    saved = source_settings(_OWN)
    assert saved["seed"].dtype == np.int64 and saved["seed"].shape == () and int(saved["seed"]) == 2**63 - 1
    assert saved["mu"].dtype == np.float64 and saved["noise_range"].shape == (2,)
    clean = check_source_state(_source_state(**_OWN), **_SPEC, settings=_OWN)
    assert int(clean["shared"]["seed"]) == 2**63 - 1 and clean["shared"]["seed"].dtype == np.int64
    np.testing.assert_array_equal(clean["shared"]["noise_range"], [0.02, 1.0])
    for name, other, shown in (("seed", 2**63 - 2, "9223372036854775806"), ("mu", math.nextafter(0.1, 1.0), "0.10000000000000002"),
                               ("noise_range", (0.02, 1.5), r"\(0.02, 1.5\)")):
        state = _source_state(**dict(_OWN, **{name: other}))
        frozen = copy.deepcopy(state)
        with pytest.raises(ValueError, match=rf"state\['source/shared/{name}'\] is {shown}, but this source has {name}="
                                             rf"{re.escape(repr(_OWN[name]))}"):
            check_source_state(state, **_SPEC, settings=_OWN)
        for part in ("agents", "shared"):  # the validator changes nothing, not even its input
            for key, value in frozen[part].items():
                np.testing.assert_array_equal(state[part][key], value)


@pytest.mark.parametrize("bad, match", [
    ({"seed": np.array(float(2**63 - 1))}, r"'source/shared/seed'\] must be an integer"),  # never read through a float
    ({"seed": np.array(2.0)}, r"'source/shared/seed'\] must be an integer"),
    ({"seed": True}, "must hold real numbers"),
    ({"seed": np.array([2**63 - 1])}, r"'source/shared/seed'\] must be an integer"),
    ({"mu": np.array(np.nan)}, r"'source/shared/mu'\] must be finite"),
    ({"noise_range": np.array([0.02])}, r"'source/shared/noise_range'\] must have shape \(2,\)"),
    ({"seed": None}, r"records the settings \['mu', 'noise_range'\] but not \['seed'\]"),
    ({"other": np.array(1)}, r"must hold exactly \['t', 'y'\] and the settings \['mu', 'noise_range', 'seed'\]"),
])
def test_a_setting_in_another_type_shape_or_missing_is_refused(bad, match):
    state = _source_state(**_OWN)
    for name, value in bad.items():
        if value is None:
            del state["shared"][name]
        else:
            state["shared"][name] = value
    with pytest.raises(ValueError, match=match):
        check_source_state(state, **_SPEC, settings=_OWN)


def test_a_state_saved_before_the_settings_were_recorded_loads_as_before():
    """Nothing a user saved is lost: a state without any setting (what sources wrote before) passes, unchanged."""
    old = _source_state()
    clean = check_source_state(old, **_SPEC, settings=_OWN)
    assert clean["shared"].keys() == {"t", "y"}
    assert check_source_state(old, **_SPEC)["shared"].keys() == {"t", "y"}
    with pytest.raises(ValueError, match=r"must hold exactly \['t', 'y'\], got"):  # a source without settings takes none
        check_source_state(_source_state(**_OWN), **_SPEC)
    with pytest.raises((TypeError, ValueError), match="setting 'seed'"):
        source_settings({"seed": True})
    with pytest.raises(ValueError, match="setting 'seed'"):
        source_settings({"seed": 2**63})


def test_keys_are_documented():
    assert set(POPULATION_KEYS) >= {"states", "costs", "labels", "class_mean_signal", "n_valid_signals", "n_finite_signals"}
    assert float(SIGNAL_LIMIT) == 1e50
