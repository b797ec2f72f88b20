"""send(key=...): idempotent sends, per session, within a retention window.

A send whose (session, key) was sent before persists nothing and returns the
first message's id while that message is pending, in flight or dead, or was
processed less than ``key_retention`` seconds ago. After the window the
same key is new work, and the System's periodic sweep deletes the key.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from dbrows import query

import actors
from actors.testing import fast_options


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


class Boom(Exception):
    pass


class Handled:
    """A handler that records (id, session, body, key) and can be held."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str, Any, str | None]] = []
        self.release = trio.Event()
        self.entered = trio.Event()
        self.fail: set[Any] = set()

    async def handler(self, ctx: actors.Context, msg: actors.Message) -> None:
        self.calls.append((msg.id, ctx.session_id, msg.body, msg.key))
        if msg.body == "hold":
            self.entered.set()
            await self.release.wait()
        if msg.body in self.fail:
            raise Boom(msg.body)


def keys_table(db_path: str) -> dict[tuple[str, str], tuple[int, float | None]]:
    found = query(db_path, "SELECT session_id, key, message_id, done_at FROM keys")
    return {(s, k): (m, d) for s, k, m, d in found}


def message_count(db_path: str) -> int:
    return int(query(db_path, "SELECT count(*) FROM messages")[0][0])


# -- while the first message is pending, in flight, dead ------------------------


async def test_a_duplicate_of_a_pending_message_persists_nothing(
    db_path: str, clock: object
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        await system.send("s", "hold")  # the head: the keyed message waits behind it
        first = await system.send("s", "work", key="k")
        await h.entered.wait()
        assert await system.send("s", "work again", key="k") == first
        assert await system.send("s", "work", key="k") == first
        assert system.statistics().sends == 2
        assert message_count(db_path) == 2
        h.release.set()
        await system.drain()
    assert [(i, b, k) for i, _, b, k in h.calls[1:]] == [(first, "work", "k")]


async def test_a_duplicate_of_a_message_in_flight_persists_nothing(
    db_path: str, clock: object
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        first = await system.send("s", "hold", key="k")
        await h.entered.wait()
        assert system.busy_sessions() == ["s"]
        assert await system.send("s", "hold", key="k") == first
        h.release.set()
        await system.drain()
        assert system.statistics().processed == 1
    assert [c[0] for c in h.calls] == [first]


async def test_a_duplicate_of_a_dead_letter_persists_nothing_until_it_is_aborted(
    db_path: str, autojump_clock: object
) -> None:
    h = Handled()
    h.fail.add("poison")
    async with actors.run_system(db_path, handler=h.handler, max_attempts=1) as system:
        first = await system.send("s", "poison", key="k")
        await system.drain()
        assert [d.id for d in system.dead_letters()] == [first]
        assert await system.send("s", "poison", key="k") == first
        await system.drain()
        assert len(h.calls) == 1 and len(system.dead_letters()) == 1
        # Aborting the keyed message forgets its key: the next send is new work.
        assert await system.abort(first)
        assert keys_table(db_path) == {}
        h.fail.clear()
        second = await system.send("s", "poison", key="k")
        await system.drain()
    assert second > first
    assert [c[0] for c in h.calls] == [first, second]


async def test_aborting_a_pending_keyed_message_forgets_its_key(
    db_path: str, autojump_clock: object
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        await system.send("s", "hold")
        first = await system.send("s", "queued", key="k")
        other = await system.send("s", "other", key="other key")
        await h.entered.wait()
        assert await system.abort(first)
        assert set(keys_table(db_path)) == {("s", "other key")}  # only its own key went
        second = await system.send("s", "queued", key="k")
        assert await system.send("s", "other", key="other key") == other
        h.release.set()
        await system.drain()
    assert second not in (first, other)
    assert [(i, b) for i, _, b, _ in h.calls] == [
        (h.calls[0][0], "hold"),
        (other, "other"),
        (second, "queued"),
    ]


async def test_retry_dead_keeps_the_key(db_path: str, autojump_clock: object) -> None:
    h = Handled()
    h.fail.add("x")
    async with actors.run_system(db_path, handler=h.handler, max_attempts=1) as system:
        first = await system.send("s", "x", key="k")
        await system.drain()
        h.fail.clear()
        assert await system.retry_dead(first) == 1
        assert await system.send("s", "x", key="k") == first  # pending again
        await system.drain()
        assert await system.send("s", "x", key="k") == first  # processed, within the window
        await system.drain()
    assert [c[0] for c in h.calls] == [first, first]


# -- the retention window --------------------------------------------------------


async def test_a_processed_key_is_remembered_for_the_retention_window(
    db_path: str, autojump_clock: object
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler, key_retention=100) as system:
        await trio.sleep(5)
        first = await system.send("s", "job", key="k")
        await system.drain()
        (_, done_at) = keys_table(db_path)["s", "k"]
        assert done_at is not None
        await trio.sleep(50)
        assert await system.send("s", "job", key="k") == first  # 50 s after: a duplicate
        await system.drain()
        assert len(h.calls) == 1
        # 105 s after it was processed, and before any sweep forgot the key:
        # the send itself sees the window has passed. New work.
        await trio.sleep(55)
        assert keys_table(db_path)["s", "k"] == (first, done_at)
        second = await system.send("s", "job", key="k")
        await system.drain()
        assert second > first
        assert keys_table(db_path)["s", "k"][0] == second
        assert await system.send("s", "job", key="k") == second
    assert [c[0] for c in h.calls] == [first, second]


async def test_the_sweep_deletes_keys_after_the_window_and_only_those(
    db_path: str, autojump_clock: object
) -> None:
    h = Handled()
    h.fail.add("dead")
    start = trio.current_time()
    # The sweep runs every key_retention / 4 = 25 s, from the start.
    async with actors.run_system(
        db_path, handler=h.handler, key_retention=100, max_attempts=1
    ) as system:
        await trio.sleep_until(start + 5)
        await system.send("s", "early", key="early")
        await system.send("s", "dead", key="dead")  # dead: remembered for good
        await system.drain()
        await trio.sleep_until(start + 60)
        await system.send("s", "late", key="late")
        await system.drain()
        await trio.sleep_until(start + 120)  # sweeps at 100 (before 0): nothing to forget
        assert {k for _, k in keys_table(db_path)} == {"early", "dead", "late"}
        await trio.sleep_until(start + 130)  # sweep at 125 (before 25): "early" goes
        assert {k for _, k in keys_table(db_path)} == {"dead", "late"}
        await trio.sleep_until(start + 180)  # sweep at 175 (before 75): "late" goes
        assert {k for _, k in keys_table(db_path)} == {"dead"}
        await trio.sleep(1000)
        assert {k for _, k in keys_table(db_path)} == {"dead"}
        assert [d.body for d in system.dead_letters()] == ["dead"]


async def test_with_no_retention_a_processed_key_is_new_work(
    db_path: str, autojump_clock: object
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler, key_retention=0) as system:
        await system.send("s", "hold", key="k")
        await h.entered.wait()
        first = await system.send("s", "hold", key="k")  # in flight: still a duplicate
        h.release.set()
        await system.drain()
        await trio.sleep(1)
        second = await system.send("s", "again", key="k")
        await system.drain()
    assert second > first
    assert [c[0] for c in h.calls] == [first, second]


# -- scope of a key ----------------------------------------------------------------


async def test_keys_are_per_session(db_path: str, autojump_clock: object) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        a = await system.send("a", 1, key="tool-use-1")
        b = await system.send("b", 2, key="tool-use-1")
        assert await system.send("a", 3, key="tool-use-1") == a
        await system.drain()
    assert a != b
    assert sorted((i, s, body, key) for i, s, body, key in h.calls) == [
        (a, "a", 1, "tool-use-1"),
        (b, "b", 2, "tool-use-1"),
    ]


async def test_duplicates_within_one_batch(db_path: str, clock: object) -> None:
    h = Handled()
    sends = [
        ("s", "k1", "first"),
        ("s", None, "plain 1"),
        ("s", "k1", "duplicate"),
        ("t", "k1", "other session"),
        ("s", "k2", "second key"),
        ("s", None, "plain 2"),
        ("s", "k1", "duplicate again"),
    ]
    ids: dict[int, int] = {}

    async def send(index: int, session: str, key: str | None, body: str) -> None:
        ids[index] = await system.send(session, body, key=key)

    async with actors.run_system(db_path, handler=h.handler) as system:
        await trio.testing.wait_all_tasks_blocked()  # the router waits for work
        batches = system._router.statistics().batches
        async with trio.open_nursery() as nursery:
            for index, (session, key, body) in enumerate(sends):
                nursery.start_soon(send, index, session, key, body)
        assert system._router.statistics().batches == batches + 1  # one batch, as intended
        await system.drain()
        stats = system.statistics()
    assert ids[0] == ids[2] == ids[6]
    assert len({ids[i] for i in (0, 1, 3, 4, 5)}) == 5
    assert stats.sends == 5 and stats.processed == 5
    handled = {i: body for i, _, body, _ in h.calls}
    # The first of the duplicates (in the batch's order) is the one that was persisted.
    assert handled[ids[0]] in {"first", "duplicate", "duplicate again"}
    assert sorted(handled) == sorted({ids[i] for i in range(7)})


async def test_send_and_send_many_share_a_batch_with_keys_on_the_right_messages(
    db_path: str, clock: object
) -> None:
    # Keyed and unkeyed send() and send_many() calls share one batch: each
    # key must stay with its own message, whichever order trio runs the
    # callers in. (A keyed call after unkeyed ones pads the keys before it;
    # an unkeyed call after a keyed one pads its own. Eight rounds of six
    # callers: every order that matters comes up.)
    h = Handled()
    ids: dict[str, int] = {}
    expected: dict[str, str | None] = {}

    async def call(items: list[tuple[str, Any] | tuple[str, Any, str | None]]) -> None:
        if len(items) == 1:
            ids[items[0][1]] = await system.send(*items[0])
        else:
            for (_, body, *_), got in zip(items, await system.send_many(items), strict=True):
                ids[body] = got

    async with actors.run_system(db_path, handler=h.handler) as system:
        for r in range(8):
            k1, k2 = f"k1-{r}", f"k2-{r}"
            calls: list[list[tuple[str, Any] | tuple[str, Any, str | None]]] = [
                [("s", f"a{r}")],
                [("t", f"d{r}.0"), ("t", f"d{r}.1")],
                [
                    ("s", f"b{r}.0"),
                    ("s", f"b{r}.1", k1),
                    ("s", f"b{r}.2", None),
                    ("s", f"b{r}.3", k1),
                    ("t", f"b{r}.4", k1),
                ],
                [("t", f"e{r}.0"), ("t", f"e{r}.1")],
                [("s", f"c{r}.0", k2), ("t", f"c{r}.1")],
                [("s", f"f{r}")],
            ]
            for items in calls:
                for _, body, *key in items:
                    expected[body] = key[0] if key else None
            del expected[f"b{r}.3"]  # a duplicate of b{r}.1: answered with its id
            await trio.testing.wait_all_tasks_blocked()  # the router waits for work
            batches = system._router.statistics().batches
            async with trio.open_nursery() as nursery:
                for items in calls:
                    nursery.start_soon(call, items)
            assert system._router.statistics().batches == batches + 1  # one batch
            assert ids[f"b{r}.1"] == ids[f"b{r}.3"]
        await system.drain()
        stats = system.statistics()
    assert len(set(ids.values())) == len(expected) == 8 * 12
    assert stats.sends == stats.processed == len(expected)
    assert {body: key for _, _, body, key in h.calls} == expected
    assert all(ids[body] == msg_id for msg_id, _, body, _ in h.calls)


async def test_a_producer_that_retries_after_a_timeout_causes_no_duplicate_work(
    db_path: str, clock: object
) -> None:
    # A hook that fires twice: the first send is cancelled while it waits for
    # the commit (its caller never learns the id), the producer sends again.
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        with trio.CancelScope() as scope:
            scope.cancel()
            await system.send("s", "observation", key="tool-use-42")
        assert scope.cancelled_caught
        message_id = await system.send("s", "observation", key="tool-use-42")
        assert await system.send("s", "observation", key="tool-use-42") == message_id
        await system.drain()
    assert h.calls == [(message_id, "s", "observation", "tool-use-42")]


async def test_a_delayed_keyed_message_is_deduplicated(
    db_path: str, autojump_clock: object
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        start = trio.current_time()
        first = await system.send("s", "later", key="k", delay=10)
        assert await system.send("s", "now", key="k") == first
        await system.drain()
        assert trio.current_time() - start == pytest.approx(10)
    assert h.calls == [(first, "s", "later", "k")]


async def test_keys_survive_a_restart_of_the_system(db_path: str, autojump_clock: object) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler, shutdown_timeout=1) as system:
        first = await system.send("s", "hold", key="k")
        await h.entered.wait()
    h.release.set()
    async with actors.run_system(db_path, handler=h.handler) as system:
        assert await system.send("s", "hold", key="k") == first  # pending again after the stop
        await system.drain()
    async with actors.run_system(db_path, handler=h.handler) as system:
        assert await system.send("s", "hold", key="k") == first  # processed, within the window
        await system.drain()
    assert [(i, b) for i, _, b, _ in h.calls] == [(first, "hold"), (first, "hold")]


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (42, TypeError),
        (b"k", TypeError),
        ("", ValueError),
        ("x" * 257, ValueError),
        ("a\x00b", ValueError),
        ("\ud800", ValueError),
    ],
)
async def test_bad_keys_are_refused_before_anything_is_persisted(
    db_path: str, key: object, error: type[Exception]
) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        with pytest.raises(error, match="key"):
            await system.send("s", 1, key=key)  # type: ignore[arg-type]
        assert system.statistics().sends == 0
    assert message_count(db_path) == 0 and keys_table(db_path) == {}


async def test_a_key_of_256_characters_and_a_str_subclass_are_accepted(
    db_path: str, autojump_clock: object
) -> None:
    class Key(str):
        pass

    h = Handled()
    async with actors.run_system(db_path, handler=h.handler) as system:
        long_id = await system.send("s", 1, key="é" * 256)
        sub_id = await system.send("s", 2, key=Key("tool-use"))
        assert await system.send("s", 3, key="tool-use") == sub_id
        await system.drain()
    assert [(i, k, type(k)) for i, _, _, k in h.calls] == [
        (long_id, "é" * 256, str),
        (sub_id, "tool-use", str),
    ]


# -- a model of the window --------------------------------------------------------

RETENTION = 5.5  # not a whole number: no send lands exactly on a boundary


async def _run_key_model(path: str, steps: list[tuple[str, int, int]]) -> None:
    handled: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        handled.append(msg.id)

    # {(session, key): (id of the message the key was last sent as, when)}.
    # A handler that does not wait is done before the clock moves again, so
    # the model takes the send time as the time it was processed.
    model: dict[tuple[int, int], tuple[int, float]] = {}
    expected_handled: list[int] = []
    async with actors.run_system(path, handler=handler, key_retention=RETENTION) as system:
        for action, session, key in steps:
            now = trio.current_time()
            if action == "send":
                got = await system.send(f"s{session}", None, key=f"k{key}")
                known = model.get((session, key))
                if known is not None and known[1] >= now - RETENTION:
                    assert got == known[0], (session, key, known, now)
                else:
                    assert known is None or got > known[0]
                    model[session, key] = (got, now)
                    expected_handled.append(got)
            elif action == "drain":
                await system.drain()
            else:
                await trio.sleep(session + key)  # 0 to 3 seconds
        await system.drain()
    assert sorted(handled) == sorted(expected_handled)


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["send", "send", "drain", "advance"]),
            st.integers(0, 1),
            st.integers(0, 2),
        ),
        max_size=30,
    )
)
def test_keyed_sends_follow_the_model_of_the_window(steps: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(
            _run_key_model,
            str(Path(tmp) / "actors.db"),
            steps,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )


async def test_message_key_is_none_for_a_plain_send(db_path: str, autojump_clock: object) -> None:
    h = Handled()
    async with actors.run_system(db_path, handler=h.handler, **fast_options()) as system:
        await system.send("s", "plain")
        await system.send("s", "keyed", key="k")
        await system.drain()
    assert [(b, k) for _, _, b, k in h.calls] == [("plain", None), ("keyed", "k")]
