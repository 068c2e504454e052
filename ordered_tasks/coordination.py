"""The Redis of leases and the completion ledger: ``REDIS_URL``, a Redis broker, or its Sentinel master."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.sentinel import Sentinel

from .conf import REDIS_SCHEMES, get_settings
from .exceptions import ConfigurationError

SENTINEL_SCHEME = "sentinel://"
SENTINEL_PORT = 26379
#: Seconds a command to the coordination Redis may take: under a partition lease's 6 s, so
#: that a Redis that hangs (frozen, a network that drops packets) fails the command instead
#: of holding a worker's event loop or lease keeper for good.
COORDINATION_TIMEOUT = 5.0


def is_redis(broker_url: str | None) -> bool:
    """Whether ``broker_url`` names a Redis broker, directly or through Sentinel."""
    return bool(broker_url) and str(broker_url).startswith((*REDIS_SCHEMES, SENTINEL_SCHEME))


def client_for(url: str, transport_options: Mapping[str, Any] | None = None, **kwargs: Any) -> redis.Redis:
    """A Redis client for a ``redis://`` URL, or for the master behind a ``sentinel://`` one.

    A Sentinel URL is kombu's: sentinels separated by ``;``, the database as
    the path of the last one, and ``master_name`` (plus optional
    ``sentinel_kwargs``) in the broker's transport options.
    """
    if not url.startswith(SENTINEL_SCHEME):
        return redis.Redis.from_url(url, **kwargs)
    options = transport_options or {}
    master = options.get("master_name")
    if not master:
        raise ConfigurationError(
            f"The broker {url.split('@')[-1]!r} is a Redis Sentinel, but broker_transport_options has no "
            "'master_name'. Set it (kombu needs it too), or set ORDERED_TASKS['REDIS_URL'].")
    sentinels, db, password = [], 0, None
    for part in url.split(";"):
        parsed = urlparse(part.strip())
        sentinels.append((parsed.hostname or "127.0.0.1", parsed.port or SENTINEL_PORT))
        if parsed.path.strip("/").isdigit():
            db = int(parsed.path.strip("/"))
        if parsed.password:
            password = unquote(parsed.password)
    sentinel: Any = Sentinel(sentinels, sentinel_kwargs=options.get("sentinel_kwargs"),  # type: ignore[no-untyped-call]
                             **kwargs)
    client: redis.Redis = sentinel.master_for(master, db=db, password=password, **kwargs)
    return client


def coordination_client(app: Any, **kwargs: Any) -> redis.Redis | None:
    """The coordination Redis of ``app``'s workers; None without one (RabbitMQ and no ``REDIS_URL``).

    Its commands time out after :data:`COORDINATION_TIMEOUT` seconds unless
    ``kwargs`` say otherwise.
    """
    kwargs.setdefault("socket_timeout", COORDINATION_TIMEOUT)
    kwargs.setdefault("socket_connect_timeout", COORDINATION_TIMEOUT)
    broker_url = app.conf.broker_url
    url = get_settings().coordination_url(broker_url)
    if url is not None:
        return redis.Redis.from_url(url, **kwargs)
    if broker_url and broker_url.startswith(SENTINEL_SCHEME):
        return client_for(broker_url, app.conf.broker_transport_options, **kwargs)
    return None
