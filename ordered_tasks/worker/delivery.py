"""One message as the worker received it, in the form kept for parking."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from kombu.serialization import dumps, registry  # type: ignore[attr-defined]

from ..exceptions import InvalidKeyError
from ..options import KEY_HEADER, PARTITION_HEADER
from ..partitioning import canonical_key, partition_of

#: Request entries that are not message headers (Celery adds them in the worker).
_NOT_HEADERS = frozenset({
    "args", "kwargs", "callbacks", "errbacks", "chain", "chord", "delivery_info", "hostname",
    "is_eager", "properties", "reply_to", "correlation_id", "called_directly", "_protected",
    "loglevel", "logfile", "utc", "ordered_content", "ordered_rerun", "ordered_fence", "_children",
    "task_name",
})
#: The key under which messages are kept that belong to no key of their partition (no
#: usable key, or a key of another partition). No real key is empty, so they hold nothing up.
NO_KEY = ""
#: Request entry (set by :class:`~ordered_tasks.worker.failures.request.OrderedRequest`)
#: carrying the content type and encoding of the received body.
CONTENT_ENTRY = "ordered_content"
#: Request entry marking a message run again after its pool process died.
RERUN_ENTRY = "ordered_rerun"
#: Request entry with the consumer's fencing token for the message's partition (Redis).
FENCE_ENTRY = "ordered_fence"
#: Request entry with the tenure of the message's partition it arrived in (RabbitMQ): a message
#: of a connection that has since been lost does not start (see ``failures.entry``).
TENURE_ENTRY = "ordered_tenure"


def queue_partition(delivery_info: Mapping[str, Any] | None) -> int | None:
    """The partition whose queue delivered a message (None: another queue).

    Partition queues are bound with their own name as routing key.
    """
    from ..conf import get_settings

    queue = (delivery_info or {}).get("routing_key")
    return get_settings().partition_of_queue(queue) if isinstance(queue, str) else None


def key_of_partition(raw: object, partition: int) -> str:
    """``raw`` (an ``ordered_key`` header) as a key of ``partition``, else :data:`NO_KEY`."""
    from ..conf import get_settings

    try:
        key = canonical_key(raw)
    except InvalidKeyError:
        return NO_KEY
    return key if partition_of(key, get_settings().partitions) == partition else NO_KEY


def delivered_partition(entries: Mapping[str, Any]) -> int:
    """The partition whose queue delivered a message (its request entries), else its header, else -1.

    The queue decides: the ``ordered_partition`` header of a producer that
    is not ordered_tasks' own may be missing or wrong.
    """
    partition = queue_partition(entries.get("delivery_info"))
    if partition is not None:
        return partition
    try:
        return int(entries.get(PARTITION_HEADER, -1))
    except (TypeError, ValueError):
        return -1


def json_text(value: Any) -> str:
    """``value`` as JSON text (anything that is not JSON data becomes its repr)."""
    return json.dumps(value, default=repr)


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data (anything else becomes its repr)."""
    return json.loads(json_text(value))


@dataclass
class Delivery:
    """A received message: what the consumer needs to park it and run it later."""

    key: str
    partition: int
    task_name: str
    task_id: str
    body: bytes
    content_type: str = ""
    content_encoding: str = ""
    headers: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_request(cls, task: Any, request: Any, args: Any, kwargs: Any, key: str | None = None,
                     partition: int | None = None) -> Delivery:
        """Rebuild the message of the running task (the body re-encoded with its serializer).

        ``key`` and ``partition`` default to the message's headers.
        """
        entries = dict(vars(request))
        content_type, _ = entries.get(CONTENT_ENTRY) or (None, None)
        serializer = registry.type_to_name.get(content_type) if content_type else None
        embed = {name: entries.get(name) for name in ("callbacks", "errbacks", "chain", "chord")}
        content_type, content_encoding, data = dumps(
            (list(args), dict(kwargs), embed), serializer=serializer or task.serializer)
        body = data.encode(content_encoding) if isinstance(data, str) else bytes(data)
        headers = {name: value for name, value in entries.items()
                   if name not in _NOT_HEADERS and not name.startswith("_")}
        headers["task"] = task.name
        headers["id"] = request.id
        return cls(
            key=str(entries[KEY_HEADER]) if key is None else key,
            partition=int(entries[PARTITION_HEADER]) if partition is None else partition,
            task_name=task.name, task_id=request.id or "", body=body, content_type=content_type,
            content_encoding=content_encoding, headers=json_safe(headers),
        )

    @classmethod
    def from_message(cls, message: Any, partition: int, plain_headers: bool = True) -> Delivery:
        """The raw message as the broker delivered it (nothing decoded).

        Its headers are made plain JSON data, unless ``plain_headers`` is
        False: the caller then writes them with :func:`json_text` (a spill's
        ``COPY``), which saves reading them back.
        """
        headers = message.headers if isinstance(message.headers, Mapping) else {}
        body = message.body
        if isinstance(body, str):
            body = body.encode("utf-8")
        key = headers.get(KEY_HEADER)
        return cls(
            key="" if key is None else str(key),
            partition=partition,  # the queue's; a foreign header may be missing or wrong
            task_name=str(headers.get("task") or ""), task_id=str(headers.get("id") or ""),
            body=bytes(body or b""), content_type=message.content_type or "",
            content_encoding=message.content_encoding or "",
            headers=json_safe(dict(headers)) if plain_headers else dict(headers),
        )
