"""Pickles and copies of a stateful object that keep its class: a subclass's copy is of that subclass.

A reduction that rebuilds a hard-coded class turned a subclass's pickle or copy into the base class, its own
attributes and its overridden methods (a stricter ``validate_state_dict``, its own ``step``) silently dropped.
Population, Server, Pipeline, SquaredErrors, ClientForecasters and NoisyLastValueSignals mix in
:class:`CopiesKeepTheirClass` and pickle as :meth:`CopiesKeepTheirClass._reduce_keeping_class` writes it (Game,
immutable, uses :func:`build_as` and :func:`own_attributes` alone):

- ``rebuild(*args, cls)`` makes the object: ``cls.__new__(cls)`` and the *base* class's ``__init__``
  (:func:`build_as`; a subclass's own ``__init__`` is not called, its arguments are not known here);
- :meth:`CopiesKeepTheirClass.__setstate__` then sets the attributes the base ``__init__`` does not set (a
  subclass's own), and only then loads the state, through the object's own ``load_state_dict`` (or the
  class's :meth:`~CopiesKeepTheirClass._load_saved`), which may read them.

The state is set once the copy exists, so an own attribute that refers back to the object (a bound method, say)
refers to the copy. ``copy.copy`` is a deep copy: a subclass's own attributes are not shared with the original.
So an own attribute that views the object's arrays (``self.first = self.states[:1]``) is an array of its own in
the copy, no longer a view of the copy's, and one that cannot be deep-copied (a lock) makes the copy raise.
"""
from __future__ import annotations

import copy
import copyreg

__all__ = ["CopiesAreDeep", "CopiesKeepTheirClass", "build_as", "own_attributes", "set_own_attributes"]


def own_attributes(obj, built_by_init: frozenset) -> dict:
    """The attributes of ``obj`` that its base class's ``__init__`` does not set (``built_by_init``): a subclass's own.

    Those in its ``__dict__`` and those in the ``__slots__`` a subclass declares (a set slot; they were dropped).
    """
    own = {name: value for name, value in getattr(obj, "__dict__", {}).items() if name not in built_by_init}
    for name in _slot_names(type(obj)):
        if name not in built_by_init:
            try:
                own[name] = object.__getattribute__(obj, name)
            except AttributeError:  # a slot never set stays unset in the copy
                pass
    return own


def _slot_names(cls) -> list:
    """The slot names of ``cls`` and its bases, mangled as stored (``copyreg``'s, as pickle's own default uses them)."""
    return copyreg._slotnames(cls)


def set_own_attributes(obj, own: dict) -> None:
    """Put back the attributes :func:`own_attributes` took: a slot through its descriptor, any other in ``__dict__``.

    ``object.__setattr__`` for a slot, so an immutable class's ``__setattr__`` (Game's) is not called.
    """
    slots = set(_slot_names(type(obj)))
    for name, value in own.items():
        if name in slots:
            object.__setattr__(obj, name, value)
        else:
            obj.__dict__[name] = value


def build_as(cls, base, args: tuple, config: dict, state=None):
    """A ``cls`` (``base`` or a subclass of it) built by ``base.__init__(*args, **config)`` alone.

    ``state`` is given by a pickle made before subclasses were kept (``cls`` is then ``base``): installed at once
    (:meth:`CopiesKeepTheirClass._load_saved`, validated). Otherwise the state follows (``__setstate__``).
    """
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise TypeError(f"a pickled {base.__name__} must name {base.__name__} or a subclass of it, got {cls!r}")
    obj = cls.__new__(cls)
    base.__init__(obj, *args, **config)
    if state is not None:
        obj._load_saved(state)
    return obj


class CopiesAreDeep:
    """Mixin: ``copy.copy`` is ``copy.deepcopy``, so a copy shares nothing with the original.

    For the stateful objects, whose default shallow copy shared their arrays, sources or a subclass's own attributes
    (observing one of the two moved both).
    """

    __slots__ = ()

    def __copy__(self):
        """A copy is independent of the original, a subclass's own attributes too: a deep copy."""
        return copy.deepcopy(self)


class CopiesKeepTheirClass(CopiesAreDeep):
    """Mixin: pickle, ``copy.copy`` and ``copy.deepcopy`` of a subclass give that subclass, its own attributes kept.

    A class defines ``__reduce__`` as ``self._reduce_keeping_class(rebuild, BUILT_BY_INIT, take)``, where
    ``take()`` returns ``(args, state)``, ``rebuild(*args, cls)`` returns :func:`build_as` ``(cls, ThatClass, ...)``
    and ``BUILT_BY_INIT`` names every attribute that class's ``__init__`` sets. ``state`` is what
    :meth:`_load_saved` takes (by default a ``state_dict``, loaded with ``load_state_dict``: a subclass's own,
    and its own validation, run).
    """

    __slots__ = ()

    def _reduce_keeping_class(self, rebuild, built_by_init: frozenset, take) -> tuple:
        """``(rebuild, (*args, type(self)), {"own": ..., "state": state})`` with ``(args, state) = take()``: see the module's docstring.

        ``take()`` and the own attributes are one checked read of the object's lock (``_exclusive.read``, when it
        has one; ``take`` calls ``state_dict()``, itself a checked read, when the state is one: a subclass's own
        stays the one a copy calls): a copy or pickle is of one round, or raises the ``RuntimeError`` a second
        writer gets when another thread's call held the lock or began meanwhile (and after an interrupted
        update). It takes no hold, so it never makes that call refuse. (A subclass that writes its own attributes
        outside the base class's calls keeps them in step with the state itself.)
        """
        ex = getattr(self, "_exclusive", None)

        def read():
            args, state = take()
            return args, state, own_attributes(self, built_by_init)

        args, state, own = read() if ex is None else ex.read(read)
        return (rebuild, (*args, type(self)), {"own": own, "state": state})

    def __setstate__(self, saved: dict) -> None:
        """The second half of an unpickling or a copy: a subclass's own attributes, then the state (validated)."""
        set_own_attributes(self, saved["own"])  # first: the subclass's load_state_dict may read them
        self._load_saved(saved["state"])

    def _load_saved(self, state) -> None:
        """Install the ``state`` a pickle or copy carries: ``load_state_dict`` (all checked first)."""
        self.load_state_dict(state)
