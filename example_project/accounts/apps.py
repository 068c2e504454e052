"""App configuration of the example accounts app."""

from __future__ import annotations

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    """Example accounts app."""

    name = "accounts"
    default_auto_field = "django.db.models.BigAutoField"
