"""Input checks shared by the public layer.

Every error names the argument, shows the value it got and says what is
accepted, so that the caller can fix the input without reading the source.

Besides the scalar and array checks, two questions about the process itself
live here, both answered from what *this process may use*, never from what
the machine has:

- :func:`available_threads`: the CPUs in the affinity mask (``taskset``, a
  batch scheduler, a container's cpuset), capped by Numba's thread limit
  ``NUMBA_NUM_THREADS``;
- :func:`available_memory`: physical memory, capped by the cgroup limit and
  by ``RLIMIT_AS`` when they are set; :func:`check_sizes` refuses a
  population whose arrays would not fit before anything is allocated.
"""
from __future__ import annotations

import decimal
import math
import numbers
import os
import stat
import sys
import warnings
from pathlib import Path

import numpy as np

BACKENDS = ("numba", "cython", "numpy")


def scalar_of(value, kinds: str):
    """A 0-d NumPy array whose dtype kind is in ``kinds`` (``"iu"``, ``"iuf"``), as read from a file, as its scalar.

    Anything else is returned unchanged, for the caller's own type check.
    """
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in kinds:
        return value[()]
    return value


def check_real(name: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    """Return ``value`` as a float after checking it is a finite real in the given range.

    Python and NumPy reals (``fractions.Fraction`` and ``decimal.Decimal``
    too, as the per-class weights take them: :func:`as_real_values`) and 0-d
    arrays of a real integer or floating dtype (as read from a file) are
    accepted; bool, strings, complex numbers and anything else raise
    ``TypeError`` naming ``name``.
    """
    value = scalar_of(value, "iuf")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    left = "-inf" if low is None else f"{low:g}"
    right = "inf" if high is None else f"{high:g}"
    interval = ("(" if low_open or low is None else "[") + f"{left}, {right}" + (")" if high_open or high is None else "]")
    try:
        number = float(value)
    except OverflowError:  # an int or Fraction beyond float64 (10**400): was the unnamed "int too large to convert to float"
        number = math.inf
    except ValueError:  # Decimal('sNaN'), "cannot convert signaling NaN to float": a NaN, refused as one below
        number = math.nan
    if math.isinf(number) and _beyond_float64(value):  # also a long double 1e400, which float() makes inf ("got inf")
        raise ValueError(f"{name} must be a finite float64 (at most 1.8e308 in magnitude) in {interval}, "
                         f"got {_short(value)}")
    given, value = value, number
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo_ok = low is None or (value > low if low_open else value >= low)
    hi_ok = high is None or (value < high if high_open else value <= high)
    if not (lo_ok and hi_ok):
        # a nonzero value below float64's smallest (Fraction(1, 10**400), Decimal('1e-400')) is refused as what was
        # given, not as the 0.0 it rounds to
        shown = f"{_short(given)}, which is 0.0 in float64" if value == 0.0 and given != 0 else repr(value)
        raise ValueError(f"{name} must be in {interval}, got {shown}")
    return value


def as_file_path(name: str, path, what: str):
    """``path`` as a :class:`pathlib.Path`: a ``str`` or ``os.PathLike`` naming ``what`` (a file), without a NUL character.

    ``TypeError`` naming ``name`` for another type (pathlib's own named nothing), ``ValueError`` for a NUL (no file
    name holds one: the OS calls raised an unnamed "embedded null byte", and ``is_file()`` said False, "not found").
    """
    if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
        raise TypeError(f"{name} must be a str or os.PathLike naming {what}, got {path!r} of type {type(path).__name__}")
    if "\0" in os.fspath(path):
        raise ValueError(f"{name} must name a file, without a NUL character ('\\0'), got {os.fspath(path)!r}")
    return Path(path)


def special_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is when it is a device, a named pipe or a socket (``"a named pipe"``), else ``""``."""
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return ""


def open_to_read(path, check):
    """``(file, st)``: ``path`` opened once to read (binary, a link followed), ``st`` the ``fstat`` of that very handle.

    Opened without blocking (a named pipe's plain open waits for a writer, forever), then ``check(st)`` decides (it
    raises to refuse the file; the handle is closed), then the handle is made blocking again for the reads. Checking
    the path only, instead, would check a file that can be replaced before its open. A device or socket at the path
    is given to ``check`` before any open, since opening one can act: a serial port resets the board behind it, a
    watchdog starts (``O_NOCTTY`` too: a terminal never becomes this process's controlling one). That stat may only
    refuse; what is read is still decided by the handle's own. Checkpoints and CSV files open here.
    """
    try:
        before = os.stat(path)
    except (OSError, ValueError):  # the open below names the failure, as it always did
        before = None
    if before is not None and (stat.S_ISCHR(before.st_mode) or stat.S_ISBLK(before.st_mode) or stat.S_ISSOCK(before.st_mode)):
        check(before)
    # O_BINARY where it exists (Windows): os.open's default there is text mode (CR LF read as LF, Ctrl-Z as the end)
    nonblock = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblock | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        check(st)
        if nonblock:  # only where it was set: Windows has no O_NONBLOCK, and its set_blocking refuses a file (3.12+)
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def check_int(name: str, value, *, low: int = 1, high: int | None = None) -> int:
    """Return ``value`` as an int after checking it is an integer >= ``low`` (Python, NumPy, or a 0-d integer array).

    With ``high``, also ``<= high`` (``2**63 - 1`` is named as such in the message): for counts that later
    become an int64 or a float64, so that a larger one is this ``ValueError`` naming ``name``, not an
    ``OverflowError`` (or NumPy's unnamed error) wherever it is first converted.
    """
    value = scalar_of(value, "iu")
    span = f">= {low}" if high is None else f"in [{low}, {_bound_text(high)}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer {span}, got {value!r} of type {type(value).__name__}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {span}, got {value!r}")
    return int(value)


def _bound_text(high: int) -> str:
    """``high`` for a message: the int64 limits by name (``2**63 - 1``, ``2**63 - 2``), others as digits."""
    return {2**63 - 1: "2**63 - 1", 2**63 - 2: "2**63 - 2"}.get(high, str(high))


SEED_MAX = 2**63 - 1


def check_seed(name: str, value) -> int:
    """Return ``value`` as an int after checking it is a seed: an integer in ``[0, SEED_MAX]`` (``SEED_MAX = 2**63 - 1``).

    The one seed domain of every seeded object (``ClientForecasters``,
    ``ForecasterSignals``, ``Pipeline``, ``NoisyLastValueSignals``,
    ``DaskPopulation``, the synthetic streams, ``run_experiment`` and the
    CLI's ``--seed``): the counter-based noise keys take a signed 64-bit seed,
    so the largest domain every seeded object can honour is that of an int64
    >= 0. Python and NumPy integers and 0-d integer arrays are accepted; a
    bool, a float (even ``3.0``) or anything else is a ``TypeError``, a
    negative or larger integer a ``ValueError``, both with the same message.
    """
    value = scalar_of(value, "iu")
    message = f"{name} must be an integer in [0, 2**63 - 1], got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{message} of type {type(value).__name__}")
    if not 0 <= value <= SEED_MAX:
        raise ValueError(message)
    return int(value)


def check_bool(name: str, value) -> bool:
    """Return ``value`` as a bool after checking it is one (Python's or NumPy's); ``1``, ``"no"``, ``None`` refused.

    A flag is never read for its truthiness: ``record="no"`` would otherwise mean True.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}")
    return bool(value)


def binary_exponent(*arrays: np.ndarray) -> int:
    """``e`` such that the largest ``|entry|`` of ``arrays``, times ``2**-e``, is in ``[0.5, 1)`` (0 when all are 0).

    The one power-of-two scaling of the package: dividing by ``2**e`` changes
    only the exponents (no digit is lost, whatever the magnitude, unless a
    quotient falls below ``2**-1022``, into the subnormal range: an entry more
    than about ``2**1021`` times smaller than the largest), and the quotients
    are below 1 in magnitude, so their squares, sums and means cannot overflow.
    The certificates solve on inputs times ``2**-e`` and scale their results
    back; :func:`memoa_fast.timeseries.streams.unit_scale` z-scores under
    ``2**e``. The callers pass finite arrays; a NaN or an infinite entry
    anywhere gives 0 (``math.frexp``'s exponent of inf), in any order of the
    arrays.
    """
    tops = [float(np.max(np.abs(a))) for a in arrays if a.size]
    top = max(tops, default=0.0)
    if any(math.isnan(v) for v in tops):  # max() keeps a number met before a NaN: NaN is 0 wherever it stands
        return 0
    return math.frexp(top)[1] if top > 0.0 else 0


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_backend(backend) -> str:
    return check_choice("backend", backend, BACKENDS)


def numba_thread_limit() -> int | None:
    """Numba's thread limit ``NUMBA_NUM_THREADS``, without importing Numba; ``None`` if not set.

    When Numba is already imported its own ``numba.config.NUMBA_NUM_THREADS``
    is read (it is fixed at import); otherwise the environment variable, which
    Numba will read when it is imported. An unset (or unreadable) variable
    means Numba will start one thread per CPU of the machine, which is never
    fewer than the affinity mask holds, so it is no extra cap.
    """
    numba = sys.modules.get("numba")
    config = getattr(numba, "config", None)
    if config is not None and hasattr(config, "NUMBA_NUM_THREADS"):
        return int(config.NUMBA_NUM_THREADS)
    raw = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 1 else None


def affinity_cpus() -> int:
    """CPUs this process may run on: ``len(os.sched_getaffinity(0))`` where it exists, else ``os.cpu_count()``."""
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1


def available_threads() -> int:
    """The default and largest thread count: :func:`affinity_cpus`, capped by :func:`numba_thread_limit`."""
    n = affinity_cpus()
    limit = numba_thread_limit()
    return n if limit is None else max(1, min(n, limit))


def check_threads(threads) -> int:
    """``None`` means every CPU this process may use; otherwise an int in [1, :func:`available_threads`].

    The limit is the affinity mask (``taskset``, cgroup cpusets, batch
    schedulers) capped by Numba's ``NUMBA_NUM_THREADS``; ``os.cpu_count()``,
    the machine's CPUs, is never used where the mask is known.
    """
    limit = available_threads()
    if threads is None:
        return limit
    threads = check_int("threads", threads, low=1)
    if threads > limit:
        raise ValueError(
            f"threads must be in [1, {limit}], got {threads}: this process may use {affinity_cpus()} CPU(s) "
            f"(affinity mask) and Numba's limit NUMBA_NUM_THREADS is {numba_thread_limit() or 'unset'}"
        )
    return threads


# --------------------------------------------------------------------------- sizes and memory
#: The largest count any size argument may take (NumPy's index type is int64).
MAX_COUNT = 2**63 - 1


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (cgroup v2): no limit
        return None
    value = int(text)
    return value if value < 2**60 else None  # cgroup v1 writes ~2**63 for "no limit"


def available_memory() -> int | None:
    """Bytes of memory this process may use, or ``None`` if nothing is known.

    The smallest of: physical memory (``SC_PHYS_PAGES x SC_PAGE_SIZE``), the
    cgroup limit (``/sys/fs/cgroup/memory.max``, v2, or
    ``/sys/fs/cgroup/memory/memory.limit_in_bytes``, v1) when one is set, and
    the address-space limit ``RLIMIT_AS`` when it is finite. These are limits,
    not the memory free right now (which changes from moment to moment).
    """
    limits = []
    try:
        limits.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        value = _read_limit(path)
        if value is not None:
            limits.append(value)
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            limits.append(soft)
    except (ImportError, ValueError, OSError):
        pass
    limits = [v for v in limits if v > 0]
    return min(limits) if limits else None


def gib(n_bytes: int) -> str:
    """``n_bytes`` in GiB to 3 significant digits, for a message, for any int.

    ``n_bytes / 2**30`` is a float: an ``OverflowError`` beyond about 1.8e308 bytes (which a count such as
    ``lags=10**400`` reaches), raised in place of the ``ValueError`` the message was for; a ``Decimal`` there.
    """
    try:
        return f"{n_bytes / 2**30:.3g}"
    except OverflowError:
        return format(decimal.Decimal(n_bytes) / decimal.Decimal(2**30), ".3g")


def check_sizes(n_agents, dim=1, *, per_agent_vectors: int = 1, per_agent_scalars: int = 1, what: str = "population",
                names: tuple[str, str] = ("n_agents", "dim"), extra_bytes: int = 0, detail: str = "",
                advice: str = "use fewer agents, or shard the population over several machines") -> tuple[int, int]:
    r"""Check ``n_agents`` and ``dim`` and that the arrays they imply fit in memory; return them as ints.

    The arrays are ``per_agent_vectors`` float64 arrays of shape (N, d) and
    ``per_agent_scalars`` of shape (N,) (for a population: the states, the
    costs and, with several classes, the labels), that is

    .. math:: \text{bytes} = 8 N (v d + s).

    Parameters
    ----------
    n_agents, dim : int
        ``N >= 1`` and ``d >= 1``, each below ``2**63`` and with ``N d < 2**63``.
    per_agent_vectors, per_agent_scalars : int
        How many (N, d) and (N,) 8-byte arrays the object allocates.
    what : str
        What is being built, for the message.
    names : (str, str or None)
        The caller's names of the two counts (e.g. ``("n_clients", "dim")``), for the messages; ``None``
        for a second count that is always 1 (left out of the message).
    extra_bytes : int
        Bytes allocated besides the per-agent arrays (e.g. a random block), added to the total.
    detail : str
        Other arguments that set the size (e.g. ``", lags=2"``), shown after the counts in the message.
    advice : str
        What the caller can do instead, ending the message.

    Raises
    ------
    TypeError
        ``n_agents`` or ``dim`` is not an integer (bool included).
    ValueError
        A count out of range, or arrays that would need more bytes than
        :func:`available_memory` (the message gives both numbers): refused
        before anything is allocated, instead of NumPy's ``MemoryError`` or
        the kernel's out-of-memory killer.
    """
    n_agents, dim = scalar_of(n_agents, "iu"), scalar_of(dim, "iu")
    for name, value in zip(names, (n_agents, dim)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an integer >= 1, got {value!r} of type {type(value).__name__}")
        if value < 1 or value > MAX_COUNT:
            raise ValueError(f"{name} must be an integer in [1, 2**63 - 1], got {value!r}")
    n, d = int(n_agents), int(dim)
    if n * d > MAX_COUNT:
        raise ValueError(f"{names[0]} * {names[1]} must be < 2**63 (NumPy's largest array), got {names[0]}={n}, {names[1]}={d}")
    needed = 8 * n * (per_agent_vectors * d + per_agent_scalars) + extra_bytes
    available = available_memory()
    if available is not None and needed > available:
        owner = f"{what}'" if what.endswith("s") else f"{what}'s"
        raise ValueError(
            f"{names[0]}={n}{f', {names[1]}={d}' if names[1] else ''}{detail}: the {owner} arrays need {needed:,} bytes "
            f"({gib(needed)} GiB), more than "
            f"the {available:,} bytes ({gib(available)} GiB) this process may use (physical memory, cgroup "
            f"and RLIMIT_AS limits); {advice}"
        )
    return n, d


def check_real_dtype(name: str, dtype) -> None:
    """Raise ``TypeError`` unless ``dtype`` is a real integer or floating dtype.

    Refused: bool, complex (an imaginary part would be dropped), strings and
    bytes (numeric strings are not numbers), datetime64/timedelta64, object
    (``None`` would become NaN), void and structured dtypes.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise TypeError(
            f"{name} must hold real numbers (an integer or floating dtype), got dtype {dtype} ({_KIND_NAMES.get(dtype.kind, 'other')})"
        )


_KIND_NAMES = {
    "b": "bool", "c": "complex", "U": "string", "S": "bytes", "O": "object: Python objects, e.g. None",
    "M": "datetime64", "m": "timedelta64", "V": "void/structured",
}


def as_real_values(name: str, value, accepted: str) -> np.ndarray:
    """``value`` (a real number, or a sequence or array of them) as a new float64 array, its dtype checked first.

    For the small per-class arguments (weights, shares). Refused with
    ``TypeError`` naming ``name`` and ``accepted``, instead of being cast:
    strings (also numeric ones, and string arrays), ``None``, bools, complex
    numbers (an imaginary part would be dropped), datetimes, and object
    arrays holding anything but real numbers (``None`` would become NaN).
    ``fractions.Fraction``, ``decimal.Decimal`` and NumPy scalars are real
    numbers and accepted.
    """
    def refuse(detail):
        raise TypeError(f"{name} must be {accepted}, got {value!r}{detail}")

    if isinstance(value, (str, bytes, bool, np.bool_)) or value is None:
        refuse(f" of type {type(value).__name__}")
    if isinstance(value, np.ndarray) and value.dtype.kind != "O":
        raw = value
    else:  # a sequence: look at every element, so that [True, 0.5] is not read as [1.0, 0.5]
        try:
            raw = np.asarray(value, dtype=object) if not isinstance(value, np.ndarray) else value
        except (TypeError, ValueError) as exc:  # ragged
            refuse(f": {exc}")
        for item in raw.reshape(-1):
            item = scalar_of(item, "iuf")  # a 0-d array of a real dtype (an npz entry) is a number
            if isinstance(item, (bool, np.bool_)) or not isinstance(item, (numbers.Real, decimal.Decimal)):
                refuse(f": {item!r} of type {type(item).__name__} is not a real number")
        try:
            with np.errstate(over="ignore"):  # a long double beyond float64: named below, not NumPy's RuntimeWarning
                converted = np.asarray(value, dtype=np.float64)
        except OverflowError:  # an int or Fraction beyond float64 (10**400)
            converted = None
        except (TypeError, ValueError) as exc:
            refuse(f": {exc}")
        if converted is None or not np.isfinite(converted).all():  # a Decimal or long double 1e400 is inf: not "got inf"
            _refuse_beyond_float64(name, accepted, raw)
        raw = raw if converted is None else converted
    if raw.dtype.kind not in "iuf":
        refuse(f" of dtype {raw.dtype} ({_KIND_NAMES.get(raw.dtype.kind, 'other')})")
    with np.errstate(over="ignore"):
        out = np.array(raw, dtype=np.float64)
    if raw.dtype.itemsize > 8 and not np.isfinite(out).all():  # a long double array
        _refuse_beyond_float64(name, accepted, raw)
    return out


def _beyond_float64(value) -> bool:
    """Whether the real number ``value`` is finite but beyond float64's range (10**400, ``Decimal('1e400')``, a long double).

    ``float()`` raises OverflowError for an int or Fraction, and returns ``inf`` for a Decimal or long double.
    """
    try:
        number = float(value)
    except OverflowError:
        return True
    return math.isinf(number) and bool(abs(value) != math.inf)


def _refuse_beyond_float64(name: str, accepted: str, values: np.ndarray) -> None:
    """Raise ValueError naming the first entry of ``values`` (the argument ``name`` as given) beyond float64, if any."""
    flat = values.reshape(-1)
    j = next((i for i, item in enumerate(flat) if _beyond_float64(item)), None)
    if j is not None:
        where = f"{name}[{j}]" if values.ndim == 1 else name
        raise ValueError(f"{where} must be a finite float64 (at most 1.8e308 in magnitude), got {_short(flat[j])}; "
                         f"{name} must be {accepted}")


def _short(value) -> str:
    """``repr(value)``, its middle cut when long (10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:28]}...{text[-28:]} ({len(text)} characters)"


#: Up to this many entries, :func:`_within` and :func:`_probably_finite` check them one by one in Python (~0.5 us
#: for 16), which beats ufunc reductions (~1 us each, ~3 us more inside ``np.errstate``): a small step's per-call cost.
_FEW = 64
#: The largest finite double: ``|x| <= _LARGEST`` holds exactly for the finite ``x`` (not for NaN or inf).
_LARGEST = float(np.finfo(np.float64).max)


def _probably_finite(arr: np.ndarray) -> bool:
    """True when every entry is finite, False when not sure, with no N-sized temporary.

    A few entries are checked exactly; more by their sum, which is finite when
    every entry is (one pass, no mask); an overflowing sum just sends the
    caller to the exact check.
    """
    if arr.size <= _FEW:
        return _within(arr, _LARGEST)
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(arr, axis=None)))


def _kernel_ready(arr: np.ndarray) -> np.ndarray:
    """A read-only or unaligned C-contiguous float64 array as an array of the type the compiled kernels were built for.

    Numba compiles every kernel again for each new array type, and a read-only
    array (``Population.states``, ``np.broadcast_to``, ``flags.writeable =
    False``) is one: its first step took 9 s more with an empty cache, and
    every parallel and K-class variant again. The arrays this module returns
    are only read (every object copies what it keeps), so a read-only array
    whose memory is writeable comes back as a writeable view of the same
    memory (no copy, the caller's array keeps its flag); read-only memory
    (``np.frombuffer`` of bytes) and an unaligned array come back as a copy.

    The commonest such argument is an object's live read-only view of a whole
    buffer of its own (``server.update(pop.states, y)``, ``pop.step(forecasters.observe(y))``):
    then the base itself is returned, with no new view (making a view writeable
    costs NumPy ~0.6 us, a tenth of a small population's step). A C-contiguous
    view with the same dtype and shape as its C-contiguous ndarray base spans
    the same bytes (a view lies within its base), so it starts where the base
    does: it is the base.
    """
    base = arr.base
    if type(base) is np.ndarray:
        flags = base.flags
        if flags.c_contiguous and flags.writeable and flags.aligned and base.shape == arr.shape and base.dtype is arr.dtype:
            return base
    if arr.flags.aligned:
        view = arr.view()
        try:
            view.flags.writeable = True
            return view
        except ValueError:  # the memory itself is read-only
            pass
    return arr.copy()


def real_array(name: str, value) -> np.ndarray:
    """``value`` as a NumPy array of a real integer or floating dtype, not cast yet (any shape; no copy of an array).

    The one reading of "an array of real numbers" that the public arguments go
    through: NumPy subclasses unwrapped first (:func:`plain_array`: a masked
    entry is refused, not read beneath its mask), ragged sequences and every
    dtype a cast would change (:func:`check_real_dtype`) refused with
    ``TypeError`` naming ``name``.
    """
    value = plain_array(name, value)
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of real numbers, got {type(value).__name__}: {exc}") from None
    if raw.dtype.kind == "O":
        # NumPy stores Python ints beyond int64 as objects: name the value, which "e.g. None" would not describe.
        big = next((v for v in raw.flat if type(v) is int and not -2**63 <= v < 2**63), None)
        if big is not None:
            shown = f"{big!r}" if len(str(big)) <= 40 else f"of {len(str(abs(big)))} digits"
            advice = f"e.g. {float(big)!r}" if abs(big) <= _LARGEST else "beyond float64 too"
            raise TypeError(f"{name} must hold real numbers (an integer or floating dtype), got dtype object (object: "
                            f"the Python int {shown} is beyond int64, so NumPy stores Python objects): pass floats "
                            f"({advice}) or an array of a float dtype")
    check_real_dtype(name, raw.dtype)
    return raw


def as_float64(raw: np.ndarray, *, copy: bool = False) -> np.ndarray:
    """The real array ``raw`` (:func:`real_array`'s) as a C-contiguous float64 array; a new one if ``copy``.

    The one cast of the checked arrays: a long double beyond float64 becomes ``inf`` silently, for the caller's
    finiteness check to name with its argument, index and value (NumPy's "overflow encountered in cast" names
    nothing, and with warnings as errors it was raised first, as the exception).
    """
    if raw.dtype.kind == "f" and raw.dtype.itemsize > 8:  # long double: the only real dtype a float64 cast overflows
        with np.errstate(over="ignore"):
            return np.array(raw, dtype=np.float64, order="C", copy=True)
    return np.array(raw, dtype=np.float64, order="C", copy=True if copy else None)


def as_float_array(name: str, value, shape: tuple[int, ...], *, allow_nonfinite: bool = False) -> np.ndarray:
    """Return ``value`` as a C-contiguous float64 array of exactly ``shape``.

    No copy is made when ``value`` already is one; ``(N,)`` is accepted for
    ``(N, 1)`` so scalar streams need no reshaping. Only real integer and
    floating data is accepted (NumPy arrays of those dtypes, Python numbers
    and nested lists of them); bool, complex, strings, datetimes and object
    arrays raise ``TypeError`` naming ``name`` and the dtype, instead of being
    cast.
    """
    if type(value) is not np.ndarray:  # one type test for a plain array (the call costs more than the test)
        value = plain_array(name, value)
    if isinstance(value, np.ndarray) and value.dtype == np.float64 and (flags := value.flags).c_contiguous:
        arr = value if flags.writeable and flags.aligned else _kernel_ready(value)
    else:
        arr = np.ascontiguousarray(as_float64(real_array(name, value)))  # (a scalar as shape (1,): read as (1, 1) too)
    if arr.shape != shape:
        if len(shape) == 2 and shape[1] == 1 and arr.shape == shape[:1]:
            arr = arr.reshape(shape)
        elif len(shape) == 1 and shape == (1,) and arr.ndim == 0:
            arr = arr.reshape(shape)
        else:
            raise ValueError(f"{name} must have shape {shape} (ndim {len(shape)}), got shape {arr.shape} (ndim {arr.ndim})")
    # The sum is finite when every entry is (bar overflow, checked exactly
    # below): one pass and no N-sized mask in the common case.
    if not allow_nonfinite and not _probably_finite(arr) and not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} must be finite; first non-finite entry at index {tuple(int(b) for b in bad)}: {arr[tuple(bad)]!r}")
    return arr


#: The largest magnitude a stream's value (a target) may have: the forecasters square their lagged
#: observations, so beyond about 1e154 their features overflow; 1e30 leaves room for the noise and the sums.
TARGET_LIMIT = 1e30


def _within(arr: np.ndarray, limit: float) -> bool:
    """Whether every entry has ``|entry| <= limit`` (False for NaN): no temporary, ~0.3 us for a few entries."""
    if arr.size <= _FEW:
        return all(-limit <= v <= limit for v in arr.ravel().tolist())
    return max(-float(np.minimum.reduce(arr, axis=None)), float(np.maximum.reduce(arr, axis=None))) <= limit


def check_bounded(name: str, arr: np.ndarray, limit: float, why: str, advice: str = "Z-score the stream first.") -> None:
    """Raise ``ValueError`` unless every entry of the finite array ``arr`` has ``|entry| <= limit``.

    No temporary when every entry is within the limit; the message names the
    first entry beyond it, ``why``, and ``advice``.
    """
    if arr.size == 0 or _within(arr, limit):
        return
    bad = np.argwhere(~(np.abs(arr) <= limit))[0]
    where = f"coordinate {int(bad[0])}" if arr.ndim == 1 else f"index {tuple(int(b) for b in bad)}"
    entries = "coordinate" if arr.ndim == 1 else "entry"
    raise ValueError(f"{name} must have |{name}| <= {limit:g} in every {entries} ({why}); "
                     f"got {float(arr[tuple(bad)])!r} at {where}. {advice}")


#: Why a target is bounded, for the messages.
_TARGET_WHY = "larger values would overflow the clients' squared features"


def as_target_array(name: str, value, shape: tuple[int, ...]) -> np.ndarray:
    """A stream's value(s) as :func:`as_float_array` returns them, finite and with every ``|entry| <= TARGET_LIMIT``.

    Every object that learns from a stream (the forecasters, the fused
    pipeline, the trust classes, the squared errors) checks its targets here,
    so that one value that would overflow a forecaster's squared features,
    or poison an error average with NaN, is refused before anything changes.
    One check covers both (NaN fails ``|y| <= limit``); the messages are
    built only on failure: "must be finite" for NaN or inf, else the limit.
    """
    arr = as_float_array(name, value, shape, allow_nonfinite=True)
    if not _within(arr, TARGET_LIMIT):
        as_float_array(name, arr, shape)  # NaN or inf: the "must be finite" message
        check_bounded(name, arr, TARGET_LIMIT, _TARGET_WHY)
    return arr


def as_steps(name: str, value) -> np.ndarray:
    """``value`` as an array of steps, shape (T, N, d) or (T, N), for a ``run(signals)``; no copy of an array.

    Each step is checked by ``step`` itself; here, what NumPy would report without
    the argument's name: ragged lists, objects, and the wrong number of dimensions.
    """
    try:
        arr = np.asarray(plain_array(name, value))
    except (TypeError, ValueError) as exc:  # ragged lists and the like
        raise TypeError(f"{name} must be an array of real numbers of shape (T, n_agents, dim), got "
                        f"{type(value).__name__}: {exc}") from None
    if arr.dtype.kind == "O":
        raise TypeError(f"{name} must be an array of real numbers of shape (T, n_agents, dim), got dtype object "
                        f"({type(value).__name__})")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must have shape (T, n_agents, dim), got shape {arr.shape}")
    return arr


def readonly_view(arr: np.ndarray) -> np.ndarray:
    """A read-only view of ``arr``: the live buffer a property hands out, which callers cannot write through."""
    view = arr.view()
    view.flags.writeable = False
    return view


def check_out(out, shape: tuple[int, ...], *, contiguous: bool = False) -> np.ndarray:
    """The array a result of ``shape`` is written into: a new one when ``out`` is None, else ``out`` checked.

    TypeError when ``out`` is not a float64 NumPy array, ValueError when it is one of the wrong shape, read-only
    or (with ``contiguous``) not C-contiguous, as NumPy's own ``out=`` arguments; both messages name what is
    accepted and what came.
    """
    if out is None:
        return np.empty(shape)
    layout = " C-contiguous" if contiguous else ""
    accepted = f"out must be a writeable{layout} float64 numpy array of shape {shape}"
    got = f"{type(out).__name__} {getattr(out, 'dtype', '')} {getattr(out, 'shape', '')}".strip()
    if not (isinstance(out, np.ndarray) and out.dtype == np.float64):
        raise TypeError(f"{accepted}, got {got}")
    if out.shape != shape or not out.flags.writeable or (contiguous and not out.flags.c_contiguous):
        flags = "" if out.flags.writeable else ", read-only"
        flags += "" if out.flags.c_contiguous or not contiguous else ", not C-contiguous"
        raise ValueError(f"{accepted}, got {got}{flags}")
    return out


def plain_array(name: str, value):
    """``value`` with NumPy's array subclasses unwrapped (no copy), before any array check reads it.

    - a masked array (:mod:`numpy.ma`) with no masked entry: its data; with a
      masked entry, ``TypeError`` naming ``name``: ``np.asarray`` would read
      the hidden values underneath the mask as data;
    - ``np.matrix`` and every other ``ndarray`` subclass: a plain ndarray view
      of it (for a matrix ``**`` is a matrix power and ``*`` a product, and a
      row is 2-D);

    anything else (plain arrays included) is returned unchanged. One type test
    for a plain array.
    """
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        if isinstance(value, np.ma.MaskedArray):
            if np.ma.is_masked(value):
                raise TypeError(
                    f"{name} is a masked array with {int(np.ma.count_masked(value))} masked entries, which would be "
                    f"read as the values beneath the mask: fill them first (e.g. {name}.filled(np.nan), where a NaN "
                    "is accepted), or pass a plain array")
            return value.data.view(np.ndarray)
        return value.view(np.ndarray)
    return value


def outside_stacklevel() -> int:
    """``stacklevel`` for the caller's :func:`warnings.warn`: the first frame outside memoa_fast (the user's line).

    A warning about what the user passed should point at the user's line, whichever path inside the package led
    to it: the default filter shows a warning once per location, so one placed inside the package was shown for
    the first call from anywhere only.
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").partition(".")[0] == "memoa_fast":
        frame, level = frame.f_back, level + 1
    return level


def issue_notices(notices) -> None:
    """Issue each distinct ``(category, message)`` of ``notices`` once, in order, at the user's line (:func:`outside_stacklevel`).

    The package's validators report what they would warn about (a saved state in an old format that still loads) as
    such pairs, and the code that has the user issues them: a Dask shard's check runs in a worker thread, where a
    warning would be shown on the worker (or, with workers as threads, under the user's filters, as the shard's
    exception with an ``error`` filter), and where capturing it (``warnings.catch_warnings``) would swap the warning
    filters of the whole process, every thread's, which is not thread-safe.
    """
    issued = []
    for category, message in notices:
        if (category, message) not in issued:
            issued.append((category, message))
            warnings.warn(message, category, stacklevel=outside_stacklevel())


#: The package's ``validate_state_dict`` functions that issue exactly what ``self._validated(state)`` returns
#: (:func:`issues_what_validated_returns`): for them, and only them, ``_validated`` is the same check, quiet.
_ISSUING_VALIDATORS: set = set()


def issues_what_validated_returns(fn):
    """Mark ``fn``, a ``validate_state_dict`` that is ``clean, notices = self._validated(state)``, :func:`issue_notices`, ``clean``.

    :func:`quietly_validated` calls a source's ``_validated`` only when its ``validate_state_dict`` is such a function:
    ``_validated`` is a private name, which a user's class may define for its own purpose.
    """
    _ISSUING_VALIDATORS.add(fn)
    return fn


def quietly_validated(source, state):
    """``source.validate_state_dict(state)`` without issuing its warnings: ``(clean, [(category, message), ...])``.

    A source whose ``validate_state_dict`` is one of the package's that issue what ``source._validated`` returns
    (:func:`issues_what_validated_returns`) is asked ``_validated``, which issues nothing: the same check, the same
    clean copy, its notices as data, for the caller to issue (:func:`issue_notices`). Any other validator (a user's
    source, or a subclass that overrides ``validate_state_dict``) is called plainly, its own checks kept: what it warns
    is issued where it runs, and the notices are ``[]``. The rule is the function ``validate_state_dict`` resolves to
    on this object, not where ``_validated`` is defined: a subclass's ``_validated`` is then what both paths run.
    """
    return source._validated(state) if validates_quietly(source) else (source.validate_state_dict(state), [])


def validates_quietly(source) -> bool:
    """Whether ``source.validate_state_dict`` is one of the package's that issue what ``source._validated`` returns.

    Then ``source._validated`` is the same check, quiet (:func:`quietly_validated`).
    """
    validate = getattr(source, "validate_state_dict", None)
    return getattr(validate, "__func__", None) in _ISSUING_VALIDATORS and getattr(validate, "__self__", None) is source


#: The package's ``load_state_dict`` functions, each mapped to the function that installs a checked clean copy for it
#: (:func:`installs_checked`, :func:`checked_installer`).
_CHECKED_LOADERS: dict = {}


def installs_checked(install):
    """Mark a ``load_state_dict`` that is ``install(self, self.validate_state_dict(state))``, and nothing else.

    ``install(source, clean)`` installs a clean copy as the source's validator returned it, checking nothing:
    :func:`checked_installer` hands it to a caller that validated the state already (a Dask shard, a restore),
    so that an O(N) state is checked once per restore, not once more by the load.
    """
    def mark(fn):
        _CHECKED_LOADERS[fn] = install
        return fn

    return mark


def checked_installer(source):
    """The package function that installs on ``source`` a clean copy of :func:`quietly_validated`, else ``None``.

    ``install(source, clean)`` does what ``source.load_state_dict(state)`` does once its own check has returned
    ``clean``. Given only when both hold on this object (bound to it, as :func:`validates_quietly`): its
    ``validate_state_dict`` is one of the package's quiet ones, so ``clean`` is what the load's own check returns,
    and its ``load_state_dict`` is one of the package's marked with :func:`installs_checked`, so the installer is all
    the load does besides. A subclass that overrides either (a stricter check, a load that does more) gets ``None``:
    its own ``load_state_dict`` is the one to call. The installer is the registered function, never looked up by
    name on ``source``: a user's method of the same private name is not taken for it.
    """
    if not validates_quietly(source):
        return None
    load = getattr(source, "load_state_dict", None)
    if getattr(load, "__self__", None) is not source:
        return None
    return _CHECKED_LOADERS.get(getattr(load, "__func__", None))


def load_checked(source, clean) -> None:
    """Load ``clean``, a state ``source``'s own check returned, into ``source``, checking it again only where that is not ours to skip.

    The package's installer when :func:`checked_installer` gives one (nothing checked twice), else ``source.load_state_dict(clean)``
    (a subclass's own load, which does what it does).
    """
    install = checked_installer(source)
    if install is None:
        source.load_state_dict(clean)
    else:
        install(source, clean)
