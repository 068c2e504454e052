"""``manage.py ordered_purge``: empty partition queues into the database, never losing a message."""

from __future__ import annotations

import getpass
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from ...conf import get_settings
from ...exceptions import OrderedTaskError
from ...purge import PurgeReport, purge_partition, queue_name_of


class Command(BaseCommand):
    """Take the waiting messages of partition queues out, parked per key (or kept as discarded records)."""

    help = ("Take every message waiting in the given partition queues out of the broker and park it in "
            "the database (reason 'purged'), blocking its key until it is replayed or skipped; with "
            "--discard, keep each as a skipped record instead and leave its key alone. Use it instead "
            "of 'celery purge', which deletes ordered messages without a record. Refused for a "
            "partition that has a consumer: stop its workers (standbys too) first.")

    def add_arguments(self, parser: CommandParser) -> None:
        which = parser.add_mutually_exclusive_group(required=True)
        which.add_argument("--partition", type=int, nargs="+", action="extend", metavar="N",
                           help="Partition number(s) to purge (repeatable).")
        which.add_argument("--all", action="store_true", help="Every partition.")
        parser.add_argument("--discard", action="store_true",
                            help="Do not park: keep each message as a 'skipped' record only; its key "
                                 "is not blocked and the message never runs.")
        parser.add_argument("--yes", action="store_true", help="Do not ask for confirmation.")
        parser.add_argument("--by", default=None, metavar="NAME",
                            help="Who purges, for the record (default: the login name).")

    def handle(self, *args: Any, **options: Any) -> None:
        partitions = self._partitions(options)
        discard = bool(options["discard"])
        queues = ", ".join(queue_name_of(p) for p in partitions)
        if not options["yes"]:
            self._confirm(queues, discard)
        who = options["by"] or f"{getpass.getuser()} (command line)"
        from ...celery_app import find_celery_app

        try:
            app = find_celery_app(None)
        except OrderedTaskError as exc:
            raise CommandError(str(exc)) from exc
        refused = []
        for partition in partitions:
            try:
                report = purge_partition(app, partition, discard=discard, requested_by=who)
            except OrderedTaskError as exc:
                done = getattr(exc, "report", None)
                if done is not None and done.taken:
                    self.stdout.write(_summary(done))
                self.stderr.write(f"Partition {partition}: nothing (more) taken. {exc}")
                refused.append(partition)
                continue
            except DatabaseError as exc:
                raise CommandError(
                    f"Partition {partition}: could not write the parked messages ({type(exc).__name__}: "
                    f"{exc}); what was not stored stays in its queue. Check the database and its "
                    "migrations (manage.py migrate), then run the purge again.") from exc
            except Exception as exc:  # the broker: connection refused, timeout
                raise CommandError(
                    f"Partition {partition}: the broker failed ({type(exc).__name__}: {exc}); what was "
                    "not stored stays in its queue. Run the purge again once the broker answers.") from exc
            self.stdout.write(_summary(report))
        if refused:
            raise CommandError(f"Not purged (or not completely): partition(s) "
                               f"{', '.join(map(str, refused))}.")

    def _partitions(self, options: dict[str, Any]) -> list[int]:
        count = get_settings().partitions
        if options["all"]:
            return list(range(count))
        chosen = sorted(set(options["partition"]))
        wrong = [p for p in chosen if not 0 <= p < count]
        if wrong:
            raise CommandError(
                f"There is no partition {', '.join(map(str, wrong))}: ORDERED_TASKS['PARTITIONS'] is "
                f"{count}, so they are numbered 0 to {count - 1}.")
        return chosen

    def _confirm(self, queues: str, discard: bool) -> None:
        what = ("delete them from the broker, keeping each as a 'skipped' record that never runs"
                if discard else "park them in the database and block their keys until replayed or skipped")
        if not sys.stdin.isatty():
            raise CommandError(f"This would take every message waiting in {queues} and {what}. "
                               "Pass --yes to confirm.")
        answer = input(f"Take every message waiting in {queues} and {what}? Type 'yes' to go on: ")
        if answer.strip().lower() != "yes":
            raise CommandError("Purge cancelled: nothing was taken.")


def _summary(report: PurgeReport) -> str:
    if not report.taken:
        return f"Partition {report.partition} ({report.queue}): no message waiting."
    parts = []
    if report.parked:
        keys = sorted(report.keys)
        shown = ", ".join(repr(k) for k in keys[:10])
        if len(keys) > 10:
            shown += f" and {len(keys) - 10} more"
        parts.append(f"{report.parked} parked, blocking {len(keys)} key(s): {shown}")
    if report.discarded:
        parts.append(f"{report.discarded} discarded (kept as skipped records)")
    if report.refused:
        parts.append(f"{report.refused} kept as refused records (no key of this partition)")
    if report.duplicates:
        parts.append(f"{report.duplicates} already kept or completed (acknowledged only)")
    if report.control:
        parts.append(f"{report.control} control message(s) dropped")
    line = (f"Partition {report.partition} ({report.queue}): {report.taken} message(s) taken: "
            f"{'; '.join(parts)}.")
    if report.parked:
        line += " Replay or skip the keys (admin, manage.py ordered_replay / ordered_skip)."
    return line
