"""memoa-fast: massive mixtures of online agents with compiled mean-field policies.

The public API is small:

- :class:`Game` holds the weights ``(q, kappa, r, gamma)``, the closed-form
  gains (:func:`solve_gains`) and the policy (``memoa`` or a baseline);
- :class:`Population` owns N agents' states and costs and steps them in place;
- :class:`Server` mixes the agents' predictions with online weights;
- :mod:`memoa_fast.certificates` checks the policy against the Nash optimum.
"""
from .game import POLICIES, Game, Gains, PolicyCoefficients, solve_gains
from .population import Population
from .server import RULES, Server

__version__ = "0.1.0"

__all__ = ["Game", "Gains", "PolicyCoefficients", "Population", "Server", "solve_gains", "POLICIES", "RULES", "__version__"]
