"""The demo's broker (``--broker redis|rabbitmq``) and what to say when it does not answer."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

#: Where each broker listens on a developer's machine.
LOCAL_URLS = {"redis": "redis://127.0.0.1:6379/0", "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//"}
SCHEMES = {"redis": ("redis", "rediss"), "rabbitmq": ("amqp", "amqps", "pyamqp")}
DEFAULT_PORTS = {"redis": 6379, "rabbitmq": 5672}
NAMES = {"redis": "Redis", "rabbitmq": "RabbitMQ"}
START_EXAMPLES = {"redis": "docker run -d -p 6379:6379 redis",
                  "rabbitmq": "docker run -d -p 5672:5672 rabbitmq"}


class BrokerUnavailable(Exception):
    """The broker does not answer, or refuses the connection."""


def kind_of(url: str | None) -> str | None:
    """``redis`` or ``rabbitmq`` for a broker URL of that kind, None for anything else."""
    scheme = urlparse(url or "").scheme
    return next((kind for kind, schemes in SCHEMES.items() if scheme in schemes), None)


def choose(kind: str | None, env_url: str | None) -> tuple[str, str]:
    """The broker kind and URL to use.

    The kind is ``kind``, else that of ``env_url`` (``CELERY_BROKER_URL``), else Redis. The URL is
    ``env_url`` when it is of that kind, else the broker's usual local address. Raises
    ``BrokerUnavailable`` for an ``env_url`` of another kind when ``kind`` is not given.
    """
    if kind is None and env_url and kind_of(env_url) is None:
        raise BrokerUnavailable(f"CELERY_BROKER_URL={display(env_url)} is neither Redis nor RabbitMQ: "
                                "the demo runs on one of them (--broker redis or --broker rabbitmq).")
    chosen = kind or kind_of(env_url) or "redis"
    if chosen not in LOCAL_URLS:
        raise BrokerUnavailable(f"unknown broker {chosen!r}: choose one of {', '.join(LOCAL_URLS)}")
    url = env_url if env_url and kind_of(env_url) == chosen else LOCAL_URLS[chosen]
    return chosen, url


def display(url: str) -> str:
    """``url`` without its password."""
    return str(maybe_sanitize_url(url))


def check(kind: str, url: str, timeout: float = 2.0) -> None:
    """Raise ``BrokerUnavailable``, saying what to start or fix, unless the broker at ``url`` answers."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or DEFAULT_PORTS[kind]
    name = NAMES[kind]
    other = next(k for k in NAMES if k != kind)
    try:
        with socket.create_connection((host, port), timeout):
            pass
    except OSError as exc:
        raise BrokerUnavailable(
            f"{name} does not answer at {host}:{port} ({exc.strerror or exc}).\n"
            f"Start {name} (for example: {START_EXAMPLES[kind]}) and run the demo again, "
            f"point CELERY_BROKER_URL at a running {name}, or use --broker {other}.") from exc
    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        raise BrokerUnavailable(
            f"{name} answers at {host}:{port} but the connection to {display(url)} failed: "
            f"{str(exc).rstrip('.')}.\n"
            "Check the user, password and virtual host or database in CELERY_BROKER_URL.") from exc
