"""A function run in the worker's pool that reports its outcome through a callback with every pool."""

from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)


def reporting(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """Pool side: ``(True, result)``, or ``(False, what went wrong)`` instead of raising.

    Celery's threads pool drops what a function raises (its ``apply_target``
    calls the callback only on success and ignores ``error_callback``), and
    the solo pool raises it into the consumer's event loop; a result both
    always deliver.
    """
    try:
        return True, fn(*args)
    except Exception as exc:
        logger.exception("%s failed in the pool", getattr(fn, "__name__", fn))
        return False, repr(exc)


def run_in_pool(pool: Any, fn: Callable[..., Any], args: tuple[Any, ...],
                done: Callable[[Any], Any], failed: Callable[[Any], Any]) -> None:
    """Run ``fn(*args)`` in a pool process or thread; then ``done(result)`` or ``failed(error)``.

    ``fn`` must be a module-level function (the prefork pool pickles it).
    The callbacks run in the consumer's process, in the pool's thread with
    the threads pool: hand anything that touches the consumer to its loop.
    """

    def outcome(result: Any) -> None:
        ok, value = result if isinstance(result, tuple) and len(result) == 2 else (False, result)
        (done if ok else failed)(value)

    pool.apply_async(reporting, args=(fn, *args), callback=outcome, error_callback=failed)
