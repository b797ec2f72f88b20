"""The start table (``<database>.starts``) and the recovery that reads it.

Covers ``actors.store.starts`` on its own (slots handed out lowest first and
reused, marks read back, growth by doubling, statistics, and ``read_marks``
refusing what is not this database's table), and ``sqlite_schema.recover`` after a
dead process: per session, in-flight messages up to the last marked start
are charged their attempt and marked crashed, later ones get it back; with no
table, or another database's, every in-flight message is charged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import apsw
import pytest
from deadprocess import mark_started

import actors
from actors.store.sqlite import SqliteStore
from actors.store.starts import MAGIC, StartTable, database_identity, read_marks

IDENTITY = (1, 2)  # any (device, inode) for the unit tests

# -- StartTable and read_marks ---------------------------------------------


@pytest.fixture
def table_path(tmp_path: Path) -> str:
    return str(tmp_path / "t.starts")


def test_acquire_hands_out_distinct_slots_lowest_first_and_reuses_released(
    table_path: str,
) -> None:
    table = StartTable(table_path, IDENTITY)
    try:
        assert [table.acquire() for _ in range(4)] == [0, 1, 2, 3]
        assert table.statistics().in_use == 4
        table.release(1)
        assert table.statistics().in_use == 3
        assert table.acquire() == 1  # the freed slot, before any higher one
        assert table.acquire() == 4
    finally:
        table.close()


def test_marks_are_read_back_and_release_zeroes_the_slot(table_path: str) -> None:
    table = StartTable(table_path, IDENTITY)
    try:
        a, b = table.acquire(), table.acquire()
        table.acquire()  # never marked: its 0 is not a mark
        table.mark(a, 101)
        table.mark(b, 202)
        table.mark(a, 103)  # the slot holds the last start only
        assert sorted(read_marks(table_path, IDENTITY) or []) == [103, 202]
        assert table.statistics().marks == 3
        table.release(a)
        assert read_marks(table_path, IDENTITY) == [202]
        assert table.statistics().in_use == 2
    finally:
        table.close()
    # The marks outlive the table's process view: they are in the file.
    assert read_marks(table_path, IDENTITY) == [202]


def test_table_grows_by_doubling_and_earlier_marks_survive(table_path: str) -> None:
    table = StartTable(table_path, IDENTITY)
    try:
        assert table.statistics().capacity == 64
        slots = [table.acquire() for _ in range(64)]
        for slot in slots:
            table.mark(slot, 1000 + slot)
        assert table.statistics().capacity == 64
        extra = table.acquire()  # every slot taken: the file doubles
        assert extra == 64
        assert table.statistics().capacity == 128
        assert os.path.getsize(table_path) == 24 + 128 * 8
        table.mark(extra, 5000)
        assert sorted(read_marks(table_path, IDENTITY) or []) == [
            *(1000 + s for s in range(64)),
            5000,
        ]
        stats = table.statistics()
        assert (stats.in_use, stats.marks) == (65, 65)
    finally:
        table.close()


@pytest.mark.parametrize("case", ["missing", "wrong magic", "too short", "other identity"])
def test_read_marks_refuses_what_is_not_this_databases_table(table_path: str, case: str) -> None:
    table = StartTable(table_path, IDENTITY)
    table.mark(table.acquire(), 7)
    table.close()
    assert read_marks(table_path, IDENTITY) == [7]  # the untouched table speaks
    asked = IDENTITY
    if case == "missing":
        os.remove(table_path)
    elif case == "wrong magic":
        with open(table_path, "r+b") as f:
            f.write(b"notstart")
        assert MAGIC != b"notstart"
    elif case == "too short":
        with open(table_path, "r+b") as f:
            f.truncate(20)  # less than the 24-byte header
    else:
        asked = (IDENTITY[0], IDENTITY[1] + 1)
    assert read_marks(table_path, asked) is None


# -- recovery after a dead process -----------------------------------------


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def left_by_a_dead_process(db_path: str, values: str, marks: list[int] | None) -> None:
    """Create the database, insert rows as a dead process left them, and its marks.

    ``marks`` None removes the start table altogether.
    """
    async with actors.run_system(db_path, handler=noop):
        pass
    conn = apsw.Connection(db_path)
    conn.execute(
        "INSERT INTO messages (id, session_id, seq, state, attempts, body, enqueued_at) VALUES "
        + values
    )
    conn.close()
    if marks is None:
        os.remove(db_path + ".starts")
    else:
        mark_started(db_path, marks)


async def redeliveries(db_path: str, recovered: int) -> list[tuple[object, int]]:
    """Run a system over the database to the end; (body, attempt) in handling order."""
    seen: list[tuple[object, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler) as system:
        assert system.recovered == recovered
        await system.drain()
        assert system.dead_letters() == []
    return seen


THREE_IN_FLIGHT = (
    "(10, 's', 10, 1, 1, '\"m10\"', 0), (11, 's', 11, 1, 1, '\"m11\"', 0),"
    " (12, 's', 12, 1, 1, '\"m12\"', 0)"
)


async def test_charged_up_to_the_sessions_mark_given_back_after_it(
    db_path: str, autojump_clock: object
) -> None:
    # 11's handler had started, so 10 (before it, same session) had too; 12
    # was claimed but still waiting in the actor's queue.
    await left_by_a_dead_process(db_path, THREE_IN_FLIGHT, marks=[11])
    seen = await redeliveries(db_path, recovered=3)
    assert seen == [("m10", 2), ("m11", 2), ("m12", 1)]


async def test_session_without_a_mark_gets_every_attempt_back(
    db_path: str, autojump_clock: object
) -> None:
    await left_by_a_dead_process(
        db_path,
        "(1, 'a', 1, 1, 1, '\"a1\"', 0), (2, 'b', 2, 1, 1, '\"b1\"', 0),"
        " (3, 'a', 3, 1, 1, '\"a2\"', 0), (4, 'b', 4, 1, 1, '\"b2\"', 0)",
        marks=[3],  # only session a had a handler running
    )
    seen = await redeliveries(db_path, recovered=4)
    assert [s for s in seen if s[0] in ("a1", "a2")] == [("a1", 2), ("a2", 2)]
    assert [s for s in seen if s[0] in ("b1", "b2")] == [("b1", 1), ("b2", 1)]


async def test_mark_of_a_message_already_acked_charges_nothing(
    db_path: str, autojump_clock: object
) -> None:
    # The session's last start was message 9, whose ack committed (the row is
    # gone); 10 and 11 were claimed behind it and never started.
    await left_by_a_dead_process(
        db_path,
        "(10, 's', 10, 1, 1, '\"m10\"', 0), (11, 's', 11, 1, 1, '\"m11\"', 0)",
        marks=[9],
    )
    seen = await redeliveries(db_path, recovered=2)
    assert seen == [("m10", 1), ("m11", 1)]


async def test_without_a_start_table_every_in_flight_message_is_charged(
    db_path: str, autojump_clock: object
) -> None:
    await left_by_a_dead_process(db_path, THREE_IN_FLIGHT, marks=None)  # file removed
    seen = await redeliveries(db_path, recovered=3)
    assert seen == [("m10", 2), ("m11", 2), ("m12", 2)]


@pytest.mark.parametrize("how", ["copied from another database", "other identity"])
async def test_start_table_of_another_database_is_ignored(
    db_path: str, tmp_path: Path, autojump_clock: object, how: str
) -> None:
    await left_by_a_dead_process(db_path, THREE_IN_FLIGHT, marks=None)
    starts = db_path + ".starts"
    if how == "copied from another database":
        other = str(tmp_path / "other.db")
        async with actors.run_system(other, handler=noop):
            pass
        mark_started(other, [10])
        shutil.copyfile(other + ".starts", starts)
    else:
        table = StartTable(starts, (0, 0))
        table.mark(table.acquire(), 10)
        table.close()
    # Had it matched, 11 and 12 would get their attempt back.
    assert read_marks(starts, database_identity(db_path)) is None
    seen = await redeliveries(db_path, recovered=3)
    assert seen == [("m10", 2), ("m11", 2), ("m12", 2)]


async def test_clean_run_marks_each_start_and_leaves_no_marks(
    db_path: str, autojump_clock: object
) -> None:
    starts = db_path + ".starts"
    during: list[tuple[int, list[int] | None]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        during.append((msg.id, read_marks(starts, database_identity(db_path))))

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("a", 1)
        await system.send("b", 2)
        await system.drain()
        assert len(during) == 2
    # While each handler ran, the file held its message's id.
    for message_id, marks in during:
        assert marks is not None and message_id in marks
    # Every actor left after its acks committed and released its slot (and
    # the file is still there: read_marks would say None otherwise).
    assert read_marks(starts, database_identity(db_path)) == []


@pytest.mark.parametrize(
    ("marks", "crashed"),
    [([11], {10: 1, 11: 1, 12: 0}), (None, {10: 1, 11: 1, 12: 1})],
    ids=["marked at 11", "no table"],
)
async def test_recovery_marks_charged_messages_crashed_and_only_them(
    db_path: str, autojump_clock: object, marks: list[int] | None, crashed: dict[int, int]
) -> None:
    await left_by_a_dead_process(db_path, THREE_IN_FLIGHT, marks=marks)
    store, opened = await SqliteStore.open(db_path, durability="normal", busy_timeout=5.0)
    try:
        assert opened.recovered == 3
        assert opened.pending == 3
    finally:
        await store.aclose()
    conn = apsw.Connection(db_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT id, state, attempts, crashed FROM messages ORDER BY id")
        got = {int(i): (state, attempts, c) for i, state, attempts, c in rows}
    finally:
        conn.close()
    # Charged: attempt kept and crashed; given back: attempt 0, not crashed.
    assert got == {i: (0, c, c) for i, c in crashed.items()}
    # Recovery read the old marks, then began a fresh table.
    assert read_marks(db_path + ".starts", database_identity(db_path)) == []
