"""``manage.py ordered_status``: the partitions and the held keys, for people and for health checks."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError
from django.db.models import Case, Count, IntegerField, OuterRef, QuerySet, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from ...conf import get_settings
from ...dashboard import PartitionRow, overview
from ...exceptions import OrderedTaskError
from ...health import STALL_AFTER
from ...models import AccountState, ParkedMessage
from ...partitioning import canonical_key, partition_for
from ...states import KeyStatus

#: Exit statuses. 1 (an error: wrong arguments, no database) and 2 (a malformed
#: command line) keep their usual meaning; the health answers start at 3, and the
#: most severe condition found decides.
EXIT_HEALTHY = 0
EXIT_BLOCKED = 3
EXIT_STALLED = 4
EXIT_BROKER_UNREACHABLE = 5

#: The version of the ``--json`` document; it changes only when a field changes meaning or goes away.
JSON_VERSION = 1

_VERDICTS = {EXIT_HEALTHY: "healthy", EXIT_BLOCKED: "blocked", EXIT_STALLED: "stalled",
             EXIT_BROKER_UNREACHABLE: "broker_unreachable"}
_HELD = (KeyStatus.BLOCKED.value, KeyStatus.RETRYING.value)
_URGENCY = Case(When(status=KeyStatus.BLOCKED, then=Value(0)), default=Value(1), output_field=IntegerField())
_ERROR_WIDTH = 100


class Unhealthy(CommandError):
    """The answer is not healthy: the exit status says why (printed as ``Unhealthy: ...``)."""


class Command(BaseCommand):
    """Print the partitions and the blocked and retrying keys; the exit status sums them up."""

    help = ("Show each partition (consumer, waiting messages, oldest wait, tasks per minute) and the "
            "blocked and retrying keys with their error, or one key with its parked messages. Exit "
            f"status: {EXIT_HEALTHY} healthy, {EXIT_BLOCKED} a key is blocked, {EXIT_STALLED} a "
            f"partition is stalled, {EXIT_BROKER_UNREACHABLE} the broker cannot be reached.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true",
                            help="Print one JSON document instead of tables.")
        which = parser.add_mutually_exclusive_group()
        which.add_argument("--partition", type=int, default=None, metavar="N",
                           help="Only this partition and its blocked and retrying keys.")
        which.add_argument("--key", default=None, metavar="KEY",
                           help="One key (as a string): its partition, state and parked messages.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["partition"] is not None and options["key"] is not None:
            raise CommandError("Give --partition or --key, not both: a key's partition is shown with it.")
        try:
            document = self.collect(options["partition"], options["key"])
        except OrderedTaskError as exc:  # an invalid key, or a setting the system checks did not see
            raise CommandError(str(exc)) from exc
        except DatabaseError as exc:
            raise CommandError(
                f"Could not read the ordered_tasks tables ({type(exc).__name__}: {exc}). Check that "
                "the database answers and that its migrations are applied (manage.py migrate).") from exc
        if options["json"]:
            self.stdout.write(json.dumps(document, indent=2, ensure_ascii=False))
        else:
            self.stdout.write("\n".join(_human(document)))
        code = document["exit_code"]
        if code != EXIT_HEALTHY:
            raise Unhealthy(f"{document['summary']} (exit status {code})", returncode=code)

    def collect(self, partition: int | None, key: str | None) -> dict[str, Any]:
        """The whole answer, as the ``--json`` document."""
        partitions = get_settings().partitions
        canonical = None if key is None else canonical_key(key)
        if canonical is None and partition is not None and not 0 <= partition < partitions:
            raise CommandError(
                f"There is no partition {partition}: ORDERED_TASKS['PARTITIONS'] is {partitions}, so "
                f"they are numbered 0 to {partitions - 1}. Pass one of those, or leave out --partition "
                "to see them all.")
        now = timezone.now()
        rows, broker_error = overview(now)
        messages: list[dict[str, Any]] | None = None
        if canonical is not None:
            home = partition_for(canonical, partitions)
            shown = [row for row in rows if row.partition == home]
            states = _annotated(AccountState.objects.filter(key=canonical))
            keys = [_key_entry(state) for state in states] or [_never_failed(canonical, home)]
            parked = ParkedMessage.objects.filter(key=canonical).order_by("position")
            messages = [_message_entry(row) for row in parked]
        else:
            shown = [row for row in rows if partition is None or row.partition == partition]
            held = AccountState.objects.filter(status__in=_HELD)
            if partition is not None:
                held = held.filter(partition=partition)
            keys = [_key_entry(state) for state in _annotated(held)]
        entries = [_partition_entry(row) for row in shown]
        blocked = sum(entry["status"] == KeyStatus.BLOCKED for entry in keys)
        retrying = sum(entry["status"] == KeyStatus.RETRYING for entry in keys)
        stalled = [entry["partition"] for entry in entries if entry["stalled"]]
        if broker_error is not None:
            code, summary = EXIT_BROKER_UNREACHABLE, f"the broker cannot be reached: {broker_error}"
        elif stalled:
            code, summary = EXIT_STALLED, f"{_plural(len(stalled), 'partition')} {_numbers(stalled)} stalled"
        elif blocked:
            code, summary = EXIT_BLOCKED, f"{_count(blocked, 'key')} blocked"
        else:
            code, summary = EXIT_HEALTHY, "no key blocked, no partition stalled"
        return {
            "version": JSON_VERSION,
            "checked_at": now.isoformat(),
            "status": _VERDICTS[code],
            "exit_code": code,
            "summary": summary,
            "scope": {"partition": partition, "key": canonical},
            "broker": {"reachable": broker_error is None, "error": broker_error},
            "counts": {"blocked": blocked, "retrying": retrying, "stalled": stalled},
            "partitions": entries,
            "keys": keys,
            "messages": messages,
        }


def _annotated(states: QuerySet[AccountState]) -> QuerySet[AccountState]:
    """Held keys first, each with its parked count and the reason and error of its first parked message."""
    parked = ParkedMessage.objects.filter(key=OuterRef("key"), state=ParkedMessage.State.PARKED)
    count = parked.order_by().values("key").annotate(n=Count("pk")).values("n")
    head = parked.order_by("position")
    return states.annotate(
        parked=Coalesce(Subquery(count, output_field=IntegerField()), 0),
        head_reason=Subquery(head.values("reason")[:1]),
        head_error=Subquery(head.values("exception")[:1]),
    ).order_by(_URGENCY.asc(), "partition", "key")


def _key_entry(state: AccountState) -> dict[str, Any]:
    head_reason = getattr(state, "head_reason", None)
    error = getattr(state, "head_error", None) if head_reason is not None else state.last_error
    return {
        "key": state.key,
        "partition": state.partition,
        "status": state.status,
        "parked": int(getattr(state, "parked", 0)),
        "reason": head_reason,
        "error": _first_line(error or ""),
        "error_at": _iso(state.last_error_at),
        "blocked_at": _iso(state.blocked_at) if state.status == KeyStatus.BLOCKED else None,
        "retry_at": _iso(state.retry_at),
    }


def _never_failed(key: str, partition: int) -> dict[str, Any]:
    return {"key": key, "partition": partition, "status": KeyStatus.ACTIVE.value, "parked": 0,
            "reason": None, "error": "", "error_at": None, "blocked_at": None, "retry_at": None}


def _message_entry(row: ParkedMessage) -> dict[str, Any]:
    return {
        "position": row.position,
        "state": row.state,
        "reason": row.reason,
        "task_name": row.task_name,
        "task_id": row.task_id,
        "parked_at": _iso(row.created_at),
        "due_at": _iso(row.due_at),
        "attempts": row.attempts,
        "error": row.exception,
    }


def _stall(row: PartitionRow) -> str | None:
    """Why the partition counts as stalled, or None: only when messages wait in its queue."""
    if not row.depth:
        return None
    if row.stalled:  # the partitions page's own verdict: nothing runs and nothing moved
        return f"nothing moved for {row.quiet_for:.0f} s"
    if row.status is None or not row.status.worker:
        return "no consumer has reported"
    if row.report_age is not None and row.report_age > STALL_AFTER:
        return f"its consumer has not reported for {row.report_age:.0f} s"
    return None


def _partition_entry(row: PartitionRow) -> dict[str, Any]:
    status = row.status
    running = None
    if status is not None and status.running_task:
        running = {"task": status.running_task, "task_id": status.running_task_id,
                   "key": status.running_key, "since": _iso(status.running_since)}
    reason = _stall(row)
    return {
        "partition": row.partition,
        "queue": row.queue,
        "owner": (status.worker or None) if status is not None else None,
        "owner_since": _iso(status.consumer_since) if status is not None else None,
        "report_age": _round(row.report_age),
        "silent": row.silent,
        "depth": row.depth,
        "oldest_age": _round(row.oldest_age),
        "oldest_is_estimate": row.oldest_is_estimate,
        "per_minute": status.per_minute if status is not None else None,
        "completed": status.completed if status is not None else None,
        "failed": status.failed if status is not None else None,
        "running": running,
        "quiet_for": _round(row.quiet_for),
        "blocked": row.blocked,
        "retrying": row.retrying,
        "stalled": reason is not None,
        "stall_reason": reason,
    }


def _human(document: dict[str, Any]) -> list[str]:
    """The document as tables, for a terminal or a cron mail."""
    lines = []
    broker = document["broker"]
    if not broker["reachable"]:
        lines += [f"Broker: cannot be reached, so queue depths are unknown: {broker['error']}", ""]
    keys, messages = document["keys"], document["messages"]
    if messages is not None:
        lines += [*_key_lines(keys[0]), ""]
    lines += _table(
        ("PARTITION", "QUEUE", "OWNER", "REPORTED", "WAITING", "OLDEST", "PER MIN", "BLOCKED", "RETRYING",
         "STATE"),
        [(str(p["partition"]), p["queue"], p["owner"] or "-", _reported(p), _or(p["depth"], "?"),
          _oldest(p), _or(p["per_minute"]), str(p["blocked"]), str(p["retrying"]), _state(p))
         for p in document["partitions"]])
    lines.append("")
    if messages is not None:
        lines += _message_lines(messages)
    else:
        counts = document["counts"]
        lines.append(f"Held keys: {counts['blocked']} blocked, {counts['retrying']} retrying.")
        if keys:
            lines += _table(("STATUS", "KEY", "PARTITION", "PARKED", "SINCE", "ERROR"), [
                (k["status"], _clean(k["key"]), str(k["partition"]), str(k["parked"]), _since(k),
                 _short(k["error"])) for k in keys])
    code = document["exit_code"]
    lines += ["", f"Status: {document['status']} (exit status {code}): {document['summary']}."]
    return lines


def _key_lines(key: dict[str, Any]) -> list[str]:
    lines = [f"Key {_clean(key['key'])}: {key['status']}, partition {key['partition']}, "
             f"{_count(key['parked'], 'parked message')}."]
    if key["retry_at"]:
        lines.append(f"Retry at: {_when(key['retry_at'])}")
    if key["error"]:
        lines.append(f"Error: {_clean(key['error'])}")
    return lines


def _message_lines(messages: list[dict[str, Any]]) -> list[str]:
    if not messages:
        return ["No parked message."]
    return ["Parked messages, in the order they will run:", *_table(
        ("#", "STATE", "REASON", "TASK", "TASK ID", "PARKED", "ERROR"),
        [(str(m["position"]), m["state"], m["reason"], _clean(m["task_name"]) or "?", m["task_id"] or "-",
          _when(m["parked_at"]), _short(m["error"])) for m in messages])]


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in (headers, *rows)]


def _reported(entry: dict[str, Any]) -> str:
    if entry["report_age"] is None:
        return "never"
    return f"{'silent ' if entry['silent'] else ''}{entry['report_age']:.0f} s ago"


def _oldest(entry: dict[str, Any]) -> str:
    if entry["oldest_age"] is None:
        return "-"
    return f"{'~' if entry['oldest_is_estimate'] else ''}{entry['oldest_age']:.1f} s"


def _state(entry: dict[str, Any]) -> str:
    if entry["stalled"]:
        return f"stalled: {entry['stall_reason']}"
    return "?" if entry["depth"] is None else "ok"


def _since(entry: dict[str, Any]) -> str:
    if entry["blocked_at"]:
        return _when(entry["blocked_at"])
    return f"retry {_when(entry['retry_at'])}" if entry["retry_at"] else "-"


def _or(value: Any, missing: str = "-") -> str:
    return missing if value is None else str(value)


def _count(n: int, noun: str) -> str:
    return f"{n} {_plural(n, noun)}"


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else f"{noun}s"


def _numbers(partitions: list[int]) -> str:
    return ", ".join(str(p) for p in partitions)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def _short(text: str) -> str:
    line = _clean(_first_line(text))
    return line if len(line) <= _ERROR_WIDTH else line[:_ERROR_WIDTH - 3] + "..."


def _clean(text: str) -> str:
    """Keys and errors come from users: show control characters escaped, not acted on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _when(iso: str | None) -> str:
    if iso is None:
        return "-"
    return timezone.localtime(datetime.fromisoformat(iso)).strftime("%Y-%m-%d %H:%M:%S")


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)
