"""The nemesis checker on small hand-made histories: each rule passes a clean one and fails a broken one."""

from __future__ import annotations

from ordered_tasks.partitioning import partition_of
from tests.nemesis.checker import (
    check,
    check_drained,
    check_duplicates,
    check_idle,
    check_lost,
    check_order,
    check_overlap,
    precedes,
)
from tests.nemesis.history import Execution, Fault, History, Publish, Row, Sample, executions_from_events

P = 8


def pub(key: str, seq: int, links: int = 1, revoked: bool = False) -> Publish:
    return Publish(key, seq, f"id-{key}-{seq}", float(seq), "chain" if links > 1 else "task", links, revoked)


def ex(key: str, seq: int, start: float, end: float | None, outcome: str | None = "ok", link: int = 0,
       pid: int = 1) -> Execution:
    return Execution(key, seq, link, f"id-{key}-{seq}", pid, start, end, outcome)


def clean() -> History:
    """Key a: 1, 2 (2 failed once, retried in place); key b: a chain of two links."""
    return History(
        publishes=[pub("a", 1), pub("a", 2), pub("b", 1, links=2)],
        executions=[ex("a", 1, 10.0, 10.1), ex("a", 2, 10.2, 10.3, "fail"), ex("a", 2, 11.3, 11.4),
                    ex("b", 1, 10.5, 10.6), ex("b", 1, 10.7, 10.8, link=1)],
        samples=[Sample(10.0, {0: 1}), Sample(11.0, {0: 0})], partitions=P)


def rules(history: History) -> set[str]:
    return {v.rule for v in check(history)}


def test_a_clean_history_passes_every_rule() -> None:
    assert check(clean()) == []


def test_precedence_of_heads_and_chain_links() -> None:
    assert precedes(("a", 1, 0), ("a", 2, 0)) and precedes(("a", 1, 0), ("a", 2, 1))
    assert precedes(("a", 1, 0), ("a", 1, 1)) and precedes(("a", 1, 1), ("a", 1, 2))
    assert not precedes(("a", 1, 1), ("a", 2, 0))  # a later link is published when the one before ends
    assert not precedes(("a", 2, 0), ("a", 1, 0))


def test_a_message_that_neither_ran_nor_was_parked_is_lost() -> None:
    history = clean()
    history.executions = [e for e in history.executions if not (e.key == "a" and e.seq == 2)]
    assert [v.rule for v in check_lost(history)] == ["lost"]
    history.rows = [Row("id-a-2", "skipped", "revoked")]
    assert check_lost(history) == []
    history.rows = [Row("other", "skipped", "failed", ("a", 2, 0))]  # found by its body too
    assert check_lost(history) == []


def test_a_chain_link_is_expected_once_its_predecessor_succeeded() -> None:
    history = clean()
    history.executions = [e for e in history.executions if e.link == 0]
    assert "b#1.1" in check_lost(history)[0].detail
    history.executions = [e for e in history.executions if e.key != "b"]
    history.rows = [Row("id-b-1", "skipped", "failed")]
    assert check_lost(history) == []  # the head was skipped: no link was ever published


def test_first_runs_out_of_publish_order() -> None:
    history = clean()
    history.executions.append(ex("a", 3, 9.0, 9.5))
    history.publishes.append(pub("a", 3))
    assert [v.rule for v in check_order(history)] == ["order", "order"]


def test_a_rerun_after_a_later_message_started() -> None:
    history = clean()
    history.executions.append(ex("a", 1, 12.0, 12.1, pid=2))
    found = check_order(history)
    assert [v.rule for v in found] == ["late-rerun"] and "pid 2" in found[0].detail


def test_a_skipped_message_may_never_run() -> None:
    history = clean()
    history.publishes.insert(1, pub("a", 3))
    history.publishes.sort(key=lambda p: (p.key, p.seq))
    history.rows = [Row("id-a-3", "skipped", "failed")]
    assert check(history) == []


def test_overlapping_executions_of_a_key_but_not_of_a_partition() -> None:
    history = clean()
    history.executions.append(ex("a", 1, 10.05, 10.15, pid=2))
    assert [v.rule for v in check_overlap(history)] == ["overlap"]
    other = next(k for k in (f"x{i}" for i in range(100)) if partition_of(k, P) == partition_of("a", P))
    history = clean()
    history.executions.append(ex(other, 1, 10.05, 10.07))  # another key of the partition: allowed
    assert check_overlap(history) == []


def test_an_overlap_with_a_task_whose_worker_froze_past_its_lease_is_the_documented_window() -> None:
    history = clean()
    history.executions.append(ex("a", 1, 10.08, 10.2, pid=2))  # the new owner runs it again
    assert check_overlap(history) != []
    history.faults = [Fault("stop_worker", 10.02, 10.06)]  # a short freeze excuses nothing
    assert check_overlap(history) != []
    history.faults = [Fault("stop_past_lease", 10.02, 10.09)]  # frozen while it ran: documented
    assert check_overlap(history) == []
    history.faults = [Fault("stop_past_lease", 10.09, 10.15)]  # frozen only after the rerun started
    assert check_overlap(history) != []


def test_a_killed_execution_without_an_end_does_not_overlap() -> None:
    history = clean()
    history.executions.insert(0, ex("a", 1, 9.9, None, None))
    assert check_overlap(history) == []


def test_duplicates_beyond_the_kills_and_stops() -> None:
    history = clean()
    history.executions.insert(0, ex("a", 1, 9.9, None, None))
    assert [v.rule for v in check_duplicates(history)] == ["duplicates"]
    history.faults = [Fault("kill_pool", 9.95, 9.95)]
    assert check_duplicates(history) == []
    history.faults = [Fault("standby", 9.95, 9.95)]  # a standby excuses nothing
    assert check_duplicates(history) != []


def test_a_partition_idle_with_waiting_messages() -> None:
    history = clean()
    p = partition_of("a", P)
    history.samples = [Sample(20.0 + i, {p: 3}) for i in range(40)]
    found = check_idle(history, bound=30.0)
    assert [v.rule for v in found] == ["idle"] and f"partition {p}" in found[0].detail
    history.faults = [Fault("stop_worker", 25.0, 35.0)]  # a freeze and its grace excuse the wait
    assert check_idle(history, bound=30.0) == []


def test_progress_resets_the_idle_clock() -> None:
    history = clean()
    p = partition_of("a", P)
    history.samples = [Sample(20.0 + i, {p: 3 if i < 20 else 2}) for i in range(40)]
    assert check_idle(history, bound=30.0) == []
    history.samples = [Sample(20.0 + i, {p: 3 + i // 10}) for i in range(40)]  # only publishes: no progress
    assert [v.rule for v in check_idle(history, bound=30.0)] == ["idle"]
    history.samples = [Sample(20.0 + i, {p: 3}) for i in range(40)]
    history.executions.append(ex("a", 3, 21.0, 50.0))  # a long task keeps its partition busy
    history.publishes.append(pub("a", 3))
    assert check_idle(history, bound=30.0) == []


def test_a_long_task_of_another_partition_of_the_same_pool_process_keeps_a_partition_busy() -> None:
    history = clean()
    p = partition_of("a", P)
    other = next(k for k in (f"x{i}" for i in range(100)) if partition_of(k, P) != p)
    history.samples = [Sample(20.0 + i, {p: 3}) for i in range(40)]
    history.publishes.append(pub(other, 1))
    history.executions.append(ex(other, 1, 21.0, 58.0, pid=7))  # one task at a time per worker
    assert [v.rule for v in check_idle(history, bound=30.0)] == ["idle"]  # pid 7 never served p
    history.executions.append(ex("a", 3, 15.0, 15.1, pid=7))
    history.publishes.append(pub("a", 3))
    assert check_idle(history, bound=30.0) == []


def test_messages_left_waiting_or_parked_at_the_end() -> None:
    history = clean()
    history.final_depths = {3: 2}
    history.rows = [Row("id-a-2", "parked", "key_held", ("a", 2, 0))]
    assert [v.rule for v in check_drained(history)] == ["drain", "drain"]
    assert "drain" in rules(history)


def test_executions_are_paired_from_the_recorded_events() -> None:
    events = ['{"ev": "start", "x": "1", "key": "a", "seq": 1, "link": 0, "id": "i", "pid": 5, "t": 1.0}',
              '{"ev": "start", "x": "2", "key": "a", "seq": 2, "link": 0, "id": "j", "pid": 5, "t": 2.0,'
              ' "sleep": 0.5}',
              '{"ev": "end", "x": "1", "key": "a", "seq": 1, "link": 0, "id": "i", "pid": 5, "t": 1.5,'
              ' "outcome": "fail"}']
    first, second = executions_from_events(events)
    assert (first.end, first.outcome) == (1.5, "fail")
    assert (second.end, second.outcome, second.busy_until()) == (None, None, 3.5)


def test_a_message_of_a_partition_that_still_has_waiting_messages_did_not_run() -> None:
    history = clean()
    history.executions = [e for e in history.executions if not (e.key == "a" and e.seq == 2)]
    history.final_depths = {partition_of("a", P): 1}
    assert [v.rule for v in check_lost(history)] == ["not-run"]
