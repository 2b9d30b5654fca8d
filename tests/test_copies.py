"""A subclass of a stateful object pickles and copies as itself (memoa_fast._copies).

Before, the reductions of Population, Server, Pipeline, SquaredErrors and Game rebuilt the base class: a
subclass's pickle or copy came back as the base class, its own attributes and overridden methods dropped.
"""
import copy
import pickle

import pytest

from memoa_fast import Game, Pipeline, Population, Server, game, population, server
from memoa_fast.distributed import signals
from memoa_fast.distributed.signals import NoisyLastValueSignals
from memoa_fast.timeseries import forecasters, pipeline
from memoa_fast.timeseries.forecasters import ClientForecasters, SquaredErrors

CLONE = {"pickle": lambda o: pickle.loads(pickle.dumps(o)), "deepcopy": copy.deepcopy, "copy": copy.copy}


class _Mine:
    """A user's subclass: its own attributes (a list, a bound method of itself) and its own load_state_dict."""

    def tagged(self):
        self.seen, self.hook = ["mine"], self.__repr__
        return self

    def load_state_dict(self, state):
        self.seen.append("loaded")
        super().load_state_dict(state)


class _MyPopulation(_Mine, Population):
    pass


class _MyServer(_Mine, Server):
    pass


class _MyPipeline(_Mine, Pipeline):
    pass


class _MyScorer(_Mine, SquaredErrors):
    pass


class _MySource(_Mine, NoisyLastValueSignals):
    pass


class _MyForecasters(_Mine, ClientForecasters):
    pass


# base class, its subclass above, its constructor arguments, (module, name) of the set of attributes its __init__ sets
CASES = {
    "Population": (Population, _MyPopulation, (Game(), 5, 2), dict(backend="numpy"), (population, "_POPULATION_BUILT_BY_INIT")),
    "Server": (Server, _MyServer, (5, 2), dict(backend="numpy"), (server, "_SERVER_BUILT_BY_INIT")),
    "Pipeline": (Pipeline, _MyPipeline, (5, 2), dict(backend="numpy"), (pipeline, "_PIPELINE_BUILT_BY_INIT")),
    "SquaredErrors": (SquaredErrors, _MyScorer, (5, 2), dict(backend="numpy"), (forecasters, "_SCORER_BUILT_BY_INIT")),
    "NoisyLastValueSignals": (NoisyLastValueSignals, _MySource, (0, 5), dict(dim=2), (signals, "_BUILT_BY_INIT")),
    "ClientForecasters": (ClientForecasters, _MyForecasters, (5, 2), dict(backend="numpy", threads=1),
                          (forecasters, "_FORECASTERS_BUILT_BY_INIT")),
}


@pytest.mark.parametrize("how", sorted(CLONE))
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_subclass_copies_as_itself(name, how):
    """Its copy is of its class, its own attributes copied (not shared; a bound method bound to the copy), the state
    loaded by its own load_state_dict. On c41bb6d the first four came back as the base class (no ``seen``).
    """
    base, mine, args, kwargs, _ = CASES[name]
    obj = mine(*args, **kwargs).tagged()
    clone = CLONE[how](obj)
    assert type(clone) is mine
    assert clone.hook.__self__ is clone and clone.seen is not obj.seen
    assert clone.seen == (["mine", "loaded"] if hasattr(base, "load_state_dict") else ["mine"]) and obj.seen == ["mine"]
    assert type(CLONE[how](base(*args, **kwargs))) is base


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_attributes_built_by_init_are_those_a_fresh_object_has(name):
    """Every attribute __init__ sets is built again by a copy; none is taken for a subclass's own (and copied twice)."""
    base, _, args, kwargs, (module, built) = CASES[name]
    assert set(vars(base(*args, **kwargs))) == getattr(module, built)


def test_a_subclassed_game_pickles_as_itself():
    """A Game subclass's pickle is of its class with its own attributes (on c41bb6d a plain Game); a Game's is a Game."""
    class_game = Game(q=[1.0, 2.0], kappa=1.0, r=0.1, shares=[0.5, 0.5])
    mine = _MyGame(q=2.0, policy="greedy")
    object.__setattr__(mine, "tag", [1])
    clone = pickle.loads(pickle.dumps(mine))
    assert type(clone) is _MyGame and clone.tag == [1] and clone == mine
    assert type(pickle.loads(pickle.dumps(class_game))) is Game and pickle.loads(pickle.dumps(class_game)) == class_game
    assert game._restore_game(mine.to_dict()) == mine  # the form pickles made before had


class _MyGame(Game):
    pass


def test_pickles_made_before_subclasses_were_kept_load():
    """The rebuilds take the arguments c41bb6d's pickles give (the state with them, no class): the base class, state loaded."""
    pop = Population(Game(q=[1.0, 2.0], kappa=1.0, r=0.1, shares=[0.5, 0.5]), 4, 2, labels=[1, 0, 1, 0], backend="numpy")
    pop.step([[1.0, 0.0]] * 4)
    old = population._rebuild(Population, (pop.game, 4, 2), dict(backend="numpy", threads=1, parallel_threshold=10),
                              pop.state_dict())
    assert type(old) is Population and old.t == 1 and list(old.labels) == [1, 0, 1, 0]
    srv = Server(3, 1, backend="numpy")
    srv.update([[1.0], [0.0], [2.0]], [1.0])
    old = server._rebuild_server(3, 1, dict(backend="numpy"), srv.state_dict())
    assert type(old) is Server and old.n_updates == 1 and list(old.log_weights) == list(srv.log_weights)
    scorer = SquaredErrors(2, 1, backend="numpy")
    scorer.add([[1.0], [3.0]], [0.0])
    old = forecasters._rebuild_squared_errors(2, 1, dict(backend="numpy"), (scorer.totals, [2.0], 9.0))
    assert type(old) is SquaredErrors and list(old.totals) == [1.0, 9.0] and old.max_total == 9.0


class _SlottedPopulation(Population):
    __slots__ = ("tag", "never_set")


class _SlottedGame(Game):
    __slots__ = ("tag",)


@pytest.mark.parametrize("how", sorted(CLONE))
def test_a_subclass_s_own_slots_are_kept(how):
    """Own attributes a subclass declares in ``__slots__`` are copied too (not shared), an unset one stays unset; a Game
    subclass's own slots pickle too. On bd2245e they were dropped silently (only ``__dict__`` was read).
    """
    pop = _SlottedPopulation(Game(), 3, 1, backend="numpy")
    pop.tag = [1]
    clone = CLONE[how](pop)
    assert type(clone) is _SlottedPopulation and clone.tag == [1] and clone.tag is not pop.tag
    assert not hasattr(clone, "never_set")
    mine = _SlottedGame(q=2.0)
    object.__setattr__(mine, "tag", [2])
    back = pickle.loads(pickle.dumps(mine))
    assert type(back) is _SlottedGame and back.tag == [2] and back == mine
