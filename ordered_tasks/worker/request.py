"""The worker request of ordered tasks: keeps what parking needs, parks what Celery would drop."""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded
from celery.worker import state
from celery.worker.request import Request
from kombu.exceptions import ContentDisallowed, DecodeError

from ..models import ParkedMessage
from .consumer import current_pool
from .delivery import CONTENT_ENTRY
from .unrunnable import hand_over

Reason = ParkedMessage.Reason


class OrderedRequest(Request):  # type: ignore[misc]
    """Celery's request, except that no failure path acknowledges a message it did not park.

    Celery acknowledges (drops) the message of a task whose body cannot be
    decoded, that exceeded its hard time limit, or whose pool process died.
    For ordered tasks the message is parked instead and its key blocked; the
    acknowledgement follows once the parked row is stored.
    """

    _parking = False

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        content = [self._content_type, self._content_encoding]  # type: ignore[attr-defined]
        self._request_dict[CONTENT_ENTRY] = content  # type: ignore[attr-defined]

    def acknowledge(self) -> None:
        if not self._parking:
            super().acknowledge()

    def reject(self, requeue: bool = False) -> None:
        if not self._parking:
            super().reject(requeue)

    def _park(self, reason: str, error: str) -> bool:
        pool = current_pool()
        if pool is None or self._parking:
            return self._parking

        def parked() -> None:
            self._parking = False
            self.acknowledge()

        def not_parked() -> None:
            self._parking = False
            self.reject(requeue=True)

        message = self._message  # type: ignore[attr-defined]
        self._parking = hand_over(pool, message, reason, error, ack=parked, requeue=not_parked)
        return self._parking

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        self._park(Reason.REVOKED, f"Revoked ({reason}).")
        super()._announce_revoked(reason, terminated, signum, expired)  # type: ignore[misc]

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft and not state.should_terminate:
            self._park(Reason.TIME_LIMIT, f"Hard time limit ({timeout} s) exceeded.")
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if isinstance(exc, (DecodeError, ContentDisallowed)):
            if self._park(Reason.UNDECODABLE, repr(exc)):
                state.task_ready(self)
                return None
        elif isinstance(exc, WorkerLostError):
            if state.should_terminate:  # cold shutdown: leave it unacknowledged, it comes back
                state.task_ready(self)
                return None
            self._park(Reason.WORKER_LOST, repr(exc))
        elif isinstance(exc, TimeLimitExceeded):
            self._park(Reason.TIME_LIMIT, repr(exc))
        return super().on_failure(exc_info, send_failed_event, return_ok)
