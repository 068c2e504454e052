"""The worker request of ordered tasks: keeps what parking needs, parks undecodable bodies."""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from celery.worker.request import Request
from celery.worker.state import task_ready
from kombu.exceptions import ContentDisallowed, DecodeError

from ..models import ParkedMessage
from .consumer import current_pool
from .delivery import CONTENT_ENTRY
from .unrunnable import hand_over


class OrderedRequest(Request):  # type: ignore[misc]
    """Celery's request plus the body's content type, for storing the body when it parks."""

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        content = [self._content_type, self._content_encoding]  # type: ignore[attr-defined]
        self._request_dict[CONTENT_ENTRY] = content  # type: ignore[attr-defined]

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        pool = current_pool()
        message = self._message  # type: ignore[attr-defined]
        if (isinstance(exc, (DecodeError, ContentDisallowed)) and pool is not None
                and hand_over(pool, message, ParkedMessage.Reason.UNDECODABLE, repr(exc))):
            task_ready(self)
            return None
        return super().on_failure(exc_info, send_failed_event, return_ok)
