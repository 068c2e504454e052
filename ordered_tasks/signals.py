"""Django signals sent by the consumer when a key is blocked or resumes."""

from __future__ import annotations

from django.dispatch import Signal

#: Sent when a key becomes blocked, with ``sender`` the ``AccountState`` model.
#: Arguments: ``key``, ``partition``, ``task_name``, ``task_id``,
#: ``exception`` (text) and ``reason`` (a ``ParkedMessage.Reason`` value).
key_blocked = Signal()

#: Sent when a blocked or retrying key has run all its parked messages and is
#: active again, with ``sender`` the ``AccountState`` model. Arguments:
#: ``key``, ``partition``.
key_resumed = Signal()
