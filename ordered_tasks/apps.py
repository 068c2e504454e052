"""Django app configuration: wires checks and the Celery plugin."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks


class OrderedTasksConfig(AppConfig):
    """ordered_tasks as a Django app."""

    name = "ordered_tasks"
    verbose_name = "Ordered tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import messages  # noqa: F401  (registers the control task)
        from .checks import check_settings
        from .plugin import install_everywhere

        checks.register(check_settings)
        install_everywhere()
