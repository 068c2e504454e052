"""Django settings of the test suite; brokers and the database come from the environment."""

from __future__ import annotations

import os
import socket
import uuid

SECRET_KEY = "tests-not-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "ordered_tasks",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
try:  # its releases lag behind Django's (2.6 pins Django below 6.0): the suite runs without it
    import django_celery_results  # noqa: F401
except ImportError:
    pass
else:
    INSTALLED_APPS.insert(INSTALLED_APPS.index("ordered_tasks"), "django_celery_results")
ROOT_URLCONF = "tests.urls"
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
STATIC_URL = "/static/"

def _postgres_answers() -> bool:
    try:
        with socket.create_connection((os.environ.get("PGHOST", "127.0.0.1"), 5432), 1.0):
            return True
    except OSError:
        return False


# PostgreSQL where it runs (always in CI, where a missing service must fail); SQLite otherwise.
_DEFAULT_DB = "postgres" if os.environ.get("CI") or _postgres_answers() else "sqlite"
if os.environ.get("TEST_DATABASE", _DEFAULT_DB) == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            # Worker subprocesses of the integration tests get the test database's name.
            "NAME": os.environ.get("TEST_DB_NAME", "ordered_tasks"),
            "USER": os.environ.get("PGUSER", "postgres"),
            "PASSWORD": os.environ.get("PGPASSWORD", ""),
            "HOST": os.environ.get("PGHOST", "127.0.0.1"),
            "PORT": os.environ.get("PGPORT", "5432"),
        }
    }
else:
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

CELERY_BROKER_URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/14")
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, object] = {}
if os.environ.get("TEST_HEALTH_CHECK_INTERVAL"):  # kombu's Redis default is 25 s
    CELERY_BROKER_TRANSPORT_OPTIONS["health_check_interval"] = int(os.environ["TEST_HEALTH_CHECK_INTERVAL"])
if os.environ.get("TEST_SENTINEL_MASTER"):  # a sentinel:// TEST_BROKER_URL
    CELERY_BROKER_TRANSPORT_OPTIONS["master_name"] = os.environ["TEST_SENTINEL_MASTER"]
PLAIN_QUEUE = os.environ.get("TEST_PLAIN_QUEUE", "tests.plain")
CELERY_TASK_ROUTES = {"tests.testapp.tasks.plain_record": {"queue": PLAIN_QUEUE}}

ORDERED_TASKS = {
    "PARTITIONS": int(os.environ.get("TEST_PARTITIONS", "8")),
    # Unique per test session; worker subprocesses inherit it through the environment.
    "QUEUE_PREFIX": os.environ.setdefault("TEST_QUEUE_PREFIX", f"tests.{uuid.uuid4().hex[:8]}"),
    "ROUTES": {"events.*": "key"},
    "CELERY_APP": "tests.testapp.celery:app",
    # Leases and the completion ledger, whichever broker the test uses.
    "REDIS_URL": os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14") or None,
    # Worker subprocesses of a test may get another window (start_workers(..., window=N)).
    "WINDOW": int(os.environ.get("TEST_WINDOW", "16")),
    # Worker subprocesses of a test may serve Prometheus metrics (tests/test_metrics.py).
    "METRICS_PORT": int(os.environ["TEST_METRICS_PORT"]) if os.environ.get("TEST_METRICS_PORT") else None,
}
# Fast hashing: the admin tests create users with passwords.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
