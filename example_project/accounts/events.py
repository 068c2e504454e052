"""The account events, their handlers and the state a correct run must reach."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from django.db import transaction
from django.db.models import F

from .models import Account, HandledEvent, Member, Office


class EventError(Exception):
    """An event could not be applied to the account as it stands."""


def _add_office(account: Account, office: str, **_: Any) -> None:
    time.sleep(0.03)  # offices are created in a slow external system first
    Office.objects.create(account=account, name=office)


def _add_members(account: Account, office: str, emails: list[str], **_: Any) -> None:
    target = Office.objects.filter(account=account, name=office).first()
    if target is None:
        raise EventError(f"office {office!r} does not exist yet")
    for email in emails:
        Member.objects.create(account=account, office=target, email=email)


def _move_member(account: Account, email: str, office: str, **_: Any) -> None:
    target = Office.objects.filter(account=account, name=office).first()
    if target is None:
        raise EventError(f"office {office!r} does not exist yet")
    if not Member.objects.filter(account=account, email=email).update(office=target):
        raise EventError(f"member {email!r} does not exist yet")


def _remove_member(account: Account, email: str, **_: Any) -> None:
    Member.objects.filter(account=account, email=email).delete()


HANDLERS: dict[str, Callable[..., None]] = {
    "add_office": _add_office,
    "add_members": _add_members,
    "move_member": _move_member,
    "remove_member": _remove_member,
}


def apply_event(account_id: int, seq: int, kind: str, data: dict[str, Any], run: str = "") -> None:
    """Apply one event; record on the account and as a ``HandledEvent`` whether it came late or failed.

    An event is late (run out of order) when a later event of its account ran before it, failed or
    not; a failed event leaves the account as it was.
    """
    late = failed = False
    try:
        with transaction.atomic():
            account = Account.objects.select_for_update().get(pk=account_id)
            late = seq < account.last_seq
            try:
                with transaction.atomic():
                    HANDLERS[kind](account, **data)
            except EventError:
                failed = True
            Account.objects.filter(pk=account_id).update(
                last_seq=max(seq, account.last_seq), out_of_order=F("out_of_order") + int(late),
                failed=F("failed") + int(failed), processed=F("processed") + 1)
            _record(run, account_id, seq, kind, late, failed)
    except Exception:
        # Count it anyway, so that the demo does not wait for an event that will never finish.
        with transaction.atomic():
            Account.objects.filter(pk=account_id).update(failed=F("failed") + 1, processed=F("processed") + 1)
            _record(run, account_id, seq, kind, late, True)
        raise


def _record(run: str, account_id: int, seq: int, kind: str, late: bool, failed: bool) -> None:
    HandledEvent.objects.create(run=run, account_id=account_id, seq=seq, kind=kind, finished=time.time(),
                                out_of_order=late, failed=failed)


@dataclass
class Expected:
    """The state an account reaches when its events run in order."""

    offices: set[str] = field(default_factory=set)
    members: dict[str, str] = field(default_factory=dict)


def history(account_id: int) -> list[tuple[str, dict[str, Any]]]:
    """The events of one account: an office, people, a second office, a move, a leave."""
    emails = [f"p{n}@a{account_id}.example" for n in range(3)]
    return [
        ("add_office", {"office": "HQ"}),
        ("add_members", {"office": "HQ", "emails": emails}),
        ("add_office", {"office": "Branch"}),
        ("move_member", {"email": emails[0], "office": "Branch"}),
        ("remove_member", {"email": emails[1]}),
    ]


def expected_state(events: list[tuple[str, dict[str, Any]]]) -> Expected:
    """Replay ``events`` in memory, in order."""
    state = Expected()
    for kind, data in events:
        if kind == "add_office":
            state.offices.add(data["office"])
        elif kind == "add_members":
            state.members.update({e: data["office"] for e in data["emails"]})
        elif kind == "move_member":
            state.members[data["email"]] = data["office"]
        elif kind == "remove_member":
            state.members.pop(data["email"], None)
    return state


def actual_state(account: Account) -> Expected:
    """What the database holds for ``account``."""
    return Expected(
        offices=set(account.offices.values_list("name", flat=True)),
        members=dict(account.members.values_list("email", "office__name")),
    )


def interleave(
    accounts: list[int], active: int, rng: random.Random
) -> list[tuple[int, int, str, dict[str, Any]]]:
    """Events of all accounts, each account's in order, ``active`` accounts at a time mixed."""
    pending = {a: list(enumerate(history(a), start=1)) for a in accounts}
    waiting = list(accounts)
    live: list[int] = []
    burst = []
    while waiting or live:
        while waiting and len(live) < active:
            live.append(waiting.pop(0))
        account = rng.choice(live)
        seq, (kind, data) = pending[account].pop(0)
        burst.append((account, seq, kind, data))
        if not pending[account]:
            live.remove(account)
    return burst
