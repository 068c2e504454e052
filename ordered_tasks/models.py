"""Database records of keys that left the happy path: their state and parked messages."""

from __future__ import annotations

import functools
import json
from typing import Any

from django.db import connections, models, router
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from .partitioning import MAX_KEY_LENGTH
from .states import ControlAction, KeyStatus


def locked_row(model: Any, lookup: dict[str, Any], defaults: dict[str, Any] | None = None) -> Any:
    """The row of ``model`` that ``lookup`` finds, locked until the transaction ends; created first if none.

    One query when the row exists (the usual case): each query of a
    transaction waits for the interpreter lock when it returns, which a
    busy threads pool makes slow.
    """
    found = _select_for_update(model, lookup)
    if found is None:
        model.objects.get_or_create(**lookup, defaults=defaults or {})
        found = _select_for_update(model, lookup)
    if found is None:  # deleted in between (an operator's purge): as the ORM's get would say
        raise model.DoesNotExist(f"{model.__name__} matching {lookup} does not exist")
    return found


def _select_for_update(model: Any, lookup: dict[str, Any]) -> Any:
    """The row ``lookup`` finds (its unique fields), locked; None if there is none.

    On PostgreSQL a statement written once per model and lookup rather than
    compiled by the ORM each time: a crowded key's spill locks its row for
    every batch, and compiling the query cost more interpreter time than the
    rest of a small batch's transaction.
    """
    connection = connections[router.db_for_write(model)]
    if connection.vendor != "postgresql":
        return model.objects.select_for_update().filter(**lookup).first()
    if not connection.in_atomic_block:  # as the ORM's select_for_update says
        raise TransactionManagementError("select_for_update cannot be used outside of a transaction.")
    names = tuple(sorted(lookup))
    attnames, converters, statement = _locking_statement(model, names, connection.alias)
    with connection.cursor() as cursor:
        cursor.execute(statement, [lookup[name] for name in names])
        row = cursor.fetchone()
    if row is None:
        return None
    values = [value if convert is None else convert(value, None, connection)
              for convert, value in zip(converters, row, strict=True)]
    return model.from_db(connection.alias, attnames, values)


@functools.lru_cache(maxsize=16)
def _updating_statement(model: Any, names: tuple[str, ...], alias: str) -> tuple[list[Any], str]:
    quote = connections[alias].ops.quote_name
    meta = model._meta
    fields = [meta.get_field(name) for name in names]
    assignments = ", ".join(f"{quote(field.column)} = %s" for field in fields)
    return fields, f"UPDATE {quote(meta.db_table)} SET {assignments} WHERE {quote(meta.pk.column)} = %s"


@functools.lru_cache(maxsize=16)
def _locking_statement(model: Any, names: tuple[str, ...],
                       alias: str) -> tuple[list[str], list[Any], str]:
    """The row's field names, each field's ``from_db_value`` (or None), and the locking statement."""
    quote = connections[alias].ops.quote_name
    meta = model._meta
    fields = list(meta.concrete_fields)
    where = " AND ".join(f"{quote(meta.get_field(name).column)} = %s" for name in names)
    columns = ", ".join(quote(field.column) for field in fields)
    return ([field.attname for field in fields], [getattr(field, "from_db_value", None) for field in fields],
            f"SELECT {columns} FROM {quote(meta.db_table)} WHERE {where} FOR UPDATE")

#: The statuses of :class:`~ordered_tasks.states.KeyStatus`, by their old names.
ACTIVE, RETRYING, BLOCKED = KeyStatus.ACTIVE.value, KeyStatus.RETRYING.value, KeyStatus.BLOCKED.value


class AccountState(models.Model):
    """The state of one ordering key, written only by the consumer of its partition.

    A key that never failed has no row: the happy path writes nothing.
    """

    class Status(models.TextChoices):
        ACTIVE = KeyStatus.ACTIVE.value, "active"
        RETRYING = KeyStatus.RETRYING.value, "retrying"
        BLOCKED = KeyStatus.BLOCKED.value, "blocked"

    key = models.CharField(max_length=MAX_KEY_LENGTH, unique=True)
    partition = models.PositiveIntegerField(db_index=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=ACTIVE, db_index=True)
    #: Changes each time the key is blocked and each time a replay or skip is
    #: applied, so a repeated request for the same incident does nothing.
    epoch = models.PositiveIntegerField(default=0)
    #: The last position handed to a parked message of this key.
    sequence = models.PositiveBigIntegerField(default=0)
    retry_at = models.DateTimeField(null=True, blank=True)
    failures = models.PositiveIntegerField(default=0, help_text="Task failures (each failed attempt).")
    retries = models.PositiveIntegerField(default=0, help_text="In-place retries scheduled.")
    blocks = models.PositiveIntegerField(default=0, help_text="Times the key was blocked.")
    replays = models.PositiveIntegerField(default=0)
    skips = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    last_error_at = models.DateTimeField(null=True, blank=True)
    blocked_at = models.DateTimeField(null=True, blank=True)
    last_activity = models.DateTimeField(
        null=True, blank=True, db_index=True,
        help_text="Last task of the key that ended, or last change of its state (written in batches).")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "account state"
        ordering = ("key",)
        permissions = [("replay_accountstate", "Can replay or skip the parked messages of a key")]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"

    def block(self, now: Any) -> None:
        """Hold the key until an operator replays or skips it (a new incident unless already blocked).

        Not saved here: the caller saves the row with its other changes.
        """
        if self.status != KeyStatus.BLOCKED:
            self.epoch += 1
            self.blocks += 1
            self.blocked_at = now
        self.status = KeyStatus.BLOCKED
        self.retry_at = None

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Every write of a key's state is activity too."""
        self.last_activity = timezone.now()
        update_fields = kwargs.get("update_fields")
        if update_fields is not None:
            kwargs["update_fields"] = {*update_fields, "last_activity"}
        super().save(*args, **kwargs)

    def write(self, update_fields: list[str]) -> None:
        """Save ``update_fields`` (and the activity, and ``updated_at``) of this existing row.

        On PostgreSQL one statement written once per set of fields instead
        of compiled by the ORM each time (a crowded key's spill writes its
        row for every batch); like Django's bulk writes, it sends no
        ``pre_save`` or ``post_save`` signal. Elsewhere :meth:`save`.
        """
        connection = connections[router.db_for_write(type(self))]
        if connection.vendor != "postgresql":
            self.save(update_fields=update_fields)
            return
        self.last_activity = timezone.now()
        names = tuple(sorted({*update_fields, "last_activity", "updated_at"}))
        fields, statement = _updating_statement(type(self), names, connection.alias)
        values = [field.get_db_prep_save(field.pre_save(self, False), connection) for field in fields]
        with connection.cursor() as cursor:
            cursor.execute(statement, [*values, self.pk])


class ParkedMessage(models.Model):
    """A message of a blocked or retrying key, kept with everything needed to run it."""

    class State(models.TextChoices):
        PARKED = "parked", "parked (waits for its key)"
        SKIPPED = "skipped", "skipped by an operator (kept as a record)"
        FAILED = "failed", "failed and passed over (policy 'continue'; kept as a record)"
        REFUSED = "refused", "refused: it belongs to no key of its partition (kept as a record)"

    class Reason(models.TextChoices):
        FAILED = "failed", "the task failed"
        RETRYING = "retrying", "waiting for an in-place retry"
        KEY_HELD = "key_held", "an earlier message of its key is blocked or retrying"
        UNKNOWN_TASK = "unknown_task", "no task of this name is registered in the worker"
        UNDECODABLE = "undecodable", "the body could not be decoded"
        INVALID = "invalid", "the message is not a valid task message"
        MISROUTED = "misrouted", "its key, partition header and queue do not agree"
        TIME_LIMIT = "time_limit", "the task exceeded its hard time limit"
        WORKER_LOST = "worker_lost", "the process running the task died"
        REVOKED = "revoked", "revoked by an operator (kept as a record)"
        OVERFLOW = "overflow", "its key had more messages waiting than its share of the window"
        PURGED = "purged", "taken out of its partition queue by an operator (ordered_purge)"

    key = models.CharField(max_length=MAX_KEY_LENGTH, db_index=True)
    partition = models.PositiveIntegerField()
    #: Order among the messages of its key (arrival order at the consumer).
    position = models.PositiveBigIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.PARKED)
    reason = models.CharField(max_length=16, choices=Reason.choices)
    task_name = models.CharField(max_length=255, blank=True)
    task_id = models.CharField(max_length=255, blank=True, db_index=True)
    body = models.BinaryField()
    content_type = models.CharField(max_length=128, blank=True)
    content_encoding = models.CharField(max_length=64, blank=True)
    headers = models.JSONField(default=dict)
    exception = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    #: Times the task has run and failed (including in-place retries).
    attempts = models.PositiveIntegerField(default=0)
    due_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ("key", "position")
        constraints = [
            models.UniqueConstraint(fields=("key", "position"), name="ordered_parked_key_position"),
        ]
        indexes = [models.Index(fields=("key", "state", "position"), name="ordered_parked_queue")]

    def __str__(self) -> str:
        return f"{self.key} #{self.position} {self.task_name} ({self.state})"

    def arguments(self) -> tuple[Any, Any] | None:
        """The task's ``(args, kwargs)``, or None when the body is not JSON (never unpickled here)."""
        if self.content_type != "application/json":
            return None
        try:
            body = json.loads(bytes(self.body).decode(self.content_encoding or "utf-8"))
            args, kwargs = body[0], body[1]
        except (ValueError, TypeError, IndexError, KeyError, LookupError):
            return None
        return args, kwargs


class ControlRequest(models.Model):
    """Who asked to replay or skip a key, when, and what the consumer did about it."""

    class Action(models.TextChoices):
        REPLAY = ControlAction.REPLAY.value, "replay"
        SKIP = ControlAction.SKIP.value, "skip"

    key = models.CharField(max_length=MAX_KEY_LENGTH, db_index=True)
    action = models.CharField(max_length=16, choices=Action.choices)
    requested_by = models.CharField(max_length=255, blank=True)
    requested_at = models.DateTimeField(auto_now_add=True)
    #: The key's epoch when the request was made; applied only if still current.
    epoch = models.PositiveIntegerField()
    applied_at = models.DateTimeField(null=True, blank=True)
    outcome = models.TextField(blank=True)

    class Meta:
        ordering = ("-requested_at", "-id")

    def __str__(self) -> str:
        return f"{self.action} {self.key} by {self.requested_by or '?'}"


class PartitionFence(models.Model):
    """The highest fencing token seen per partition (Redis leases).

    Each lease acquisition takes a new, larger token. The consumer's state
    writes carry its token; a write with a smaller one comes from a stale
    owner that lost its partition, and is refused.
    """

    partition = models.PositiveIntegerField(primary_key=True)
    fence = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"partition {self.partition}: fence {self.fence}"

    @classmethod
    def advance(cls, partition: int, fence: int) -> int | None:
        """Record ``fence`` for ``partition`` unless a newer owner has written: then return its fence.

        Inside a transaction: the row stays locked until it ends, so no
        other owner writes in between. Nothing changes when it returns a fence.
        """
        row = locked_row(cls, {"partition": partition})
        if fence < row.fence:
            return int(row.fence)
        if fence > row.fence:
            row.fence = fence
            row.save(update_fields=["fence", "updated_at"])
        return None


class PartitionStatus(models.Model):
    """What the consumer of one partition last reported (written in batches, every few seconds)."""

    partition = models.PositiveIntegerField(primary_key=True)
    worker = models.CharField(max_length=255, blank=True, help_text="Node name of the active consumer.")
    consumer_since = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    running_task = models.CharField(max_length=255, blank=True)
    running_task_id = models.CharField(max_length=255, blank=True)
    running_key = models.CharField(max_length=MAX_KEY_LENGTH, blank=True)
    running_since = models.DateTimeField(null=True, blank=True)
    completed = models.PositiveBigIntegerField(default=0, help_text="Tasks ended by this consumer.")
    failed = models.PositiveBigIntegerField(default=0, help_text="Of which failed.")
    per_minute = models.FloatField(default=0.0, help_text="Tasks ended per minute, over the last minute.")
    progress_at = models.DateTimeField(
        null=True, blank=True,
        help_text="When a task of the partition last started or ended on this consumer.")
    last_wait = models.FloatField(
        null=True, blank=True, help_text="Seconds the last task started waited in the queue.")

    class Meta:
        ordering = ("partition",)
        verbose_name = "partition"
        verbose_name_plural = "partitions"

    def __str__(self) -> str:
        return f"partition {self.partition}"


class RevokedTask(models.Model):
    """A task id an ordered worker was told to revoke, kept so that a restarted worker honours it."""

    task_id = models.CharField(max_length=255, unique=True)
    revoked_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ("-revoked_at",)

    def __str__(self) -> str:
        return f"revoked {self.task_id}"
