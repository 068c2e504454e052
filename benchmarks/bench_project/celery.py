"""The benchmark project's Celery app."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench_project.settings")

app = Celery("bench_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["bench_project"])
