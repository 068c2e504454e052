"""Shared base of the ``ordered_replay`` and ``ordered_skip`` commands."""

from __future__ import annotations

import getpass
from typing import Any, Callable

from django.core.management.base import BaseCommand, CommandError, CommandParser

from ...exceptions import OrderedTaskError


class ControlCommand(BaseCommand):
    """Request one control action for each key given on the command line."""

    action = ""
    requests: Callable[..., Any]

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("keys", nargs="+", metavar="KEY", help="Ordering key (as a string).")
        parser.add_argument("--by", default=None,
                            help="Who asks, for the record (default: the login name).")

    def handle(self, *args: Any, **options: Any) -> None:
        who = options["by"] or f"{getpass.getuser()} (command line)"
        failed = []
        for key in options["keys"]:
            try:
                request = type(self).requests(key, requested_by=who)
            except OrderedTaskError as exc:
                self.stderr.write(str(exc))
                failed.append(key)
                continue
            self.stdout.write(f"{self.action} of key {request.key!r} requested (request {request.pk}); "
                              "the key's consumer applies it after the messages ahead of it.")
        if failed:
            raise CommandError(f"Nothing requested for {len(failed)} key(s): {', '.join(failed)}")
