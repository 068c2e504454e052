"""The README's demo: plain Celery against ordered_tasks on the example project."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import socket
import sqlite3
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from tests.services import RABBITMQ_URL, REDIS_URL, require

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACCOUNTS = 30
EVENTS = 5 * ACCOUNTS

# Every line the demo may print; anything else (worker banners, warnings, shutdown messages) is noise.
SCREEN_LINES = [
    r"\d+ events of \d+ accounts, \d+ accounts interleaved at a time, \d+ worker processes per run",
    r"broker: (redis|amqp)://\S+, worker output: .+\.log",
    r"(plain Celery |ordered_tasks) +\[[#-]{30}\] +\d+/\d+ events +\d+\.\d s",
    r" +plain Celery +ordered_tasks",
    r"(events|accounts left inconsistent|events run out of order|events failed|publish rate \(tasks/s\)"
    r"|throughput \(tasks/s\)) +\S+ +\S+",
    r"plot of accounts 1-16: .+\.png",
    r"no plot: matplotlib is not installed .*",
]


def demo_env(tmp_path: Path, broker_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "TEST_"))}
    env.update(CELERY_BROKER_URL=broker_url,
               EXAMPLE_SQLITE_PATH=str(tmp_path / "demo.sqlite3"),
               ORDERED_QUEUE_PREFIX=f"demo.{os.getpid()}",
               EXAMPLE_PLAIN_QUEUE=f"demo.{os.getpid()}.plain")
    return env


def run_demo(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "example_project/manage.py", "demo", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def report(stdout: str) -> dict[str, tuple[str, str]]:
    """The report's rows: title -> (plain Celery, ordered_tasks)."""
    rows = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(\D+?) +(\S+) +(\S+)", line)
        if match and match[1] != "":
            rows[match[1]] = (match[2], match[3])
    return rows


def handled_events(database: Path, run: str) -> dict[int, list[tuple[int, bool, bool]]]:
    """Per account, its events in the order they finished: (seq, marked late, failed)."""
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT account_id, seq, out_of_order, failed FROM accounts_handledevent "
                          "WHERE run = ? ORDER BY finished", (run,)).fetchall()
    accounts: dict[int, list[tuple[int, bool, bool]]] = defaultdict(list)
    for account, seq, late, failed in rows:
        accounts[account].append((seq, bool(late), bool(failed)))
    return accounts


def late_in_finish_order(seqs: list[int]) -> list[bool]:
    """Which events ran after an event published later than them."""
    highest, late = 0, []
    for seq in seqs:
        late.append(seq < highest)
        highest = max(highest, seq)
    return late


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_clean_screen(out: subprocess.CompletedProcess[str]) -> None:
    assert out.stderr == "", out.stderr[-3000:]
    assert "\r" not in out.stdout  # not a terminal: the bar prints lines instead of redrawing one
    noise = [line for line in out.stdout.splitlines()
             if line and not any(re.fullmatch(pattern, line) for pattern in SCREEN_LINES)]
    assert noise == [], out.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.e2e
def test_demo_report_plot_and_log_on_redis(tmp_path: Path) -> None:
    require(REDIS_URL, 6379, "redis")
    env = demo_env(tmp_path, REDIS_URL.rsplit("/", 1)[0] + "/13")
    plot, log = tmp_path / "out" / "demo.png", tmp_path / "workers.log"
    out = run_demo(env, "--broker", "redis", "--accounts", str(ACCOUNTS), "--workers", "2",
                   "--plot", str(plot), "--log", str(log))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_clean_screen(out)
    assert f"broker: {env['CELERY_BROKER_URL']}, worker output: {log}\n" in out.stdout

    bars = [line for line in out.stdout.splitlines() if "] " in line]
    labels = [bar.split("[")[0].strip() for bar in bars]
    assert labels == sorted(labels, key=["plain Celery", "ordered_tasks"].index), bars
    for label in ("plain Celery", "ordered_tasks"):  # a line a quarter, at most; the last one complete
        assert 1 <= labels.count(label) <= 4, bars
        assert f" {EVENTS}/{EVENTS} events " in bars[len(labels) - 1 - labels[::-1].index(label)], bars

    figures = report(out.stdout)
    assert figures["events"] == (str(EVENTS), str(EVENTS))
    assert figures["accounts left inconsistent"][1] == f"0/{ACCOUNTS}"
    assert figures["events run out of order"][1] == "0"
    assert figures["events failed"][1] == "0"
    plain_inconsistent = int(figures["accounts left inconsistent"][0].split("/")[0])

    # The figures agree with what the workers recorded, event by event, in the demo's database.
    database = tmp_path / "demo.sqlite3"
    for column, run in enumerate(("plain", "ordered")):
        accounts = handled_events(database, run)
        assert sum(map(len, accounts.values())) == EVENTS, run
        late = {a: late_in_finish_order([seq for seq, _, _ in events]) for a, events in accounts.items()}
        assert {a: [flag for _, flag, _ in events] for a, events in accounts.items()} == late, run
        assert int(figures["events run out of order"][column]) == sum(map(sum, late.values())), run
        failed = {a for a, events in accounts.items() if any(f for _, _, f in events)}
        assert int(figures["events failed"][column]) == sum(
            f for events in accounts.values() for _, _, f in events), run
        if run == "plain":
            # A failed event leaves its account wrong; an account whose events all ran in order is right.
            touched = failed | {a for a, flags in late.items() if any(flags)}
            assert len(failed) <= plain_inconsistent <= len(touched), (failed, touched, plain_inconsistent)
        else:
            assert {a: [seq for seq, _, _ in events] for a, events in accounts.items()} == {
                a: [1, 2, 3, 4, 5] for a in range(1, ACCOUNTS + 1)}

    if importlib.util.find_spec("matplotlib") is None:
        assert 'no plot: matplotlib is not installed (pip install -e ".[demo]")' in out.stdout
        assert not plot.exists()
    else:
        assert f"plot of accounts 1-16: {plot}\n" in out.stdout
        width, height = png_size(plot)
        assert width >= 800 and height >= 600, (width, height)

    workers = log.read_text()
    assert workers.index("===== plain Celery") < workers.index("===== ordered_tasks"), workers
    # The worker output that used to reach the screen is in the log.
    assert workers.count("Warm shutdown") >= 2, workers


@pytest.mark.e2e
def test_demo_runs_on_rabbitmq(tmp_path: Path) -> None:
    require(RABBITMQ_URL, 5672, "rabbitmq")
    env = demo_env(tmp_path, RABBITMQ_URL)
    plot = tmp_path / "demo.png"
    try:
        out = run_demo(env, "--broker", "rabbitmq", "--accounts", str(ACCOUNTS), "--workers", "2",
                       "--plot", str(plot), "--log", str(tmp_path / "workers.log"))
    finally:
        with Connection(RABBITMQ_URL) as conn:
            channel = conn.default_channel
            for name in [f"{env['ORDERED_QUEUE_PREFIX']}.{p}" for p in range(8)] + [env["EXAMPLE_PLAIN_QUEUE"]]:
                channel.queue_delete(name)
                channel.exchange_delete(name)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_clean_screen(out)
    assert f"broker: {maybe_sanitize_url(RABBITMQ_URL)}, worker output: " in out.stdout, out.stdout
    figures = report(out.stdout)
    assert figures["events"] == (str(EVENTS), str(EVENTS))
    assert figures["accounts left inconsistent"][1] == f"0/{ACCOUNTS}"
    assert figures["events run out of order"][1] == "0"
    if importlib.util.find_spec("matplotlib") is not None:
        assert png_size(plot)[0] >= 800


@pytest.mark.integration
@pytest.mark.parametrize(("broker", "url", "name"), [
    ("redis", "redis://127.0.0.1:{port}/0", "Redis"),
    ("rabbitmq", "amqp://guest:guest@127.0.0.1:{port}//", "RabbitMQ"),
])
def test_demo_says_what_to_start_when_the_broker_does_not_answer(tmp_path: Path, broker: str, url: str,
                                                                 name: str) -> None:
    pytest.importorskip("django_celery_results")  # the example project's (its demo extra)
    port = free_port()
    out = run_demo(demo_env(tmp_path, url.format(port=port)), "--broker", broker, timeout=60)
    assert out.returncode == 1
    assert out.stdout == ""
    assert out.stderr.startswith(f"CommandError: {name} does not answer at 127.0.0.1:{port} "), out.stderr
    assert f"Start {name} (for example: docker run -d -p" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_the_broker_option_picks_the_kind_and_the_environment_the_address() -> None:
    from accounts.brokers import LOCAL_URLS, BrokerUnavailable, choose

    assert choose(None, None) == ("redis", "redis://127.0.0.1:6379/0")
    assert choose(None, "amqp://u:p@mq:5673/v") == ("rabbitmq", "amqp://u:p@mq:5673/v")
    assert choose("redis", "redis://cache:6380/3") == ("redis", "redis://cache:6380/3")
    assert choose("redis", "amqp://u:p@mq:5673/v") == ("redis", LOCAL_URLS["redis"])
    assert choose("rabbitmq", "redis://cache:6380/3") == ("rabbitmq", "amqp://guest:guest@127.0.0.1:5672//")
    assert choose("redis", "sqs://key:secret@") == ("redis", LOCAL_URLS["redis"])
    with pytest.raises(BrokerUnavailable, match=r"^CELERY_BROKER_URL=sqs://key:\*\*@/? is neither Redis nor RabbitMQ"):
        choose(None, "sqs://key:secret@")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_progress_bar_prints_a_few_lines_when_not_on_a_terminal() -> None:
    from accounts.console import ProgressBar

    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(out, "plain Celery", 600, tty=False, clock=clock)
    bar.status("starting 4 worker processes ...")
    for done in range(0, 601, 10):
        clock.now += 0.1
        bar.update(done)
    bar.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 4, lines
    assert lines[0] == "plain Celery   [#######-----------------------] 150/600 events   1.6 s"
    assert lines[-1] == "plain Celery   [##############################] 600/600 events   6.1 s"


def test_the_progress_bar_redraws_one_line_on_a_terminal() -> None:
    from accounts.console import ProgressBar

    out, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(out, "ordered_tasks", 40, tty=True, clock=clock)
    bar.status("starting 4 worker processes ...")
    bar.restart_clock()
    for done in (10, 20, 40):
        clock.now += 1
        bar.update(done)
    clock.now += 5  # stopping the workers does not count
    bar.finish()
    text = out.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n"), repr(text)
    frames = text.rstrip("\n").split("\r")[1:]
    assert frames[0] == "ordered_tasks  starting 4 worker processes ..."
    assert frames[1] == "ordered_tasks  [#######-----------------------] 10/40 events   1.0 s".ljust(len(frames[0]))
    assert frames[-1] == "ordered_tasks  [##############################] 40/40 events   3.0 s"


def test_the_plot_draws_late_and_failed_events(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from accounts.plot import Point, Timeline, plot

    plain = Timeline("plain Celery", "1/2 accounts left inconsistent", [
        Point(1, 1, 0.1, False, False), Point(1, 2, 0.4, False, False),
        Point(2, 2, 0.2, False, True), Point(2, 1, 0.3, True, False)], {2})
    ordered = Timeline("ordered_tasks", "0/2 accounts left inconsistent", [
        Point(a, s, 0.1 * s + a, False, False) for a in (1, 2) for s in (1, 2)])
    path = tmp_path / "plot.png"
    plot(path, [plain, ordered], [1, 2], {1: "add office HQ", 2: "add members to HQ"}, "two accounts")
    width, height = png_size(path)
    assert width == 1000 and 200 < height < 400, (width, height)
