"""Garbage-collector settings and memory habits of a process that holds a large, long-lived heap.

Shared by the controller (``tether up``) and the fleet simulator: both keep thousands of
parsed models alive for hours. With CPython's default thresholds (700, 10, 10) a young
collection runs every 700 allocations, and full collections walk the whole heap again
and again: parsing 10,000 device rows in the controller spent more time in the collector
than in pydantic (0.60 s against 0.26 s), and the collector was 40 % of the simulator's
CPU at 10,000 devices. :func:`tune_gc` moves what is alive out of the collector's sight
(``gc.freeze``) and makes young collections run every 50,000 allocations. Nothing leaks:
reference counting still frees almost everything at once, and new cycles are still
collected. A device agent holds one device's state and does not need it.

Two more habits keep the controller's memory near what it holds (issue 21): every parsed
model it keeps shares its field-name set with the models of the same shape
(:func:`share_field_sets`: pydantic gives each instance a set of its own, 728 bytes for a
dozen names, two thirds of a small model) and its equal strings, label dicts and empty
dicts, and after a burst of messages the C allocator's
free memory goes back to the system (:func:`release_free_memory`: glibc keeps what a burst
took, and the process's RSS with it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, Self, TypeVar

from pydantic import BaseModel

__all__ = [
    "GC_THRESHOLDS",
    "FreeMemoryReleaser",
    "Kept",
    "release_free_memory",
    "share_field_sets",
    "tune_gc",
]

M = TypeVar("M", bound=BaseModel)
K = TypeVar("K")
V = TypeVar("V")


class Shared(Generic[K, V]):
    """One kept value per key, the one equal values share (values are never written to).

    Bounded: forgotten whole when ``size`` keys are kept (what a fleet reports alike comes
    and goes with versions and generations; a flood of distinct keys costs nothing kept)."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._kept: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value kept for ``key``; ``make()`` kept first if none is."""
        kept = self._kept.get(key)
        if kept is None:
            if len(self._kept) >= self.size:
                self._kept.clear()
            kept = self._kept[key] = make()
        return kept


class MadeOnce(Generic[K, V]):
    """What is made of each of the objects seen lately, made once per object (by identity).

    For values many messages share (``codec.FieldMemo`` gives one per distinct encoding: a
    fleet's reported stacks): what is made of one is then made once, not per message. Each
    object is kept with what was made of it, so that its identity is not reused meanwhile;
    bounded (forgotten whole when ``size`` are kept)."""

    def __init__(self, make: Callable[[K], V], size: int = 256) -> None:
        self.make = make
        self.size = size
        self._made: dict[int, tuple[K, V]] = {}

    def get(self, value: K) -> V:
        """``make(value)``, made once for this very ``value``."""
        known = self._made.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        made = self.make(value)
        if len(self._made) >= self.size:
            self._made.clear()
        self._made[id(value)] = (value, made)
        return made


GC_THRESHOLDS = (50_000, 20, 10)
"""Young collections every 50,000 allocations (CPython's default: 700, 10, 10)."""


def tune_gc() -> None:
    """Freeze what is alive now and set :data:`GC_THRESHOLDS`; call once start-up is done."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


_FIELD_SETS: dict[frozenset[str], set[str]] = {}
_SHARED_SETS: dict[int, set[str]] = {}
"""The sets of :data:`_FIELD_SETS` by identity: a frozen model holding one of them was shared
whole already (:func:`_share` gives it one, then shares everything in it; kept models are
never changed), so sharing it again is one look-up, not a walk (a deploy's 10,000 desired
records hold the same stack references; a deployment's devices, a few shared rollouts)."""
_MAX_FIELD_SETS = 4096


def share_field_sets(model: M) -> M:
    """``model``, each frozen model in it (nested in fields, dicts, tuples and lists) holding
    the one shared set of the field names it was given, instead of a set of its own.

    Safe for frozen models only, which is all this touches: pydantic adds to a model's set
    only when a field is assigned (refused when frozen), and ``model_copy`` copies the set
    before adding to it. Returns ``model`` itself."""
    _share(model)
    return model


_MAX_SHARED_STR = 256
"""Longer strings (messages, texts) are seldom repeated: left as they are."""


_EMPTY: dict[Any, Any] = {}
"""The empty dict of every kept model's empty dict field (most labels and addresses): 64
bytes each otherwise, four per device. Never written to (tests/unit/test_heap.py checks)."""


_STR_DICTS: Shared[tuple[tuple[str, str], ...], dict[str, str]] = Shared()
"""One dict per set of string items (in order) kept models have: labels repeat across a fleet
(bounded: a fleet has few label sets, whatever comes)."""
_MAX_STR_DICT = 32


def _str(value: str) -> str:
    """The one interned copy of ``value`` (equal, so nothing reads differently). Interned
    strings still go when nothing else holds them (CPython's interned strings are mortal)."""
    return sys.intern(value) if type(value) is str and len(value) <= _MAX_SHARED_STR else value


_PLAIN = frozenset({int, float, bool, type(None)})
"""Field values with nothing in them to share (looked up by type: an ``isinstance`` against
pydantic's model class costs more)."""


def _share(value: Any) -> None:
    if isinstance(value, BaseModel):
        if not value.model_config.get("frozen"):
            for item in value.__dict__.values():
                if isinstance(item, (BaseModel, dict, tuple, list)):
                    _share(item)
            return
        names = value.__pydantic_fields_set__
        if _SHARED_SETS.get(id(names)) is names:
            return  # shared whole already
        _give_shared_set(value, names)
        fields = value.__dict__
        for name, item in fields.items():  # values replaced by equal ones: the dict keeps its size
            if type(item) in _PLAIN:
                continue
            if isinstance(item, str):
                fields[name] = _str(item)
            elif isinstance(item, dict):
                fields[name] = _shared_dict(item)
            elif isinstance(item, tuple):
                fields[name] = _shared_tuple(item)
            elif isinstance(item, (BaseModel, list)):
                _share(item)
    elif isinstance(value, dict):
        for item in value.values():
            if isinstance(item, (BaseModel, dict, tuple, list)):
                _share(item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            if isinstance(item, (BaseModel, dict, tuple, list)):
                _share(item)


def _give_shared_set(value: BaseModel, names: set[str]) -> None:
    """Give ``value`` (frozen, holding ``names``) the one shared set equal to ``names``."""
    shared = _shared_set(names)
    if shared is not names:
        object.__setattr__(value, "__pydantic_fields_set__", shared)


def _shared_set(names: set[str]) -> set[str]:
    shared = _FIELD_SETS.get(frozenset(names))
    if shared is None:
        if len(_FIELD_SETS) >= _MAX_FIELD_SETS:  # bounded: shapes are few, whatever comes
            _FIELD_SETS.clear()
            _SHARED_SETS.clear()
        shared = _FIELD_SETS[frozenset(names)] = names
        _SHARED_SETS[id(names)] = names
    return shared


class Kept(BaseModel):
    """Base of the frozen models a process keeps by the thousands (the controller's stored
    rows, a deployment's entries). :meth:`model_copy` of one shared whole already
    (:func:`share_field_sets`), updated with plain values and strings, is shared whole too: it
    holds the one shared set of its field names instead of a copy of the set, its strings
    interned. A deploy copies every device's desired record and rollout entry; each copy's
    set (720 bytes for 8 names) was alive until the copies were stored, 36 MB at 50,000
    devices, and the allocator kept that peak."""

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        if deep or not _copies_shared(self, update):  # what share_field_sets must walk
            return super().model_copy(update=update, deep=deep)  # pydantic's copy (a set of its own)
        return _copy_shared(self, update)


_PLAIN_OR_STR = _PLAIN | {str}
_SET_DICT = BaseModel.__dict__["__dict__"].__set__
"""The setters of a model's slots, called directly: ``object.__setattr__`` took 0.19 us
each, four per copy (a deploy makes two copies per device: its record, marked published)."""
_SET_FIELDS_SET = BaseModel.__dict__["__pydantic_fields_set__"].__set__
_SET_EXTRA = BaseModel.__dict__["__pydantic_extra__"].__set__
_SET_PRIVATE = BaseModel.__dict__["__pydantic_private__"].__set__


def _copies_shared(model: BaseModel, update: Mapping[str, Any] | None) -> bool:
    """Whether a copy of ``model`` updated with ``update`` is shared whole by
    :func:`_copy_shared` alone: ``model`` is frozen, shared whole already, without extra or
    private values, and ``update`` holds plain values and strings only."""
    names = model.__pydantic_fields_set__
    config = model.model_config
    if (
        _SHARED_SETS.get(id(names)) is not names
        or not config.get("frozen")
        or config.get("extra") == "allow"
        or getattr(model, "__pydantic_private__", None) is not None
    ):
        return False
    if update:
        for value in update.values():
            if type(value) not in _PLAIN_OR_STR:
                return False
    return True


def _copy_shared(model: M, update: Mapping[str, Any] | None) -> M:
    """A copy of ``model`` updated with ``update`` (see :func:`_copies_shared`): one dict
    copied, its strings interned, the one shared set of its field names."""
    names = model.__pydantic_fields_set__
    cls = type(model)
    copied = cls.__new__(cls)
    values = model.__dict__.copy()
    if update:
        for key, value in update.items():
            values[key] = _str(value)
        if not names.issuperset(update):
            names = _shared_set(names | update.keys())
    _SET_DICT(copied, values)
    _SET_EXTRA(copied, None)
    _SET_FIELDS_SET(copied, names)
    _SET_PRIVATE(copied, None)
    return copied


def shared_copy(model: M, update: dict[str, str | int | float | bool | None]) -> M:
    """``share_field_sets(model.model_copy(update=update))``: a :class:`Kept` model shared
    whole already gives a copy shared whole, walking nothing (marking 10,000 desired records
    published walked each again)."""
    if isinstance(model, Kept) and _copies_shared(model, update):
        return _copy_shared(model, update)
    return share_field_sets(model.model_copy(update=update))


def _shared_dict(value: dict[Any, Any]) -> dict[Any, Any]:
    """``value`` as an equal dict (same order) of a frozen model's field, its string keys and
    values interned, models in it shared; a new dict, so one held elsewhere is left as it was.
    Empty, the one :data:`_EMPTY` dict; only strings (labels), the one dict of those items
    (:data:`_STR_DICTS`): kept models are never changed, they are read by all."""
    if not value:
        return _EMPTY
    out: dict[Any, Any] = {}
    strings = True
    for key, item in value.items():
        if isinstance(item, str):
            item = _str(item)
        else:
            strings = False
            if isinstance(item, tuple):
                item = _shared_tuple(item)
            elif isinstance(item, (BaseModel, dict, list)):
                _share(item)
        out[_str(key) if isinstance(key, str) else key] = item
    if not strings or len(out) > _MAX_STR_DICT or not all(type(key) is str for key in out):
        return out
    return _STR_DICTS.get(tuple(out.items()), lambda: out)


def _shared_tuple(value: tuple[Any, ...]) -> tuple[Any, ...]:
    """``value`` with its strings interned (an equal tuple), models in it shared."""
    strings = True
    for item in value:  # one pass: a deploy's 10,000 desired records hold a few tuples each
        if type(item) is not str:
            strings = False
            if isinstance(item, (BaseModel, dict, tuple, list)):
                _share(item)
    return tuple(map(_str, value)) if strings and value else value


def _malloc_trim() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None)  # glibc only (not musl, not macOS)
    except OSError:
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Give the C allocator's free memory back to the system (glibc's ``malloc_trim``; about
    2 ms at 10,000 devices); False where the C library has no such call."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


def resident_bytes() -> int | None:
    """The process's resident set size now (Linux's /proc/self/statm); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class FreeMemoryReleaser:
    """Releases free memory (:func:`release_free_memory`) once a burst is over: when asked
    (:meth:`idle`) with the RSS ``step`` bytes above what it was after the last release. The
    RSS is looked at once per ``interval`` seconds at most: a controller's inbox runs empty
    between most messages of a trickle, and reading it costs about 10 us."""

    def __init__(
        self, step: int = 16 * 1024 * 1024, interval: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.step = step
        self.interval = interval
        self._clock = clock
        self._looked = -math.inf
        self._floor = resident_bytes()
        self.releases = 0

    def idle(self) -> None:
        """The process has nothing to do now: release if a burst grew the RSS by ``step``."""
        if _TRIM is None or self._floor is None:
            return
        looked = self._clock()
        if looked - self._looked < self.interval:
            return
        self._looked = looked
        now = resident_bytes()
        if now is None or now < self._floor + self.step:
            if now is not None and now < self._floor:
                self._floor = now
            return
        release_free_memory()
        self.releases += 1
        self._floor = resident_bytes() or now
