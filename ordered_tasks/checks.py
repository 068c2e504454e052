"""Django system checks for the ``ORDERED_TASKS`` setting."""

from __future__ import annotations

from typing import Any

from django.core.checks import CheckMessage, Error

from .conf import _raw, find_problems


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Report every problem of ``settings.ORDERED_TASKS``."""
    return [Error(p.msg, hint=p.hint, id=p.id) for p in find_problems(_raw())]
