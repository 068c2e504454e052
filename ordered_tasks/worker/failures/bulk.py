"""Many new parked rows in one statement: PostgreSQL's ``COPY`` (psycopg 3), else Django's ``bulk_create``."""

from __future__ import annotations

import json
import logging
from typing import Any

from django.db import NotSupportedError, connections, models, router

from ...models import ParkedMessage

logger = logging.getLogger(__name__)


class _Copy:
    """Whether this process still writes parked rows with ``COPY`` (False once the database refused it)."""

    works = True


def insert_parked(rows: list[ParkedMessage]) -> int:
    """Insert ``rows`` (new, unsaved) in the current transaction; returns how many.

    A crowded key's spill parks up to a window of messages at once, while
    the worker's threads keep the interpreter busy: Django's
    ``bulk_create`` spends about 0.1 ms of interpreter time per row
    (preparing each field's value, then psycopg parsing an ``INSERT`` with
    17 placeholders per row), ``COPY`` about a tenth of that. The rows'
    ids are not read back.

    A database that refuses ``COPY`` (row-level security on the table, a
    PostgreSQL-compatible server without it) fails this transaction; the
    spill hands its messages back to their lane, and the process uses
    ``bulk_create`` from then on.
    """
    if not rows:
        return 0
    connection = connections[router.db_for_write(ParkedMessage)]
    fields = _copy_fields()
    if connection.vendor != "postgresql" or fields is None or not _Copy.works:
        ParkedMessage.objects.bulk_create(rows)
        return len(rows)
    columns = ", ".join(connection.ops.quote_name(str(f.column)) for f in fields)
    statement = f"COPY {connection.ops.quote_name(str(ParkedMessage._meta.db_table))} ({columns}) FROM STDIN"
    with connection.cursor() as cursor:
        raw = cursor.cursor
        if not hasattr(raw, "copy"):  # psycopg2
            ParkedMessage.objects.bulk_create(rows)
            return len(rows)
        try:
            with connection.wrap_database_errors, raw.copy(statement) as copy:
                for row in rows:
                    copy.write_row([_copy_value(f, f.pre_save(row, True)) for f in fields])
        except NotSupportedError as exc:
            _Copy.works = False
            logger.warning("The database refused COPY for parked messages (%s); this worker writes "
                           "them with INSERT from now on.", exc)
            raise
    return len(rows)


def parked_ids(key: str, task_ids: list[str]) -> set[str]:
    """Which of ``task_ids`` are parked (state ``parked``) under ``key``: one query, not compiled by the ORM.

    A spill asks this for every batch (a copy already parked is not parked
    twice); through the ORM the query cost about 1.2 ms more interpreter
    time than the statement itself, more than a batch's rows.
    """
    if not task_ids:
        return set()
    connection = connections[router.db_for_write(ParkedMessage)]  # the spill's transaction
    parked = ParkedMessage.State.PARKED
    if connection.vendor != "postgresql":
        return set(ParkedMessage.objects.using(connection.alias)
                   .filter(key=key, task_id__in=task_ids, state=parked).values_list("task_id", flat=True))
    meta, quote = ParkedMessage._meta, connection.ops.quote_name
    column = {name: quote(str(getattr(meta.get_field(name), "column", name)))
              for name in ("key", "state", "task_id")}
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {column['task_id']} FROM {quote(str(meta.db_table))} WHERE {column['key']} = %s "
            f"AND {column['state']} = %s AND {column['task_id']} = ANY(%s)",
            [key, parked.value, list(task_ids)])
        return {row[0] for row in cursor.fetchall()}


def _copy_fields() -> list[models.Field[Any, Any]] | None:
    """The columns ``COPY`` writes, as ``bulk_create`` would; None if one needs the database's default."""
    # ``generated`` and ``db_default`` are Django 5's.
    fields = [f for f in ParkedMessage._meta.concrete_fields
              if not f.primary_key and not getattr(f, "generated", False)]
    if any(getattr(f, "db_default", models.NOT_PROVIDED) is not models.NOT_PROVIDED for f in fields):
        return None
    return fields


def _copy_value(field: models.Field[Any, Any], value: Any) -> Any:
    """``value`` of ``field`` as ``COPY`` takes it: JSON as its text (None as NULL), bytes as they are."""
    if isinstance(field, models.JSONField):
        return None if value is None else json.dumps(value, cls=field.encoder)
    if isinstance(value, memoryview):
        return bytes(value)
    return value
