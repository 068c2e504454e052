"""Finding the project's Celery app for the worker launcher."""

from __future__ import annotations

from celery import Celery
from celery.app.utils import find_app

from .compat import current_or_default_app
from .conf import get_settings
from .exceptions import ConfigurationError


def find_celery_app(path: str | None = None) -> Celery:
    """The Celery app at ``path``, ``ORDERED_TASKS["CELERY_APP"]`` or the current app."""
    path = path or get_settings().celery_app
    if path:
        try:
            app = find_app(path)
        except Exception as exc:
            raise ConfigurationError(
                f"Cannot load the Celery app {path!r}: {exc}. Give the dotted path "
                "of the module or attribute, as for 'celery -A'."
            ) from exc
        if not isinstance(app, Celery):
            raise ConfigurationError(f"{path!r} is not a Celery app.")
        found: Celery = app
        return found
    current = current_or_default_app()
    if current is None or current.main == "default":
        raise ConfigurationError(
            "No Celery app is loaded. Import your app in your project's __init__.py "
            "(the Celery 'First steps with Django' layout), set "
            "ORDERED_TASKS['CELERY_APP'] = 'proj.celery:app', or pass --app."
        )
    return current
