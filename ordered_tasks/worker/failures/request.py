"""The worker request of ordered tasks: keeps what parking needs, parks what Celery would drop."""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from billiard.exceptions import WorkerLostError
from celery.exceptions import Ignore, TimeLimitExceeded
from celery.worker import state
from celery.worker.request import Request
from kombu.exceptions import ContentDisallowed, DecodeError

from ...models import ParkedMessage
from ..delivery import CONTENT_ENTRY, FENCE_ENTRY, RERUN_ENTRY, TENURE_ENTRY, delivered_partition
from ..health.figures import FIGURES
from ..sequencing.window import hand_back_in_place
from ..setup import ordered_worker
from .book import BOOK
from .control import arrived
from .retry import Parked
from .unrunnable import hand_over

Reason = ParkedMessage.Reason
logger = logging.getLogger(__name__)
#: The state of a task whose message was parked behind its held key (or as a misfit) without
#: running: the ``task-parked`` event's, which Flower shows, and the result backend's.
PARKED_STATE = "PARKED"
#: Times a message is run again after its pool process died, before it is parked.
MAX_RERUNS = 2
_LOST: dict[str, int] = {}


class OrderedRequest(Request):  # type: ignore[misc]
    """Celery's request, except that no failure path acknowledges a message it did not park.

    Celery acknowledges (drops) the message of a task whose body cannot be
    decoded, that exceeded its hard time limit, or whose pool process died.
    For ordered tasks a message whose pool process died runs again (up to
    ``MAX_RERUNS`` times); otherwise the message is parked and its key
    blocked, and the acknowledgement follows once the parked row is stored.
    """

    _parking = False

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        entries = self._request_dict  # type: ignore[attr-defined]
        entries[CONTENT_ENTRY] = [self._content_type, self._content_encoding]  # type: ignore[attr-defined]
        partition = delivered_partition(entries)
        arrived(self.app, partition)
        setup = ordered_worker(self.app)
        keeper = setup.keeper if setup is not None else None
        if keeper is not None:
            entries[FENCE_ENTRY] = keeper.fence_of(partition)
        elif BOOK.versions is not None:  # RabbitMQ: the tenure of the connection it arrived on
            entries[TENURE_ENTRY] = BOOK.versions.tenure(partition)

    def acknowledge(self) -> None:
        if not self._parking:
            if not self.acknowledged:
                FIGURES.ended(self)
            super().acknowledge()

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        FIGURES.started(self)
        super().on_accepted(pid, time_accepted)

    def reject(self, requeue: bool = False) -> None:
        if not self._parking:
            if not self.acknowledged:
                FIGURES.ended(self)
            if requeue and self._hand_back_in_place():
                return
            super().reject(requeue)

    def _hand_back_in_place(self) -> bool:
        """Run the message again after a pause, still first of its key, instead of requeueing it."""
        setup = ordered_worker(self.app)
        if setup is None or setup.consumer is None:
            return False
        if hand_back_in_place(setup.consumer, self._message):  # type: ignore[attr-defined]
            state.task_ready(self)
            return True
        return False

    def _park(self, reason: str, error: str) -> bool:
        setup = ordered_worker(self.app)
        if setup is None or setup.pool is None or self._parking:
            return self._parking

        def parked() -> None:
            self._parking = False
            self.acknowledge()

        def not_parked() -> None:
            self._parking = False
            self.reject(requeue=True)

        message = self._message  # type: ignore[attr-defined]
        self._parking = hand_over(setup, message, reason, error, ack=parked, requeue=not_parked)
        return self._parking

    def _announce_parked(self, reason: str) -> None:
        """Give the task a final state: Celery sends none for a message that ends in ``Ignore``.

        Without it, Flower and ``celery events`` show the task as ``STARTED``
        for good. A ``task-parked`` event makes their state ``PARKED`` (a
        custom state ranks above ``STARTED``; ``task-rejected`` would not),
        and a result backend, unless the result is ignored, stores
        ``PARKED`` until a replay stores the real outcome.
        """
        self.send_event("task-parked", reason=reason)
        if self.ignore_result:
            return
        try:
            self.task.backend.store_result(self.id, {"reason": reason}, PARKED_STATE,
                                           request=self._context)  # type: ignore[attr-defined]
        except Exception as exc:  # the message is parked already: the state is only information
            logger.warning("Could not store the PARKED state of %s[%s]: %r", self.name, self.id, exc)

    def _announce_revoked(self, reason: str, terminated: bool, signum: Any, expired: bool) -> None:
        self._park(Reason.REVOKED, f"Revoked ({reason}).")
        super()._announce_revoked(reason, terminated, signum, expired)  # type: ignore[misc]

    def _run_again(self) -> bool:
        """Run the message again in a new pool process, before any later message.

        The message is still unacknowledged and heads its key's lane, so
        nothing later of its key started. After MAX_RERUNS deaths in a row it
        is parked instead.
        """
        setup = ordered_worker(self.app)
        pool = setup.pool if setup is not None else None
        lost = _LOST.get(self.id, 0)
        if pool is None or lost >= MAX_RERUNS:
            _LOST.pop(self.id, None)
            return False
        if len(_LOST) > 1000:
            _LOST.clear()
        _LOST[self.id] = lost + 1
        self._request_dict[RERUN_ENTRY] = True  # type: ignore[attr-defined]
        logger.warning("The pool process running %s[%s] died; running it again.", self.name, self.id)
        self.execute_using_pool(pool)
        return True

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft and not state.should_terminate:
            self._park(Reason.TIME_LIMIT, f"Hard time limit ({timeout} s) exceeded.")
        super().on_timeout(soft, timeout)

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        if not isinstance(exc, Ignore):  # parked behind a held key, or a redelivered copy
            FIGURES.failed(self)
        elif isinstance(exc, Parked):
            self._announce_parked(str(exc))
        if isinstance(exc, (DecodeError, ContentDisallowed)):
            if self._park(Reason.UNDECODABLE, repr(exc)):
                state.task_ready(self)
                return None
        elif isinstance(exc, WorkerLostError) and not self._parking:
            if state.should_terminate:  # cold shutdown: leave it unacknowledged, it comes back
                state.task_ready(self)
                return None
            if self._run_again():
                return None
            self._park(Reason.WORKER_LOST, f"{exc!r} ({MAX_RERUNS + 1} times in a row)")
        elif isinstance(exc, TimeLimitExceeded):
            self._park(Reason.TIME_LIMIT, repr(exc))
        return super().on_failure(exc_info, send_failed_event, return_ok)
