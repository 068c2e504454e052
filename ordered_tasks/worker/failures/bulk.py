"""Many new parked rows in one statement: PostgreSQL's ``COPY`` (psycopg 3), else Django's ``bulk_create``."""

from __future__ import annotations

import json
from typing import Any

from django.db import connections, models, router

from ...models import ParkedMessage


def insert_parked(rows: list[ParkedMessage]) -> int:
    """Insert ``rows`` (new, unsaved) in the current transaction; returns how many.

    A crowded key's spill parks up to a window of messages at once, while
    the worker's threads keep the interpreter busy: Django's
    ``bulk_create`` spends about 0.1 ms of interpreter time per row
    (preparing each field's value, then psycopg parsing an ``INSERT`` with
    17 placeholders per row), ``COPY`` about a tenth of that. The rows'
    ids are not read back.
    """
    if not rows:
        return 0
    connection = connections[router.db_for_write(ParkedMessage)]
    if connection.vendor != "postgresql":
        ParkedMessage.objects.bulk_create(rows)
        return len(rows)
    fields = [f for f in ParkedMessage._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    statement = f"COPY {connection.ops.quote_name(str(ParkedMessage._meta.db_table))} ({columns}) FROM STDIN"
    with connection.cursor() as cursor:
        raw = cursor.cursor
        if not hasattr(raw, "copy"):  # psycopg2
            ParkedMessage.objects.bulk_create(rows)
            return len(rows)
        with raw.copy(statement) as copy:
            for row in rows:
                copy.write_row([_copy_value(f, f.pre_save(row, True)) for f in fields])
    return len(rows)


def _copy_value(field: models.Field[Any, Any], value: Any) -> Any:
    """``value`` of ``field`` as ``COPY`` takes it: JSON as its text, bytes as they are, the rest as is."""
    if isinstance(field, models.JSONField):
        return json.dumps(value, cls=field.encoder)
    if isinstance(value, memoryview):
        return bytes(value)
    return value
