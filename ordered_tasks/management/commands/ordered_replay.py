"""``manage.py ordered_replay KEY...``: run the parked messages of blocked keys again."""

from __future__ import annotations

from ...actions import replay
from ._control import ControlCommand


class Command(ControlCommand):
    """Replay blocked keys: their parked messages run again, in order."""

    help = ("Replay blocked or retrying keys: their parked messages run again in their original "
            "order; a key becomes active when all succeed and is blocked again at the first failure.")
    action = "replay"
    requests = staticmethod(replay)
