"""Tasks of the testing helper's tests and of its documentation page; they record what ran in lists."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from ordered_tasks import ordered_task

#: The events applied, in the order they ran: ``(account_id, seq)``.
APPLIED: list[tuple[Any, int]] = []
#: Events that raise ValueError while they are in this set (a bug the test "fixes" by removing them).
BROKEN: set[tuple[Any, int]] = set()
#: Per account, how many more calls to the CRM fail with ConnectionError (-1: all of them).
OUTAGES: dict[Any, int] = {}
#: ``self.request.retries`` as each run of ``charge`` saw it.
RETRIES_SEEN: list[int] = []
#: What the plain (not ordered) task noted, in order.
NOTES: list[str] = []


def reset() -> None:
    """Forget everything the tasks recorded and every failure switched on."""
    for recorded in (APPLIED, RETRIES_SEEN, NOTES):
        recorded.clear()
    BROKEN.clear()
    OUTAGES.clear()


def call_crm(account_id: Any) -> None:
    """Stands for a remote service: raises ConnectionError while the account's outage lasts."""
    left = OUTAGES.get(account_id, 0)
    if left:
        OUTAGES[account_id] = left - 1 if left > 0 else left
        raise ConnectionError(f"CRM unreachable for account {account_id}")


# [apply_event]
@ordered_task(key="account_id")
def apply_event(account_id: int, seq: int) -> None:
    """Apply event ``seq`` of an account."""
    if (account_id, seq) in BROKEN:
        raise ValueError(f"event {seq} of account {account_id} is broken")
    APPLIED.append((account_id, seq))
# [/apply_event]


# [push_to_crm]
@ordered_task(key="account_id", autoretry_for=(ConnectionError,), max_retries=3,
              retry_backoff=True, retry_jitter=False)
def push_to_crm(account_id: int, seq: int) -> None:
    """Send event ``seq`` to the CRM; retried in place, after 1, 2 and 4 seconds."""
    call_crm(account_id)
    APPLIED.append((account_id, seq))
# [/push_to_crm]


@ordered_task(key="account_id", bind=True, max_retries=3)
def charge(self: Any, account_id: int, seq: int) -> None:
    """Retries itself with ``self.retry`` as a Celery user would, after 30 seconds."""
    RETRIES_SEEN.append(self.request.retries)
    try:
        call_crm(account_id)
    except ConnectionError as exc:
        raise self.retry(exc=exc, countdown=30) from exc
    APPLIED.append((account_id, seq))


@ordered_task(key="account_id", failure_policy="continue")
def notify(account_id: int, seq: int) -> None:
    """Fails like ``apply_event``, but its key goes on (policy ``continue``)."""
    if (account_id, seq) in BROKEN:
        raise ValueError(f"notification {seq} of account {account_id} is broken")
    APPLIED.append((account_id, seq))


@ordered_task(key="account_id")
def open_account(account_id: int, seq: int, with_note: bool = False) -> None:
    """Applies its event, then publishes the account's next event (and a plain task if asked)."""
    APPLIED.append((account_id, seq))
    if with_note:
        note.delay(f"opened {account_id}")
    apply_event.delay(account_id=account_id, seq=seq + 1)


@shared_task(name="events.testing_helper.routed_event")
def routed_event(key: Any, seq: int) -> None:
    """A plain task that ``ORDERED_TASKS["ROUTES"]`` orders by its ``key`` argument."""
    if (key, seq) in BROKEN:
        raise ValueError(f"routed event {seq} of {key} is broken")
    APPLIED.append((key, seq))


@shared_task(name="tests.testapp.testing_tasks.note")
def note(text: str) -> None:
    """A plain Celery task: not ordered, so the runner leaves it alone."""
    NOTES.append(text)
