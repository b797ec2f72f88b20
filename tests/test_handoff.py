"""Claim on delivery: an idle, caught-up actor gets its next message claimed at insert."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import actors
from actors._actor import SessionActor


def statement(name: str) -> str:
    """A hot statement of the SQLite store, by its name in its module."""
    from actors.store import sqlite_claim, sqlite_ops

    sql = getattr(sqlite_claim, name, None) or getattr(sqlite_ops, name)
    assert isinstance(sql, str)
    return sql


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


async def test_idle_actor_is_handed_messages_claimed_at_insert(
    db_path: str, autojump_clock: object
) -> None:
    seen: list[tuple[int, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", 0)
        await system.drain()  # the actor is now idle and caught up
        commits = system.statistics().commits
        for i in range(1, 20):
            await system.send("s", i)
            await system.drain()
        # (The first one too: it was handed to the actor started for it.)
        assert system._router.handoffs == 20
        # One commit for the send (claim included) and one for the ack, at most.
        assert system.statistics().commits - commits <= 2 * 19
    assert seen == [(i, 1) for i in range(20)]


@pytest.mark.parametrize("disturb", ["kill", "wake"])
async def test_reserved_actor_disturbed_before_the_handoff_runs_it_once(
    db_path: str, autojump_clock: object, monkeypatch: pytest.MonkeyPatch, disturb: str
) -> None:
    """A kill, or a wake-up (others want its slot), between reservation and commit."""
    original: Callable[[SessionActor], None] = SessionActor.reserve

    def reserve_and_disturb(self: SessionActor) -> None:
        original(self)
        if disturb == "kill":
            assert self.kill()
        else:
            self.wake()

    seen: list[tuple[int, int]] = []
    running: set[str] = set()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        assert ctx.session_id not in running
        running.add(ctx.session_id)
        await trio.sleep(0.01)
        running.discard(ctx.session_id)
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("s", 0)
        await system.drain()
        monkeypatch.setattr(SessionActor, "reserve", reserve_and_disturb)
        for i in range(1, 6):
            await system.send("s", i)
            await system.drain()
        assert system._router.handoffs == 6  # (0 to the new actor, then 1-5)
        assert system.dead_letters() == []
    # Each message ran exactly once, on its first attempt.
    assert seen == [(i, 1) for i in range(6)]


async def test_handoff_to_an_actor_that_is_gone_gives_the_claim_back(
    db_path: str, autojump_clock: object
) -> None:
    """A message claimed for an actor that left the registry goes back to pending."""
    seen: list[tuple[int, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler) as system:
        sup = system._sup
        stranger = SessionActor("s", sup)  # reserved, but never registered
        stranger.reserved = True
        sup.reserved.add(1)
        # The row as the router would have inserted it: claimed, attempt 1.
        first, _ = await system._store.append(lambda: (["s"], ["7"], [0.0], None, {0}, None, 0.0))
        sup.outstanding.add(1)
        sup.hand_over(
            stranger,
            [actors.Message(id=first, session_id="s", body=7, attempt=1, enqueued_at=0.0)],
        )
        assert sup.reserved.value == 0
        await system.drain()  # released, then claimed by a real actor
    assert seen == [(7, 1)]  # the attempt was given back: it never ran


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("HEAD", "USING INDEX messages_queue"),
        ("HEAD2", "USING INDEX messages_queue"),
        ("PENDING_ANY", "USING INDEX messages_queue"),
        ("FOLLOWING", "USING INDEX messages_queue"),
        ("DELETE_IDS", "USING INTEGER PRIMARY KEY"),
    ],
)
async def test_per_message_queries_search_the_queue_index(
    db_path: str, query: str, index: str
) -> None:
    """The queries run per claim, per batch or per box of acks read the
    messages table through an index, never the whole table. (SQLite uses a
    partial index only when the query's WHERE spells out the index's terms:
    ``state = 0`` alone made the pending check scan every row, and a growing
    backlog slowed each batch.) The set-based ones read their argument, a
    JSON array, with json_each: that scan is of the array."""
    import apsw

    async with actors.run_system(db_path, handler=noop):
        pass
    sql = statement(query)
    conn = apsw.Connection(db_path)
    try:
        plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", (None,) * sql.count("?")).fetchall()
    finally:
        conn.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert index in details and "SCAN messages" not in details, details


@pytest.mark.parametrize(
    ("query", "bindings"),
    [
        ("HEAD", lambda i: (f"s{i}",)),
        ("HEAD2", lambda i: (f"s{i}",)),
        ("FOLLOWING", lambda i: (f"s{i}", i, 4)),
        ("PENDING_ANY", lambda i: (f'["s{i}", "t{i}"]',)),
        ("DELETE_IDS", lambda i: (f"[{i}, {i + 1}]",)),
    ],
)
async def test_per_message_queries_are_prepared_once(
    db_path: str, query: str, bindings: Callable[[int], tuple[object, ...]]
) -> None:
    """The queries run per claim, per batch or per box of acks are compiled
    once, whatever values they are run with. (SQLite built with STAT4 lets
    a bare parameter's value choose the plan of a query with ORDER BY, and
    prepared the claim again at each run: two thirds of its cost.) SQLite
    calls the authorizer while it compiles a statement, a re-prepare
    included, and never while it runs one."""
    import apsw

    async with actors.run_system(db_path, handler=noop) as system:
        await system.send_many([(f"s{i}", i) for i in range(8)] + [(f"t{i}", i) for i in range(8)])
        await system.drain()
    sql = statement(query)
    conn = apsw.Connection(db_path)
    compiled: list[int] = []

    def authorizer(*_: object) -> int:
        compiled.append(1)
        return apsw.SQLITE_OK

    try:
        conn.authorizer = authorizer
        conn.execute("BEGIN")  # (rolled back: DELETE_IDS deletes rows)
        compiled.clear()
        conn.execute(sql, bindings(0)).fetchall()  # prepared (and cached) here
        first = len(compiled)
        assert first > 0, "the authorizer saw no compilation at all"
        for i in range(1, 8):
            conn.execute(sql, bindings(i)).fetchall()
        assert len(compiled) == first, f"{query} was compiled again when run again"
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def test_a_session_with_pending_messages_is_not_handed_newer_ones(
    db_path: str, autojump_clock: object
) -> None:
    """Handed messages never overtake one waiting in the database: while the
    session has pending messages, the store inserts newer ones pending too,
    even though the actor has room for them (Store._drop_overtaking)."""
    release = trio.Event()
    seen: list[tuple[int, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == 1:
            await release.wait()
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(db_path, handler=handler, mailbox_size=2) as system:
        await system.send("s", 0)
        await system.drain()  # the actor is idle now
        await system.send_many([("s", i) for i in range(1, 6)])  # 1, 2 handed; 3-5 pending
        await trio.testing.wait_all_tasks_blocked()  # 1 runs (blocked), 2 waits handed
        actor = system._sup._actors["s"]
        assert [m.body for m in actor.handed] == [2]
        handoffs = system._router.handoffs
        await system.send("s", 6)  # room for it, but 3-5 are pending: not handed
        assert system._router.handoffs == handoffs
        assert [m.body for m in actor.handed] == [2]
        release.set()
        await system.drain()
    assert seen == [(i, 1) for i in range(7)]


async def test_handed_messages_go_back_unstarted_when_the_handler_fails(
    db_path: str, autojump_clock: object
) -> None:
    """A failure gives back what was handed behind the failed message: their
    attempt is not counted, and they run after its retry, in order."""
    release = trio.Event()
    seen: list[tuple[int, int]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == 0 and msg.attempt == 1:
            await release.wait()
            raise RuntimeError("first attempt fails")
        seen.append((msg.body, msg.attempt))

    async with actors.run_system(
        db_path, handler=handler, retry_backoff=actors.Backoff(initial=1.0, jitter=0.0)
    ) as system:
        await system.send("s", 0)
        await trio.testing.wait_all_tasks_blocked()
        await system.send_many([("s", i) for i in range(1, 4)])
        assert [m.body for m in system._sup._actors["s"].handed] == [1, 2, 3]
        release.set()
        await system.drain()
    assert seen == [(0, 2), (1, 1), (2, 1), (3, 1)]


async def test_a_handoff_settled_after_a_crash_does_not_overtake_the_failed_message(
    db_path: str, autojump_clock: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reserved while "stuck" ran (in flight, so nothing was pending and "next"
    was inserted claimed), settled only after "stuck" failed back to pending
    and a new incarnation serves: "next" must not run before "stuck"."""
    from actors._supervisor import Supervisor

    release = trio.Event()
    seen: list[str] = []
    held: list[tuple[Supervisor, SessionActor, list[actors.Message]]] = []
    original = Supervisor.hand_over

    def hold_next(self: Supervisor, actor: SessionActor, msgs: list[actors.Message]) -> None:
        if msgs and msgs[0].body == "next":
            held.append((self, actor, msgs))
        else:
            original(self, actor, msgs)

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body == "stuck":
            await release.wait()
            raise RuntimeError("always")
        seen.append(msg.body)

    monkeypatch.setattr(Supervisor, "hand_over", hold_next)
    async with actors.run_system(
        db_path,
        handler=handler,
        retry_backoff=actors.Backoff(initial=1000, jitter=0),
        idle_timeout=10,
    ) as system:
        stuck = await system.send("s", "stuck")
        await trio.testing.wait_all_tasks_blocked()
        await system.send("s", "next")  # inserted claimed; its handoff is held
        # ("stuck" was handed too, to the actor started for it.)
        assert len(held) == 1 and system._router.handoffs == 2
        release.set()  # "stuck" fails: back to pending, waiting for its retry
        await trio.testing.wait_all_tasks_blocked()  # a new incarnation waits for the handoff
        original(*held[0])  # the handoff is settled now
        await trio.testing.wait_all_tasks_blocked()
        assert seen == []  # "next" waits behind "stuck"
        assert await system.abort(stuck)
        await system.drain()
    assert seen == ["next"]
