"""A minimal Django project for the benchmarks: trivial tasks, so the figures show the machinery."""

from __future__ import annotations

from .celery import app

__all__ = ["app"]
