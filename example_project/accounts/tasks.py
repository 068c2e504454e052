"""The same account events published as plain Celery tasks and as ordered tasks."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.conf import settings

from ordered_tasks import ordered_task

from .events import apply_event

#: The plain worker's queue (``EXAMPLE_PLAIN_QUEUE`` in the settings).
PLAIN_QUEUE: str = settings.EXAMPLE_PLAIN_QUEUE


@shared_task(queue=PLAIN_QUEUE, ignore_result=True)
def plain_event(account_id: int, seq: int, kind: str, data: dict[str, Any]) -> None:
    """Apply an account event on whichever worker is free (plain Celery)."""
    apply_event(account_id, seq, kind, data, run="plain")


@ordered_task(key="account_id", ignore_result=True)
def ordered_event(account_id: int, seq: int, kind: str, data: dict[str, Any]) -> None:
    """Apply an account event after every earlier event of the account."""
    apply_event(account_id, seq, kind, data, run="ordered")


@shared_task(ignore_result=True)
def external_event(account_id: int, seq: int, kind: str, data: dict[str, Any]) -> None:
    """Published by another service with ``send_task``; ``ORDERED_TASKS['ROUTES']`` orders it."""
    apply_event(account_id, seq, kind, data, run="external")
