"""Settings of the benchmark project; the broker comes from ``BENCH_BROKER``."""

from __future__ import annotations

import os

SECRET_KEY = "benchmarks-not-secret"
USE_TZ = True
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "ordered_tasks", "bench_project"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("BENCH_DB", "ordered_bench"),
        "USER": os.environ.get("PGUSER", "postgres"),
        "HOST": os.environ.get("PGHOST", "127.0.0.1"),
        "PORT": os.environ.get("PGPORT", "5432"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/11")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ROUTES = {
    "bench_project.tasks.plain_task": {"queue": "bench.plain"},
    "bench_project.tasks.safe_task": {"queue": "bench.plain"},
    "bench_project.tasks.locked_task": {"queue": "bench.locked"},
}
#: Where every task records when it finished (also the Redis of the per-key locks).
BENCH_RESULTS_URL = os.environ.get("BENCH_RESULTS_URL", "redis://127.0.0.1:6379/12")

ORDERED_TASKS = {
    "PARTITIONS": int(os.environ.get("BENCH_PARTITIONS", "8")),
    "QUEUE_PREFIX": "bench.ordered",
    "WINDOW": int(os.environ.get("BENCH_WINDOW", "16")),
    "CELERY_APP": "bench_project.celery:app",
}
# The completion ledger's Redis; BENCH_REDIS_URL="" runs RabbitMQ without it, to measure its cost.
if os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"):
    ORDERED_TASKS["REDIS_URL"] = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
