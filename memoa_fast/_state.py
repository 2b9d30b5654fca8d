"""Validators of saved states (temporary minimal version; the full one lands from the persist branch)."""
from __future__ import annotations

import numpy as np

from ._validation import as_float_array, check_int


def check_population_state(state: dict, *, game, n_agents: int, dim: int) -> dict:
    if state.get("game") != game.to_dict():
        raise ValueError(f"state was saved for game {state.get('game')!r}, this population plays {game.to_dict()!r}")
    K = game.n_classes
    out = {
        "states": as_float_array("state['states']", state["states"], (n_agents, dim)),
        "costs": as_float_array("state['costs']", state["costs"], (n_agents,)),
        "mean_signal": as_float_array("state['mean_signal']", state["mean_signal"], (dim,)),
        "t": check_int("state['t']", state["t"], low=0),
        "discount": float(state["discount"]),
        "n_valid_signals": check_int("state['n_valid_signals']", state.get("n_valid_signals", state.get("n_finite_signals", 0)), low=0),
    }
    cms = state.get("class_mean_signal")
    out["class_mean_signal"] = out["mean_signal"][None, :].copy() if cms is None else as_float_array(
        "state['class_mean_signal']", cms, (K, dim))
    out["labels"] = np.asarray(state["labels"], dtype=np.int64) if K > 1 else None
    return out


def check_server_state(state: dict, *, n_agents: int, rule: str, eta: float, alpha: float) -> dict:
    for key, value in (("rule", rule), ("eta", eta), ("alpha", alpha)):
        if state.get(key) != value:
            raise ValueError(f"state was saved with {key}={state.get(key)!r}, this server has {key}={value!r}")
    log_p = as_float_array("state['log_weights']", state["log_weights"], (n_agents,), allow_nonfinite=True)
    if np.isnan(log_p).any() or (log_p == np.inf).any():
        raise ValueError("state['log_weights'] must not hold NaN or +inf")
    total = float(np.logaddexp.reduce(log_p))
    if not abs(total) <= 1e-9:
        raise ValueError(f"state['log_weights'] must be normalised (log-sum-exp 0), got {total!r}")
    return {"log_weights": log_p, "n_updates": check_int("state['n_updates']", state["n_updates"], low=0)}
