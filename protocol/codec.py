"""The one place msgpack is called: models to bytes and back, validated on receipt."""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import PayloadError

M = TypeVar("M", bound=BaseModel)

MAX_PACKET_SIZE = 4 * 1024 * 1024
"""The largest MQTT packet, headers included, that Tether's brokers accept (4 MiB).

The embedded broker closes a connection whose packet header announces more, before it
reads the body; the Mosquitto configuration Tether writes sets ``max_packet_size`` to it.
Tether's largest legitimate messages are far smaller: a stack definition (from at most
256 KiB of Compose), a logs reply (at most 512 KiB of output), a desired state (64 KiB
per variable value). See docs/security.md."""

MAX_PAYLOAD = MAX_PACKET_SIZE - 64 * 1024
"""Refuse to encode for the wire or decode anything larger: it would not fit in a packet
(the room left is for the topic and headers). A payload this big is a mistake or an attack."""


def packet_size(remaining_length: int) -> int:
    """The size of an MQTT packet whose fixed header announces ``remaining_length`` bytes:
    the type byte, 1 to 4 bytes of length (MQTT 3.1.1 section 2.2.3), then the rest."""
    r = remaining_length
    return 1 + (1 if r < 128 else 2 if r < 16_384 else 3 if r < 2_097_152 else 4) + r


_local = threading.local()


def packb(value: object) -> bytes:
    """``msgpack.packb(value, use_bin_type=True)``: the same bytes, from a Packer kept per thread.

    ``packb`` makes a Packer (and its buffer) per call: 0.93 us against 0.58 us reused, paid
    on every message the agent, the simulator and the controller encode. A Packer holds its
    buffer between calls, so one is never shared between threads (the controller encodes from
    several); after a failed pack (a value msgpack cannot pack) its buffer is emptied, so the
    next call starts clean."""
    try:
        packer = _local.packer
    except AttributeError:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    try:
        data: bytes = packer.pack(value)
    except BaseException:
        packer.reset()  # (msgpack empties it too; a partial map must never prefix the next)
        raise
    return data


def encode(model: BaseModel, *, compact: bool = False) -> bytes:
    """Encode a wire model as msgpack (a map of its fields); ``compact`` leaves out fields that are None."""
    return packb(model.model_dump(mode="json", exclude_none=compact))


_FIELDS: dict[type[BaseModel], list[tuple[str, Callable[[Any], bool] | None]]] = {}
"""Per model class, its fields in order with their ``exclude_if`` (see :func:`encode_with`)."""


def encode_with(model: BaseModel, update: dict[str, int | float | str | bool | None]) -> bytes:
    """The bytes :func:`encode` gives for ``model.model_copy(update=update)``, without the copy:
    the same map, keys in field order, an updated field left out where its ``exclude_if``
    says so. ``update``: plain values (as they are in JSON) of the model's own fields."""
    data = model.model_dump(mode="json")
    fields = _FIELDS.get(type(model))
    if fields is None:
        fields = _FIELDS[type(model)] = [(n, f.exclude_if) for n, f in type(model).model_fields.items()]
    out: dict[str, object] = {}
    for name, exclude_if in fields:
        if name in update:
            value = update[name]
            if exclude_if is None or not exclude_if(value):
                out[name] = value
        elif name in data:
            out[name] = data[name]
    return packb(out)


class Template:
    """The bytes :func:`encode` gives for copies of ``model`` that differ only in the fields
    ``vary``, the other fields packed once; or (``json_exclude`` given) the text
    ``model_dump_json(exclude=json_exclude)`` gives for them (:meth:`dump_json`).

    A msgpack map is its header, then each key and value in turn: the map of a copy is the
    model's, with the packed values of ``vary`` in their places (a JSON object likewise, with
    their JSON). For many messages alike but for a few plain fields (a deploy's desired
    states: the same stacks for 10,000 devices, each with its id and generation; a deploy's
    events, stored as JSON), where building, validating and dumping a model per message cost
    more than the rest of handling it. ``vary``: fields without ``exclude_if`` (they are
    always in the map) whose values are plain (str, int, float, bool); each value given must
    have the type of ``model``'s own (a copy would validate it: the caller checks any other
    constraint of the field).
    """

    __slots__ = ("_fixed", "_format", "_json", "_order", "_types")

    def __init__(self, model: BaseModel, vary: tuple[str, ...], json_exclude: set[str] | None = None) -> None:
        data = model.model_dump(mode="json")
        fields = type(model).model_fields
        for name in vary:
            if name not in data or fields[name].exclude_if is not None:
                raise ValueError(f"{type(model).__name__}.{name} cannot vary in a template")
            if type(data[name]) not in (str, int, float, bool):
                raise ValueError(f"{type(model).__name__}.{name} is not a plain value")
        self._json = json_exclude is not None
        fixed: list[Any]
        order: list[int] = []  # per slot in the map, which of ``values`` goes there
        marked = _json_marked(model, vary, json_exclude) if json_exclude is not None else None
        if marked is not None:
            fixed, order = marked
        elif json_exclude is not None:  # each field's "name":value as pydantic writes it, in order
            parts = [(n, model.model_dump_json(include={n})[1:-1]) for n in data if n not in json_exclude]
            fixed = ["{"]
            for name, part in [(n, p) for n, p in parts if p]:  # empty: left out (exclude_if)
                fixed[-1] += "," if fixed[-1] != "{" or len(fixed) > 1 else ""
                if name in vary:
                    fixed[-1] += part[: part.index(":") + 1]  # "name": (a field's name has no colon)
                    order.append(vary.index(name))
                    fixed.append("")
                else:
                    fixed[-1] += part
            fixed[-1] += "}"
        else:
            packer = msgpack.Packer(use_bin_type=True)
            fixed = [packer.pack_map_header(len(data))]
            for name, value in data.items():  # model_dump's order: encode's
                fixed[-1] += packer.pack(name)
                if name in vary:
                    order.append(vary.index(name))
                    fixed.append(b"")
                else:
                    fixed[-1] += packer.pack(value)
        self._fixed = tuple(fixed)  # the bytes (text) before, between and after the values
        self._order = tuple(order)
        self._types = tuple(type(data[vary[i]]) for i in order)
        self._format = "%s".join(f.replace("%", "%%") for f in fixed) if self._json else ""
        if self._json and marked is None:
            own = tuple(getattr(model, name) for name in vary)
            if self.dump_json(*own) != model.model_dump_json(exclude=json_exclude):
                raise ValueError(f"{type(model).__name__} cannot be dumped from a template")

    def encode(self, *values: str | int | float | bool) -> bytes:
        """The bytes of the copy whose fields ``vary`` have ``values`` (in that order)."""
        if self._json:
            raise TypeError("a JSON template: see dump_json")
        if len(values) != len(self._order):
            raise TypeError(f"expected {len(self._order)} values, got {len(values)}")
        fixed = self._fixed
        out = [fixed[0]]
        for at, (index, kind) in enumerate(zip(self._order, self._types)):  # noqa: B905 (same length)
            value = values[index]
            if type(value) is not kind:
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            out.append(packb(value))
            out.append(fixed[at + 1])
        return b"".join(out)

    def dump_json(self, *values: str | int | float | bool) -> str:
        """The JSON of the copy whose fields ``vary`` have ``values`` (in that order), as
        ``model_dump_json(exclude=json_exclude)`` writes it. Raise :class:`ValueError` for a
        value whose JSON is not plainly its text (a string to escape, a float pydantic writes
        in another notation than Python's ``repr``): the caller dumps that copy whole."""
        if not self._json:
            raise TypeError("not a JSON template: see encode")
        if len(values) != len(self._order):
            raise TypeError(f"expected {len(self._order)} values, got {len(values)}")
        texts = []
        for index, kind in zip(self._order, self._types):  # noqa: B905 (same length)
            value = values[index]
            if type(value) is not kind:
                raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
            if kind is str:
                if not value.isascii() or not value.isprintable() or '"' in value or "\\" in value:  # type: ignore[union-attr, operator]
                    raise ValueError(f"no plain JSON for {value!r}")
                texts.append(f'"{value}"')
            elif kind is float:
                text = repr(value)
                if "e" in text or "n" in text:  # 1e+16, inf, nan: pydantic writes those otherwise
                    raise ValueError(f"no plain JSON for {text}")
                texts.append(text)
            else:  # int, bool
                texts.append(str(value) if kind is int else "true" if value else "false")
        return self._format % tuple(texts)


def _json_marked(
    model: BaseModel, vary: tuple[str, ...], exclude: set[str]
) -> tuple[list[Any], list[int]] | None:
    """A JSON template's text pieces and slots (see :class:`Template`) from one dump of
    ``model`` with a mark in each field of ``vary``: the text around each ``"name":mark``,
    which must be there exactly once (None otherwise, or for a bool: the caller dumps field
    by field). 6 us for an event against 45 us field by field."""
    marks: dict[str, object] = {}
    for i, name in enumerate(vary):
        kind = type(getattr(model, name))
        if kind is str:
            marks[name] = f"tether-template-slot-{i}"
        elif kind is int:
            marks[name] = 7_340_032_000_000_000 + i
        elif kind is float:
            marks[name] = 7340.03125 + i
        else:
            return None
    text = model.model_copy(update=marks).model_dump_json(exclude=exclude)
    found = []
    for i, (name, mark) in enumerate(marks.items()):
        piece = f'"{name}":' + (f'"{mark}"' if type(mark) is str else repr(mark))
        if text.count(piece) != 1:
            return None
        at = text.index(piece)
        found.append((at, at + len(name) + 3, at + len(piece), i))
    fixed: list[Any] = []
    order = []
    end = 0
    for _, value_at, value_end, i in sorted(found):
        fixed.append(text[end:value_at])
        order.append(i)
        end = value_end
    fixed.append(text[end:])
    return fixed, order


def _unpack(payload: bytes, name: str) -> Any:
    """``payload``'s msgpack value; raise :class:`PayloadError` naming ``name`` if it is none."""
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"{name}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        return msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise PayloadError(f"{name}: not valid msgpack ({exc.__class__.__name__})") from exc


def raw_map(payload: bytes, name: str = "payload") -> dict[str, Any]:
    """``payload`` as the plain map :func:`decode` validates (not validated); raise
    :class:`PayloadError` naming the problem (``name``: what it should be)."""
    raw = _unpack(payload, name)
    if not isinstance(raw, dict):
        raise PayloadError(f"{name}: expected a map, got {type(raw).__name__}")
    return raw


def decode(payload: bytes, model: type[M]) -> M:
    """Decode and validate ``payload`` as ``model``; raise :class:`PayloadError` naming the problem."""
    raw = raw_map(payload, model.__name__)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise PayloadError(f"{model.__name__}: {describe(exc)}") from exc


def array(items: list[bytes]) -> bytes:
    """The msgpack array of ``items`` (each already one encoded value): what :func:`packb`
    gives for the list of their values, without decoding them again."""
    n = len(items)
    head = (
        bytes((0x90 | n,))
        if n < 16
        else (b"\xdc" + n.to_bytes(2, "big") if n < 0x10000 else b"\xdd" + n.to_bytes(4, "big"))
    )
    return head + b"".join(items)


def is_array(payload: bytes) -> bool:
    """Whether ``payload`` starts as a msgpack array (a batch) rather than a map."""
    return bool(payload) and (0x90 <= payload[0] <= 0x9F or payload[0] in (0xDC, 0xDD))


@functools.cache
def _list_adapter(model: type[BaseModel]) -> TypeAdapter[list[Any]]:
    """Validates a list of ``model`` maps (made once per model)."""
    return TypeAdapter(list[model])  # type: ignore[valid-type]


def decode_array(payload: bytes, model: type[M], limit: int, key: str) -> list[M]:
    """Decode and validate ``payload`` as a msgpack array of 1 to ``limit`` ``model`` maps, all
    or nothing: raise :class:`PayloadError` naming the first bad one (its place and its
    ``key`` field, e.g. an event's ``seq``) and what is wrong with it."""
    name = f"{model.__name__} batch"
    raw = _unpack(payload, name)
    if not isinstance(raw, list):
        raise PayloadError(f"{name}: expected an array, got {type(raw).__name__}")
    if not 1 <= len(raw) <= limit:
        raise PayloadError(f"{name}: {len(raw)} items, expected 1 to {limit}")
    try:  # the whole list in one call (4 events: 11 us, against 17 us one by one)
        return _list_adapter(model).validate_python(raw)
    except ValidationError:
        pass  # found again below, item by item, to name it
    out = []
    for i, item in enumerate(raw):
        where = f"{name}: item {i + 1} of {len(raw)}"
        if isinstance(item, dict) and type(item.get(key)) is int:
            where += f" ({key} {item[key]})"
        if not isinstance(item, dict):
            raise PayloadError(f"{where}: expected a map, got {type(item).__name__}")
        try:
            out.append(model.model_validate(item))
        except ValidationError as exc:
            raise PayloadError(f"{where}: {describe(exc)}") from exc
    return out


def decode_many(payload: bytes, model: type[M], limit: int, key: str) -> list[M]:
    """``payload`` as one ``model`` (a map) or a batch of them (an array: :func:`decode_array`)."""
    if is_array(payload):
        return decode_array(payload, model, limit, key)
    return [decode(payload, model)]


def describe(exc: ValidationError) -> str:
    """One line naming the first fields that failed validation."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more


class FieldMemo(Generic[M]):
    """Decodes ``model`` exactly as :func:`decode` does (same result, same errors), validating
    each distinct encoding of one ``field`` only once.

    For messages that many senders repeat with the same nested value: a fleet's reported
    states differ in the device and the generation, seldom in the stacks they report, and
    validating those (pydantic) was most of the controller's cost per report. The field's
    raw msgpack bytes are the key; what was validated for them is reused (wire models are
    frozen, so sharing them is safe). At most ``size`` encodings are kept (all forgotten
    when full). Anything out of the ordinary (a payload that is not a map with text keys,
    trailing bytes, a validation error) goes through :func:`decode`.

    One msgpack Unpacker is kept and fed each payload in turn (making one was a quarter of
    the parsing: 0.6 us a report): a payload read whole leaves it empty; one that is not
    (an error, a key not text, trailing bytes) leaves bytes in it, so it is replaced. Not
    thread safe: one memo per thread (the controller's worker has its own)."""

    def __init__(self, model: type[M], field: str, size: int = 256) -> None:
        self.model = model
        self.field = field
        self.size = size
        self._seen: dict[bytes, object] = {}
        self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)

    def decode(self, payload: bytes) -> M:
        """``payload`` as ``model``; raise :class:`PayloadError` naming the problem."""
        if len(payload) > MAX_PAYLOAD:
            return decode(payload, self.model)
        raw: dict[str, object] = {}
        encoded: bytes | None = None
        unpacker = self._unpacker
        whole = False
        try:
            base = unpacker.tell()  # where this payload starts: offsets count from the first fed
            unpacker.feed(payload)
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if type(key) is not str:
                    break
                if key == self.field:
                    start = unpacker.tell() - base
                    unpacker.skip()
                    encoded = payload[start : unpacker.tell() - base]
                else:
                    raw[key] = unpacker.unpack()
            else:
                whole = unpacker.tell() - base == len(payload)  # else trailing bytes
        except Exception:  # msgpack raises several unrelated types
            pass
        if not whole:
            self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)  # bytes may be left in it
            return decode(payload, self.model)
        if encoded is None:
            return decode(payload, self.model)
        known = self._seen.get(encoded)
        try:
            if known is not None:
                raw[self.field] = known
                message = self.model.model_validate(raw)
                # The very value kept, not pydantic's equal copy of it (a dict is copied): what
                # is made of it later can then be made once per value (by identity).
                object.__setattr__(message, self.field, known)
                return message
            raw[self.field] = msgpack.unpackb(encoded, raw=False, strict_map_key=True)
            message = self.model.model_validate(raw)
        except Exception:
            return decode(payload, self.model)
        if len(self._seen) >= self.size:
            self._seen.clear()
        self._seen[encoded] = getattr(message, self.field)
        return message


D = TypeVar("D")
_ABSENT = object()
_INF = float("inf")
_MAX_FLOAT = sys.float_info.max


class BatchMemo(Generic[M, D]):
    """Decodes what :func:`decode_many` does (one ``model`` map or a batch of them: the same
    items accepted, the same errors), validating each distinct content only once: the fields
    ``vary`` are checked item by item, the rest validated once per distinct encoding.

    For batches that many senders repeat but for a few plain fields (a deploy's events:
    ``desired.accepted`` and one per service, alike on every device but for the device, the
    sequence number, the time): validating them (pydantic) and dumping each was most of the
    controller's cost per event. As :class:`FieldMemo` does for a field, the key is msgpack
    bytes: here the item's map without ``vary`` (packed again: equal bytes, equal values of
    equal types). What is kept per key is the first item validated with it and ``derive`` of
    it (what the caller makes of the content alike for all: it must not use ``vary``); at
    most ``size`` of them (all forgotten when full).

    ``vary``: fields of type str, int or float, constrained at most by bounds (``ge``,
    ``le``) and ``allow_inf_nan=False``, without validators. An item's value of one is taken as it is only when of
    exactly that type and within bounds (an absent one, its default): anything else (an int
    given as a float, a missing required field, a bad item) goes through :func:`decode_many`,
    which validates it or names what is wrong.

    :meth:`decode_many` gives, per item, (model, derived, values): ``values`` those of
    ``vary`` of the item (in that order), ``model`` validated with the same content (and
    equal to the item's own once ``values`` are put in it); ``derived`` None for an item
    validated alone (one map, not a batch; an item out of the ordinary) or whose content
    is seen for the first time (``model`` is then the item itself): a content seen once
    (a backlog's events, each its own) costs its validation alone."""

    def __init__(
        self, model: type[M], vary: tuple[str, ...], derive: Callable[[M], D], size: int = 256
    ) -> None:
        self.model = model
        self.vary = vary
        self.derive = derive
        self.size = size
        self._seen: dict[bytes, tuple[M, D | None]] = {}
        checks = []
        validators = model.__pydantic_decorators__
        if validators.model_validators or any(
            name in d.info.fields for d in validators.field_validators.values() for name in vary
        ):
            raise ValueError(f"{model.__name__} has validators: its fields cannot be checked apart")
        for name in vary:
            field = model.model_fields[name]
            low, high, finite = -_INF, _INF, False
            for rule in field.metadata:
                if type(rule).__name__ == "Ge":
                    low = rule.ge
                elif type(rule).__name__ == "Le":
                    high = rule.le
                elif type(rule).__name__ == "AllowInfNan" and not rule.allow_inf_nan:
                    finite = True
                else:
                    raise ValueError(f"{model.__name__}.{name}: only bounds can be checked apart")
            if field.annotation not in (str, int, float):
                raise ValueError(f"{model.__name__}.{name} is not a plain str, int or float")
            if finite:  # allow_inf_nan=False: within the largest floats (NaN is within no bounds)
                low, high = max(low, -_MAX_FLOAT), min(high, _MAX_FLOAT)
            default = _ABSENT if field.is_required() else field.default
            checks.append((name, field.annotation, low, high, default))
        self._checks = tuple(checks)
        self._types = tuple(c[1] for c in checks)
        self._absent = (_ABSENT,) * len(vary)
        self._bounds = tuple((i, c[2], c[3]) for i, c in enumerate(checks) if c[2] > -_INF or c[3] < _INF)

    def _plain(self, payload: bytes, limit: int, key: str) -> list[tuple[M, D | None, tuple[Any, ...]]]:
        """:func:`decode_many`'s answer (or error): each item validated alone, nothing derived
        nor kept of it (None)."""
        vary = self.vary
        return [
            (m, None, tuple(getattr(m, n) for n in vary))
            for m in decode_many(payload, self.model, limit, key)
        ]

    def _values(self, values: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """``values`` (popped from an item) checked one by one (absent: the default); None
        if one is not plainly valid."""
        out = []
        for (_, kind, low, high, default), value in zip(self._checks, values):  # noqa: B905
            if value is _ABSENT:
                if default is _ABSENT:
                    return None
                value = default
            elif type(value) is not kind or (kind is not str and not low <= value <= high):
                return None
            out.append(value)
        return tuple(out)

    def decode_many(self, payload: bytes, limit: int, key: str) -> list[tuple[M, D | None, tuple[Any, ...]]]:
        """``payload``'s items as (model, derived, values) (see the class); raise
        :class:`PayloadError` as :func:`decode_many` does."""
        if not is_array(payload) or len(payload) > MAX_PAYLOAD:
            return self._plain(payload, limit, key)
        try:
            raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        except Exception:  # msgpack raises several unrelated types
            return self._plain(payload, limit, key)
        if type(raw) is not list or not 1 <= len(raw) <= limit:
            return self._plain(payload, limit, key)
        names, seen, types, bounds, absent = self.vary, self._seen, self._types, self._bounds, self._absent
        out: list[tuple[M, D | None, tuple[Any, ...]]] = []
        for item in raw:
            if type(item) is not dict:
                return self._plain(payload, limit, key)
            popped = tuple(map(item.pop, names, absent))
            values = popped if tuple(map(type, popped)) == types else self._values(popped)
            if values is None:
                return self._plain(payload, limit, key)
            for i, low, high in bounds:
                if not low <= values[i] <= high:
                    return self._plain(payload, limit, key)
            content = packb(item)
            known = seen.get(content)
            if known is None:  # seen for the first time: derived from when seen again
                try:
                    message = self.model.model_validate({**item, **dict(zip(names, values))})  # noqa: B905
                except ValidationError:
                    return self._plain(payload, limit, key)
                if len(seen) >= self.size:
                    seen.clear()
                seen[content] = (message, None)
                out.append((message, None, values))
                continue
            if known[1] is None:
                known = seen[content] = (known[0], self.derive(known[0]))
            out.append((known[0], known[1], values))
        return out


def peek_str(payload: bytes, field: str) -> str:
    """The text value of one top-level ``field`` of a msgpack map, the rest skipped, not
    decoded: for a message of which only that field matters (the id of a reply that may
    carry a device's facts). Raise :class:`PayloadError` when it is not there or not text."""
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True)
        unpacker.feed(payload)
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key == field:
                value = unpacker.unpack()
                if type(value) is str:
                    return value
                break
            unpacker.skip()
    except Exception as exc:  # msgpack raises several unrelated types
        raise PayloadError(f"not a valid msgpack map ({exc.__class__.__name__})") from exc
    raise PayloadError(f"{field}: missing or not text")
