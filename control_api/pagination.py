"""Keyset ("cursor") pagination, newest first. The cursor is opaque to clients: base64 of the
sort key of the last row they saw. A cursor that does not decode is a 400."""
from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from peewee import DateTimeField, Field, UUIDField

from .errors import ApiError


def _bigint(value) -> int:
    # Integer keys are BIGINT ids: a float, a bool or a number out of range came from no
    # cursor of ours (and an out-of-range number fails inside the database driver).
    if type(value) is not int or not -2 ** 63 <= value < 2 ** 63:
        raise ValueError("not a BIGINT")
    return value


def _from_text(parse):
    def decode(value):
        if not isinstance(value, str):
            raise ValueError("not a string")
        return parse(value)

    return decode


# How each sort-key value is written into a cursor and read back.
_ENCODE = {datetime: datetime.isoformat, uuid.UUID: str, int: int}
_DECODE = {datetime: _from_text(datetime.fromisoformat), uuid.UUID: _from_text(uuid.UUID), int: _bigint}


def _encode(values: list) -> str:
    raw = json.dumps([_ENCODE[type(v)](v) for v in values], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode(cursor: str, types: list[type]) -> list:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
        if not isinstance(values, list) or len(values) != len(types):
            raise ValueError
        return [_DECODE[t](v) for t, v in zip(types, values)]
    except (ValueError, TypeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_cursor", "The cursor is not valid; start again without one.") from None


def _type(field: Field) -> type:
    return datetime if isinstance(field, DateTimeField) else uuid.UUID if isinstance(field, UUIDField) else int


def page(query, keys: tuple[Field, ...], cursor: str | None, limit: int):
    """(rows, next_cursor) of `query` ordered by `keys` descending, after `cursor`."""
    query = query.order_by(*(k.desc() for k in keys))
    if cursor:
        values = _decode(cursor, [_type(k) for k in keys])
        # (k1, k2) < (v1, v2), spelled out: row-value comparison is not portable.
        condition = None
        for i in reversed(range(len(keys))):
            term = keys[i] < values[i]
            condition = term if condition is None else (term | ((keys[i] == values[i]) & condition))
        query = query.where(condition)
    rows = list(query.limit(limit + 1))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = _encode([getattr(rows[-1], k.name) for k in keys])
    return rows, next_cursor
