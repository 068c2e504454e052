"""``manage.py ordered_skip KEY...``: set aside the failed message of blocked keys."""

from __future__ import annotations

from ...actions import skip
from ._control import ControlCommand


class Command(ControlCommand):
    """Skip the failed head message of blocked keys, then run the rest in order."""

    help = ("Skip the failed message at the head of blocked or retrying keys (it is kept as a "
            "record), then run the rest of their parked messages in order.")
    action = "skip"
    requests = staticmethod(skip)
