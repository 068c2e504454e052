"""Frames read ahead on RabbitMQ: the same frames as py-amqp's, whatever the reads cut, and no delivery left unseen."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from amqp.exceptions import UnexpectedFrame
from amqp.transport import TCPTransport
from kombu import Connection, Queue
from kombu.asynchronous.hub import Hub

from ordered_tasks.worker.transport.frames import BatchingTransport
from tests.conftest import publish_and_consume


def frame(frame_type: int, channel: int, payload: bytes, end: int = 0xCE) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + bytes([end])


@pytest.fixture
def pair() -> Iterator[tuple[Any, socket.socket]]:
    """A transport reading from one end of a socket pair; the test writes to the other end."""
    ours, theirs = socket.socketpair()
    transport: Any = BatchingTransport.__new__(BatchingTransport)
    transport.sock = ours
    transport.connected = True
    try:
        yield transport, theirs
    finally:
        ours.close()
        theirs.close()


def read(transport: Any, timeout: float | None, ahead: bool = False) -> Any:
    transport.sock.settimeout(timeout)
    transport.reading_ahead = ahead
    try:
        return transport.read_frame()
    finally:
        transport.reading_ahead = False


FRAMES = [(1, 1, b"method" * 3), (2, 1, b"\x00header"), (3, 1, b"body \xce\x00 with frame-end bytes"),
          (8, 0, b""), (3, 7, bytes(range(256)) * 600)]


def test_frames_read_ahead_are_those_py_amqp_reads(pair: tuple[Any, socket.socket]) -> None:
    transport, theirs = pair
    stream = b"".join(frame(*f) for f in FRAMES)
    theirs.sendall(stream)
    time.sleep(0.01)
    got = [read(transport, 0.0, ahead=True)]  # the event loop's read: all that arrived
    assert transport.has_frame()
    with pytest.raises(BlockingIOError):
        transport.sock.recv(1, socket.MSG_PEEK)  # nothing left in the socket
    got += [read(transport, 0.0) for _ in FRAMES[1:]]
    assert got == FRAMES
    assert not transport.has_frame()
    # py-amqp's own transport, from the same bytes, reads the same frames.
    upstream: Any = TCPTransport.__new__(TCPTransport)
    upstream.sock = transport.sock
    upstream.connected = True
    upstream._setup_transport()
    theirs.sendall(stream)
    transport.sock.settimeout(None)
    assert [upstream.read_frame() for _ in FRAMES] == FRAMES


def test_a_frame_cut_anywhere_is_kept_across_timeouts(pair: tuple[Any, socket.socket]) -> None:
    transport, theirs = pair
    stream = b"".join(frame(*f) for f in FRAMES[:3])
    got: list[Any] = []
    for cut in (1, 5, 7, 8, 20, len(stream) - 1):
        theirs.sendall(stream[:cut])
        time.sleep(0.01)
        while True:
            try:
                got.append(read(transport, 0.0, ahead=True))
            except TimeoutError:
                break
        theirs.sendall(stream[cut:])
        time.sleep(0.01)
        while len(got) % 3:
            got.append(read(transport, 0.0, ahead=True))
    assert got == FRAMES[:3] * 6


def test_a_read_that_waits_reads_only_its_frame(pair: tuple[Any, socket.socket]) -> None:
    """Outside the event loop's reader nothing is read beyond the frame: the rest stays in the socket."""
    transport, theirs = pair
    theirs.sendall(frame(*FRAMES[0]) + frame(*FRAMES[1]))
    time.sleep(0.01)
    assert read(transport, 0.0) == FRAMES[0]
    assert not transport.has_frame()
    assert transport.sock.recv(1, socket.MSG_PEEK)  # the second frame is still in the socket
    assert read(transport, 1.0) == FRAMES[1]


def test_a_bad_frame_end_or_a_closed_socket_ends_the_connection(pair: tuple[Any, socket.socket]) -> None:
    transport, theirs = pair
    theirs.sendall(frame(1, 1, b"x", end=0x00))
    with pytest.raises(UnexpectedFrame):
        read(transport, None)
    assert transport.connected is False
    transport.connected = True
    theirs.close()
    with pytest.raises(OSError, match="closed"):
        read(transport, None)
    assert transport.connected is False


class Socket:
    """Records each ``sendall``."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendall(self, data: Any) -> None:
        self.sent.append(bytes(data))


def writer() -> tuple[Any, Socket]:
    transport: Any = BatchingTransport.__new__(BatchingTransport)
    transport.sock = sock = Socket()
    transport._write = sock.sendall
    transport.connected = True
    return transport, sock


def test_frames_written_together_go_out_in_one_send() -> None:
    transport, sock = writer()
    transport.write(b"a")
    with transport.together():
        buffer = bytearray(b"b")
        transport.write(memoryview(buffer))
        buffer[:] = b"X"  # py-amqp reuses its buffer: what was written must not change
        with transport.together():  # nested: the outer block sends
            transport.write(b"c")
        others = threading.Thread(target=transport.write, args=(b"other thread",))
        others.start()
        others.join()
        assert sock.sent == [b"a", b"other thread"]
    assert sock.sent == [b"a", b"other thread", b"bc"]
    transport.write(b"d")
    assert sock.sent[-1] == b"d"


def test_a_read_within_the_block_sends_what_it_holds_first(pair: tuple[Any, socket.socket]) -> None:
    """A reply waited for inside the block would never come if its request stayed held."""
    transport, theirs = pair
    transport._write = transport.sock.sendall
    with transport.together():
        transport.write(frame(1, 1, b"request"))
        theirs.settimeout(1)
        theirs.sendall(frame(1, 1, b"reply"))
        assert read(transport, 1.0) == (1, 1, b"reply")
        assert theirs.recv(100) == frame(1, 1, b"request")


def test_what_a_failing_block_wrote_is_sent_all_the_same() -> None:
    transport, sock = writer()
    with pytest.raises(RuntimeError), transport.together():
        transport.write(b"ack 1")
        raise RuntimeError("boom")
    assert sock.sent == [b"ack 1"]
    with transport.together():
        pass
    assert sock.sent == [b"ack 1"]


def test_the_spill_acknowledges_a_batch_in_one_write(rabbitmq: str) -> None:
    """Parked messages' acknowledgements leave in one write, and RabbitMQ takes each of them."""
    from ordered_tasks.worker.exclusivity.rabbitmq import Transport
    from ordered_tasks.worker.transport.frames import written_together

    queue = Queue(f"acks-{uuid.uuid4().hex[:6]}", durable=False)
    with Connection(rabbitmq, transport=Transport) as connection:
        channel = connection.channel()
        held: list[Any] = []
        consumer = publish_and_consume(channel, queue, ({"n": n} for n in range(20)),
                                       lambda body, message: held.append(message))
        deadline = time.monotonic() + 5
        while len(held) < 20:
            assert time.monotonic() < deadline, f"{len(held)} of 20 delivered"
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.5)
        transport = connection.connection.transport
        sends: list[int] = []
        real = transport._write
        transport._write = lambda data: (sends.append(len(data)), real(data))[1]
        with written_together(held[0].channel.connection):
            for message in held[::2]:
                message.ack()
        assert len(sends) == 1
        transport._write = real
        consumer.cancel()
        channel.close()
    with Connection(rabbitmq) as check:
        # The acknowledged half is gone; the other half came back when the connection closed.
        bound = queue(check.default_channel)
        try:
            assert bound.queue_declare(passive=True).message_count == 10
        finally:
            bound.delete()


@pytest.mark.integration
def test_the_event_loop_hands_on_every_delivery_read_ahead(rabbitmq: str) -> None:
    """Deliveries read ahead are no longer in the socket: the loop must not wait for it to be readable again.

    Kombu's reader hands on one delivery per turn; with a plain Hub and no
    timer each turn would then sleep in poll for a second.
    """
    from ordered_tasks.worker.exclusivity.rabbitmq import Transport

    queue = Queue(f"ahead-{uuid.uuid4().hex[:6]}", auto_delete=True)
    count = 300
    with Connection(rabbitmq, transport=Transport) as connection:
        channel = connection.channel()
        held: list[int] = []
        publish_and_consume(channel, queue, ({"n": n, "pad": "x" * 200} for n in range(count)),
                            lambda body, message: held.append(body["n"]))
        time.sleep(0.3)  # the deliveries arrive in the socket together
        assert isinstance(connection.connection.transport, BatchingTransport)
        hub = Hub()
        connection.transport.register_with_event_loop(connection.connection, hub)
        loop = hub.create_loop()
        started = time.monotonic()
        try:
            while len(held) < count and time.monotonic() - started < 10:
                next(loop)
        finally:
            with contextlib.suppress(Exception):
                hub.remove(connection.connection.sock)
            hub.close()
        assert held == list(range(count))
        assert time.monotonic() - started < 3.0
        channel.close()
