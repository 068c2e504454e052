"""Where the test services live, and whether they answer: skip locally, fail in CI."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

import pytest

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/14")
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
RESULTS_URL = os.environ.setdefault("TEST_RESULTS_URL", "redis://127.0.0.1:6379/15")
BROKERS = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}


def in_ci() -> bool:
    """True when running under CI, where a missing service is a failure."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def answers(url: str, default_port: int) -> bool:
    """Whether something listens at the host and port of ``url``."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or default_port), 1.0):
            return True
    except OSError:
        return False


def require(url: str, default_port: int, what: str) -> None:
    """Skip (locally) or fail (in CI) when the service at ``url`` does not answer."""
    if answers(url, default_port):
        return
    message = f"{what} does not answer at {url}"
    if in_ci():
        pytest.fail(message + " (CI=true: every service is required)")
    pytest.skip(message)
