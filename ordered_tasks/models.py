"""Database records of keys that left the happy path: their state and parked messages."""

from __future__ import annotations

from django.db import models

from .partitioning import MAX_KEY_LENGTH

ACTIVE = "active"
RETRYING = "retrying"
BLOCKED = "blocked"


class AccountState(models.Model):
    """The state of one ordering key, written only by the consumer of its partition.

    A key that never failed has no row: the happy path writes nothing.
    """

    class Status(models.TextChoices):
        ACTIVE = ACTIVE, "active"
        RETRYING = RETRYING, "retrying"
        BLOCKED = BLOCKED, "blocked"

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
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "account state"
        ordering = ("key",)
        permissions = [("replay_accountstate", "Can replay or skip the parked messages of a key")]

    def __str__(self) -> str:
        return f"{self.key} ({self.status})"


class ParkedMessage(models.Model):
    """A message of a blocked or retrying key, kept with everything needed to run it."""

    class State(models.TextChoices):
        PARKED = "parked", "parked (waits for its key)"
        SKIPPED = "skipped", "skipped by an operator (kept as a record)"
        FAILED = "failed", "failed and passed over (policy 'continue'; kept as a record)"

    class Reason(models.TextChoices):
        FAILED = "failed", "the task failed"
        RETRYING = "retrying", "waiting for an in-place retry"
        KEY_HELD = "key_held", "an earlier message of its key is blocked or retrying"
        UNKNOWN_TASK = "unknown_task", "no task of this name is registered in the worker"
        UNDECODABLE = "undecodable", "the body could not be decoded"
        INVALID = "invalid", "the message is not a valid task message"
        TIME_LIMIT = "time_limit", "the task exceeded its hard time limit"
        WORKER_LOST = "worker_lost", "the process running the task died"
        REVOKED = "revoked", "revoked by an operator (kept as a record)"

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


class ControlRequest(models.Model):
    """Who asked to replay or skip a key, when, and what the consumer did about it."""

    class Action(models.TextChoices):
        REPLAY = "replay", "replay"
        SKIP = "skip", "skip"

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
