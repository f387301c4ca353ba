"""The one place msgpack is called: models to bytes and back, validated on receipt."""

from __future__ import annotations

from typing import TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from .errors import PayloadError

M = TypeVar("M", bound=BaseModel)

MAX_PAYLOAD = 4 * 1024 * 1024
"""Refuse to decode anything larger: a payload this big is a mistake or an attack."""


def encode(model: BaseModel, *, compact: bool = False) -> bytes:
    """Encode a wire model as msgpack (a map of its fields); ``compact`` leaves out fields that are None."""
    data: bytes = msgpack.packb(model.model_dump(mode="json", exclude_none=compact), use_bin_type=True)
    return data


def decode(payload: bytes, model: type[M]) -> M:
    """Decode and validate ``payload`` as ``model``; raise :class:`PayloadError` naming the problem."""
    if len(payload) > MAX_PAYLOAD:
        raise PayloadError(f"{model.__name__}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise PayloadError(f"{model.__name__}: not valid msgpack ({exc.__class__.__name__})") from exc
    if not isinstance(raw, dict):
        raise PayloadError(f"{model.__name__}: expected a map, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise PayloadError(f"{model.__name__}: {describe(exc)}") from exc


def describe(exc: ValidationError) -> str:
    """One line naming the first fields that failed validation."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return "; ".join(parts) + more
