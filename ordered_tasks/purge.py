"""Taking the waiting messages out of a partition queue into the database, never losing one."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from django.db import transaction
from django.utils import timezone

from .coordination import client_for, coordination_client, is_redis
from .exceptions import InvalidKeyError, OrderedTaskError
from .models import AccountState, ControlRequest, ParkedMessage, PartitionFence
from .options import CONTROL_TASK, KEY_HEADER
from .partitioning import canonical_key, partition_of, queue_name
from .redisscripts import RECORD_POPPED, RELEASE_LEASE, RENEW_LEASE, aside_index, aside_lists
from .routing import key_spec_for
from .states import ControlAction

logger = logging.getLogger(__name__)

#: Messages taken, stored in one transaction and then acknowledged.
BATCH = 100
#: Seconds without a delivery after which a RabbitMQ partition queue counts as empty.
IDLE = 1.0
#: Milliseconds the purge's Redis lease lives without renewal (as a worker's).
LEASE_TTL_MS = 6000
#: The key under which messages are kept that belong to no key of their partition (the worker's too).
NO_KEY = ""

State = ParkedMessage.State
Reason = ParkedMessage.Reason

#: Pop up to ARGV[3] messages from the head of the queue's lists (KEYS, by priority), recording
#: each in kombu's unacknowledged hash and index (the last two KEYS) in the same step, as an
#: ordered worker's fetch does: should the purge die, the partition's next owner puts them back
#: at the head. ARGV: the time of the first delivery, a tag base for an item without a delivery
#: tag, the most to take, the queue's name. An item that is not a kombu message of this queue is
#: wrapped, hex-encoded, as the worker's fetch wraps it. Returns tag, item, tag, item...
_TAKE = RECORD_POPPED + """
local count = #KEYS - 2
local at = tonumber(ARGV[1])
local most = tonumber(ARGV[3])
local queue = ARGV[4]
local taken = {}
local n = 0
for i = 1, count do
  while n < most do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    n = n + 1
    local ok, message = pcall(cjson.decode, item)
    local tag
    tag, item = record(item, ok and message or nil, queue, ARGV[2] .. '-' .. n, KEYS[count + 1],
                       KEYS[count + 2], string.format('%.6f', at + (n - 1) * 0.000001))
    taken[#taken + 1] = tag
    taken[#taken + 1] = item
  end
end
return taken
"""

#: KEYS[1] a queue's set of keys with messages set aside, KEYS[2] one key's list; ARGV[1] the
#: key: drop the key from the set once its list is empty.
_FORGET_ASIDE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('SREM', KEYS[1], ARGV[1])
end
return 0
"""


class PurgeRefused(OrderedTaskError):
    """The partition cannot be purged now (it has a consumer); the message says what to do."""

    #: What the purge of the partition had done before it stopped (set by :func:`purge_partition`).
    report: PurgeReport | None = None


@dataclass
class Taken:
    """One message taken from a partition queue, not acknowledged yet."""

    tag: Any
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    redelivered: bool


@dataclass
class PurgeReport:
    """What a purge did with the messages of one partition."""

    partition: int
    queue: str
    #: Parked, each blocking its key until it is replayed or skipped.
    parked: int = 0
    #: Kept as ``skipped`` records only (``discard``).
    discarded: int = 0
    #: Kept as ``refused`` records: they belong to no key of the partition.
    refused: int = 0
    #: Already kept for their key, or already completed (a redelivered copy): acknowledged only.
    duplicates: int = 0
    #: Replay, skip and wake-up control messages, acknowledged (see :func:`purge_partition`).
    control: int = 0
    #: Keys that got parked messages, blocked by the purge.
    keys: set[str] = field(default_factory=set)

    @property
    def taken(self) -> int:
        return self.parked + self.discarded + self.refused + self.duplicates + self.control


def purge_partition(app: Celery, partition: int, *, discard: bool = False,
                    requested_by: str = "") -> PurgeReport:
    """Take the messages waiting in ``partition``'s queue into the database, in their order.

    Only while the partition has no consumer: on Redis the purge holds the
    partition's lease meanwhile (a worker waits for it as for another
    owner's); on RabbitMQ it becomes the queue's single active consumer,
    after checking that the queue had none (a worker that starts meanwhile
    is a standby until the purge ends). Otherwise :class:`PurgeRefused`.

    Each message becomes a :class:`~ordered_tasks.models.ParkedMessage`
    (reason ``purged``) behind the parked messages of its key, and its key
    is blocked, so that replay and skip apply to it; with ``discard``, a
    ``skipped`` record instead, and its key is left as it is. A message that
    belongs to no key of the partition is kept as ``refused``. Control
    messages are not kept: a wake-up is published again by the partition's
    next worker, and a replay or skip request is marked as not applied.
    A message is acknowledged only after its row is committed. The purge
    takes at most the messages waiting when it starts; later ones stay.
    """
    name = queue_name_of(partition)
    report = PurgeReport(partition, name)
    store = _Store(app, partition, report, discard, requested_by)
    try:
        if is_redis(app.conf.broker_url):
            _purge_redis(app, partition, name, store)
        else:
            _purge_amqp(app, partition, name, store)
    except PurgeRefused as exc:
        exc.report = report
        raise
    finally:
        store.close()
    return report


def queue_name_of(partition: int) -> str:
    """The name of ``partition``'s queue under the current settings."""
    from .conf import get_settings

    return queue_name(get_settings().queue_prefix, partition)


# --- Redis ---------------------------------------------------------------------------------------


def _purge_redis(app: Celery, partition: int, name: str, store: _Store) -> None:
    coordination = coordination_client(app)
    if coordination is None:  # a Redis broker always gives one
        raise PurgeRefused("No coordination Redis: set ORDERED_TASKS['REDIS_URL'].")
    with (_lease(coordination, name) as lease, app.connection_for_write() as conn,
          closing(client_for(app.conf.broker_url, app.conf.broker_transport_options)) as client):
        store.fence = lease.fence
        channel: Any = conn.default_channel
        prefix = channel.global_keyprefix or ""
        unacked, index = prefix + channel.unacked_key, prefix + channel.unacked_index_key
        # The messages a worker set aside for their keys are the earliest of those keys that
        # wait: they go before the queue's.
        asides = prefix + aside_index(name)
        set_aside = aside_lists(client.smembers(asides), name, prefix)
        lists = [*set_aside.values()]
        lists += [prefix + channel._q_for_pri(name, pri) for pri in channel.priority_steps]

        def ack(batch: list[Taken]) -> None:
            pipe = client.pipeline()
            for taken in batch:
                pipe.zrem(index, taken.tag)
                pipe.hdel(unacked, taken.tag)
            pipe.execute()

        # What a previous owner (a worker, or a purge) left unacknowledged comes first.
        left = _left_unacknowledged(client, channel, unacked, index, name)
        limit = len(left) + sum(int(client.llen(key)) for key in lists)
        for start in range(0, len(left), BATCH):
            store.save(left[start:start + BATCH], lease.check)
            ack(left[start:start + BATCH])
        take = client.register_script(_TAKE)
        done = len(left)
        at = time.time()
        while done < limit:
            lease.check()
            most = min(BATCH, limit - done)
            reply = take(keys=[*lists, unacked, index],
                         args=[f"{at:.6f}", f"purge-{uuid.uuid4().hex}", most, name])
            if not reply:
                break
            batch = [_redis_message(channel, tag, item, redelivered=False)
                     for tag, item in zip(reply[::2], reply[1::2], strict=True)]
            at += BATCH * 1e-6
            store.save(batch, lease.check)
            ack(batch)
            done += len(batch)
        for key, listed in set_aside.items():
            client.eval(_FORGET_ASIDE, 2, asides, listed, key)


@dataclass
class _Lease:
    client: Any
    key: str
    owner: str
    fence: int

    def check(self) -> None:
        """Renew the lease; raise if it lapsed (a worker may own the partition now)."""
        renewed = self.client.eval(RENEW_LEASE, 1, self.key, self.owner, LEASE_TTL_MS)
        if not renewed:
            raise PurgeRefused(
                f"The purge lost the lease {self.key} (it was paused for more than "
                f"{LEASE_TTL_MS // 1000} s?). What it had not stored stays unacknowledged and goes back "
                "to the head of the queue with the partition's next owner; run the purge again.")


@contextmanager
def _lease(client: Any, name: str) -> Iterator[_Lease]:
    """Hold ``name``'s partition lease as a worker would, or refuse: the partition has an owner."""
    key = f"ordered_tasks:lease:{name}"
    owner = f"ordered_purge:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if not client.set(key, owner, nx=True, px=LEASE_TTL_MS):
        holder = client.get(key)
        holder = holder.decode() if isinstance(holder, bytes) else holder
        client.close()
        raise PurgeRefused(
            f"Partition queue {name} has an active consumer ({holder or 'its lease was just released'}). "
            "Purging it now would take messages its worker is about to run, or holds in its window. "
            "Stop every ordered_worker that serves this partition (standbys too: one would take it "
            "over), then purge again.")
    try:
        fence = int(client.incr(f"ordered_tasks:fence:{name}"))
        yield _Lease(client, key, owner, fence)
    finally:
        client.eval(RELEASE_LEASE, 1, key, owner)
        client.close()


def _left_unacknowledged(client: Any, channel: Any, unacked: str, index: str, name: str) -> list[Taken]:
    """Messages of queue ``name`` that a previous owner left unacknowledged, in the order it took them."""
    from kombu.utils.json import loads

    records = {}
    for tag, payload in client.hgetall(unacked).items():
        try:
            message, _exchange, routing_key = loads(payload)
        except (ValueError, TypeError):
            continue
        if routing_key == name:
            records[tag.decode() if isinstance(tag, bytes) else tag] = message
    if not records:
        return []
    when = {(t.decode() if isinstance(t, bytes) else t): score
            for t, score in client.zrange(index, 0, -1, withscores=True)}
    return [_redis_message(channel, tag, records[tag], redelivered=True)
            for tag in sorted(records, key=lambda t: when.get(t, 0.0))]


def _redis_message(channel: Any, tag: Any, item: Any, redelivered: bool) -> Taken:
    from kombu.utils.json import loads

    payload = loads(item) if isinstance(item, (bytes, str)) else item
    message = channel.Message(payload, channel=channel)
    tag = tag.decode() if isinstance(tag, bytes) else tag
    redelivered = redelivered or bool((message.delivery_info or {}).get("redelivered"))
    return _taken(tag, message, redelivered)


def _taken(tag: Any, message: Any, redelivered: bool) -> Taken:
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8")
    headers = message.headers if isinstance(message.headers, dict) else {}
    return Taken(tag=tag, body=bytes(body or b""), content_type=message.content_type or "",
                 content_encoding=message.content_encoding or "", headers=dict(headers),
                 redelivered=redelivered)


# --- RabbitMQ ------------------------------------------------------------------------------------


def _purge_amqp(app: Celery, partition: int, name: str, store: _Store) -> None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        channel: Any = conn.channel()
        try:
            _, waiting, consumers = channel.queue_declare(queue=name, passive=True)
        except conn.channel_errors:  # never declared: nothing was published to it
            return
        if consumers:
            raise _busy(name, consumers)
        if not waiting:
            return
        received: list[Taken] = []
        channel.basic_qos(0, BATCH, False)

        def receive(raw: Any) -> None:
            message = channel.message_to_python(raw)
            redelivered = bool((message.delivery_info or {}).get("redelivered"))
            received.append(_taken(message, message, redelivered))

        # Never cancelled: closing the connection puts what was not acknowledged back in its
        # place, and only then promotes a worker that started meanwhile (a standby till then).
        channel.basic_consume(queue=name, no_ack=False, callback=receive)
        _, _, consumers = channel.queue_declare(queue=name, passive=True)
        if consumers != 1:  # a worker started in between: it may be the active one
            raise _busy(name, consumers - 1)
        done = 0
        while done < waiting:
            most = min(BATCH, waiting - done)
            _drain(conn, received, most)
            if not received:
                break
            batch = received[:most]
            store.save(batch, None)
            for taken in batch:
                taken.tag.ack()
            del received[:len(batch)]
            done += len(batch)


def _busy(name: str, consumers: int) -> PurgeRefused:
    return PurgeRefused(
        f"Partition queue {name} has {consumers} consumer(s). Purging it now would take messages "
        "its active consumer is about to run, or holds in its window. Stop every ordered_worker that "
        "serves this partition (standbys too: one would take it over), then purge again.")


def _drain(conn: Any, received: list[Taken], most: int) -> None:
    """Receive until ``most`` messages are in, or none came for :data:`IDLE` seconds."""
    while len(received) < most:
        try:
            conn.drain_events(timeout=IDLE)
        except TimeoutError:
            return


# --- The database --------------------------------------------------------------------------------


class _Store:
    """Stores the taken messages of one partition, batch by batch."""

    def __init__(self, app: Celery, partition: int, report: PurgeReport, discard: bool,
                 requested_by: str) -> None:
        from .conf import get_settings

        self.app = app
        self.partition = partition
        self.partitions = get_settings().partitions
        self.report = report
        self.discard = discard
        self.who = requested_by or "an operator"
        #: The purge's fencing token of the partition (Redis leases).
        self.fence: int | None = None
        self.ledger = coordination_client(app)

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()

    def save(self, batch: list[Taken], before_commit: Any) -> None:
        """Store ``batch`` in one transaction; ``before_commit`` may raise to store nothing."""
        completed = self._completed([t for t in batch if t.redelivered])
        now = timezone.now()
        with transaction.atomic():
            if self.fence is not None:
                _check_fence(self.partition, self.fence)
            placed = [(taken, *self._place(taken)) for taken in batch]
            ids = {str(t.headers.get("id") or "") for t, _key, _problem in placed} - {""}
            known = set(ParkedMessage.objects.filter(task_id__in=ids).values_list("key", "task_id"))
            states: dict[str, AccountState] = {}
            rows, outcomes = [], []
            for taken, key, problem in placed:
                task_id = str(taken.headers.get("id") or "")
                if str(taken.headers.get("task") or "") == CONTROL_TASK:
                    self._control(taken)
                    outcomes.append("control")
                    continue
                if task_id and ((key, task_id) in known or task_id in completed):
                    outcomes.append("duplicates")
                    continue
                state = states.get(key)
                if state is None:
                    AccountState.objects.get_or_create(key=key, defaults={"partition": self.partition})
                    state = states[key] = AccountState.objects.select_for_update().get(key=key)
                rows.append(self._row(state, taken, key, problem))
                outcomes.append(rows[-1].state)
                if rows[-1].state == State.PARKED:
                    state.block(now)
                    self.report.keys.add(key)
            ParkedMessage.objects.bulk_create(rows)
            for state in states.values():
                state.save()
            if before_commit is not None:
                before_commit()
        for outcome in outcomes:  # only once committed
            if outcome == State.PARKED:
                self.report.parked += 1
            elif outcome == State.SKIPPED:
                self.report.discarded += 1
            elif outcome == State.REFUSED:
                self.report.refused += 1
            else:
                setattr(self.report, outcome, getattr(self.report, outcome) + 1)

    def _row(self, state: AccountState, taken: Taken, key: str, problem: str | None) -> ParkedMessage:
        state.sequence += 1
        if problem is not None:
            row_state, note = State.REFUSED, (f"Taken out of its queue by {self.who} (ordered_purge), "
                                              f"kept as a record: {problem}")
        elif self.discard:
            row_state, note = State.SKIPPED, (f"Discarded by {self.who} (ordered_purge --discard): "
                                              "taken out of its queue, not run, kept as a record.")
        else:
            row_state, note = State.PARKED, (f"Taken out of its queue by {self.who} (ordered_purge). "
                                             "Replay the key to run it, or skip it.")
        headers = taken.headers
        return ParkedMessage(
            key=key, partition=self.partition, position=state.sequence, state=row_state,
            reason=Reason.PURGED, task_name=str(headers.get("task") or "")[:255],
            task_id=str(headers.get("id") or "")[:255], body=taken.body, content_type=taken.content_type,
            content_encoding=taken.content_encoding, headers=_json_safe(headers), exception=note)

    def _place(self, taken: Taken) -> tuple[str, str | None]:
        """The message's key (the worker's reading: its key argument, else its header), or why none."""
        headers = taken.headers
        key, problem = None, None
        spec = key_spec_for(self.app, str(headers.get("task") or ""))
        arguments = self._arguments(taken) if spec is not None else None
        if spec is not None and arguments is not None:
            try:
                key = spec.canonical(*arguments)
            except InvalidKeyError as exc:
                problem = str(exc)
        if key is None and headers.get(KEY_HEADER) is not None:
            try:
                key = canonical_key(headers[KEY_HEADER])
            except InvalidKeyError as exc:
                problem = f"unusable {KEY_HEADER} header: {exc}"
        if key is None:
            return NO_KEY, problem or f"the message has no ordering key (no {KEY_HEADER} header)"
        belongs_to = partition_of(key, self.partitions)
        if belongs_to != self.partition:
            return NO_KEY, f"key {key!r} belongs to partition {belongs_to}, not to {self.partition}"
        return key, None

    def _arguments(self, taken: Taken) -> tuple[Any, Any] | None:
        from kombu.serialization import loads, prepare_accept_content

        try:
            body = loads(taken.body, taken.content_type, taken.content_encoding,
                         accept=prepare_accept_content(self.app.conf.accept_content))
            return body[0], body[1]
        except Exception:  # undecodable, or not protocol 2: the header decides
            return None

    def _control(self, taken: Taken) -> None:
        """A replay or skip request whose message is taken is not applied: say so on the request."""
        arguments = self._arguments(taken)
        kwargs = arguments[1] if arguments is not None and isinstance(arguments[1], dict) else {}
        action, request_id = kwargs.get("action"), kwargs.get("request_id")
        if action in (ControlAction.REPLAY, ControlAction.SKIP) and isinstance(request_id, int):
            ControlRequest.objects.filter(pk=request_id, applied_at__isnull=True).update(
                outcome=f"not applied: its control message was purged by {self.who}; request it again")

    def _completed(self, batch: list[Taken]) -> set[str]:
        """Task ids of redelivered messages that the completion ledger knows ran to the end."""
        ids = [str(t.headers.get("id") or "") for t in batch]
        ids = [i for i in ids if i]
        if not ids or self.ledger is None:
            return set()
        key = f"ordered_tasks:completed:{self.report.queue}"
        pipe = self.ledger.pipeline(transaction=False)
        for task_id in ids:
            pipe.zscore(key, task_id)
        return {task_id for task_id, score in zip(ids, pipe.execute(), strict=True) if score is not None}


def _check_fence(partition: int, fence: int) -> None:
    """Refuse the write if a newer owner of ``partition`` has written (as the worker's writes do)."""
    newer = PartitionFence.advance(partition, fence)
    if newer is not None:
        raise PurgeRefused(
            f"Partition {partition} has a newer owner (fence {newer} > {fence}): the purge lost "
            "its lease and stored nothing more. Stop the partition's workers and run it again.")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=repr))
