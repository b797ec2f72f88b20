"""Batched handlers: ``@actors.batched`` and ``Actor.handle_batch``.

A batch is the message about to run and the first deliveries already
claimed behind it, in order, at most ``max_size``; it never waits for more.
One ack commits the batch with its state, outbox and keys. A failed batch
fails the attempt of each of its messages, which are then retried one at a
time (redeliveries never batch): a poison message ends in dead letters
alone, and batching resumes after it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from dbrows import query
from helpers import drain_nowait

import actors
import actors.testing
from actors.testing import fast_options, quiescent


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


class Boom(Exception):
    pass


class Held:
    """A batched handler (``handle``) that records each batch it gets, as
    (session, [(body, attempt), ...]), and holds on a batch that starts with "hold"."""

    def __init__(self, max_size: int = 100) -> None:
        self.calls: list[tuple[str, list[tuple[Any, int]]]] = []
        self.entered = trio.Event()
        self.release = trio.Event()
        self.handle = actors.batched(max_size=max_size)(self._handle)

    async def _handle(self, ctx: actors.Context, msgs: list[actors.Message]) -> Any:
        self.calls.append((ctx.session_id, [(m.body, m.attempt) for m in msgs]))
        if msgs[0].body == "hold":
            self.entered.set()
            await self.release.wait()
        return None

    def bodies(self, session_id: str) -> list[list[Any]]:
        return [[b for b, _ in batch] for s, batch in self.calls if s == session_id]


async def test_batches_are_consecutive_in_order_and_at_most_max_size(
    db_path: str, clock: object
) -> None:
    held = Held(max_size=10)
    async with actors.run_system(db_path, handler=held.handle) as system:
        await system.send("s", "hold")
        await held.entered.wait()
        await system.send_many([("s", i) for i in range(25)] + [("t", i) for i in range(3)])
        held.release.set()
        stats = await quiescent(system)
    assert held.bodies("s") == [["hold"], list(range(10)), list(range(10, 20)), list(range(20, 25))]
    assert held.bodies("t") == [[0, 1, 2]]
    assert all(attempt == 1 for _, batch in held.calls for _, attempt in batch)
    assert stats.processed == 29 and stats.failed_attempts == 0


async def test_a_lone_message_runs_at_once_as_a_batch_of_one(
    db_path: str, autojump_clock: object
) -> None:
    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> list[Any]:
        return [("alone", len(msgs), m.body) for m in msgs]

    async with actors.run_system(db_path, handler=handle) as system:
        assert await system.ask("s", 1) == ("alone", 1, 1)
        assert await system.ask("s", 2) == ("alone", 1, 2)


async def test_an_actor_class_with_handle_batch_and_its_size(
    db_path: str, autojump_clock: object
) -> None:
    calls: list[list[Any]] = []
    entered, release = trio.Event(), trio.Event()

    class Summer(actors.Actor):
        @actors.batched(max_size=2)
        async def handle_batch(
            self, ctx: actors.Context, msgs: list[actors.Message]
        ) -> list[int] | None:
            calls.append([m.body for m in msgs])
            if msgs[0].body == 0:
                entered.set()
                await release.wait()
                return None
            ctx.state["sum"] = ctx.state.get("sum", 0) + sum(m.body for m in msgs)
            return [ctx.state["sum"]] * len(msgs)

    async with actors.run_system(db_path, handler=Summer) as system:
        await system.send("s", 0)
        await entered.wait()
        await system.send_many([("s", i) for i in range(1, 6)])
        release.set()
        await quiescent(system)
        assert await system.ask("s", 10) == 25
    assert calls == [[0], [1, 2], [3, 4], [5], [10]]


async def test_state_and_outbox_commit_with_the_batch_and_a_killed_batch_commits_neither(
    db_path: str, clock: object
) -> None:
    calls: list[list[tuple[Any, int]]] = []
    delivered: list[Any] = []
    entered = trio.Event()

    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
        if ctx.session_id == "out":
            delivered.extend(m.body for m in msgs)
            return
        calls.append([(m.body, m.attempt) for m in msgs])
        for m in msgs:
            ctx.state[str(m.body)] = ctx.state.get(str(m.body), 0) + 1
            ctx.send("out", m.body)
        if len(msgs) > 1:
            entered.set()
            await trio.sleep_forever()

    async with actors.run_system(db_path, handler=handle, **fast_options()) as system:
        await system.send_many([("s", i) for i in range(4)])
        await entered.wait()
        assert query(db_path, "SELECT id FROM messages WHERE session_id = 'out'") == []
        assert system.kill("s")
        stats = await quiescent(system)
    # Each message ran alone after the kill, and only those attempts committed.
    assert calls == [[(i, 1) for i in range(4)]] + [[(i, 2)] for i in range(4)]
    assert sorted(delivered) == [0, 1, 2, 3]
    [(state,)] = query(db_path, "SELECT value FROM state WHERE session_id = 's'")
    assert state.replace(" ", "") == '{"0":1,"1":1,"2":1,"3":1}'
    assert stats.failed_attempts == 4 and stats.processed == 8


async def test_a_poison_message_in_a_batch_is_dead_lettered_alone_and_batching_resumes(
    db_path: str, clock: object
) -> None:
    returned: list[list[tuple[Any, int]]] = []

    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
        if any(m.body == "poison" for m in msgs):
            raise Boom("poison in the batch")
        returned.append([(m.body, m.attempt) for m in msgs])

    async with actors.run_system(db_path, handler=handle, **fast_options(max_attempts=3)) as system:
        ids = await system.send_many([("s", b) for b in [0, 1, 2, "poison", 4, 5]])
        stats = await quiescent(system)
        dead = system.dead_letters()
        await system.send_many([("s", b) for b in [6, 7, 8]])
        after = await quiescent(system)
    assert [(d.id, d.attempts) for d in dead] == [(ids[3], 3)]
    # Every neighbour succeeded exactly once, alone; the fresh ones batch again.
    assert returned == [[(b, 2)] for b in [0, 1, 2, 4, 5]] + [[(6, 1), (7, 1), (8, 1)]]
    assert stats.failed_attempts == 6 + 2 and stats.dead_lettered == 1 and stats.processed == 5
    assert after.processed == 8


async def test_a_batch_that_fails_with_one_attempt_allowed_dead_letters_every_message(
    db_path: str, autojump_clock: object
) -> None:
    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
        raise Boom(f"a batch of {len(msgs)}")

    async with actors.run_system(db_path, handler=handle, **fast_options(max_attempts=1)) as system:
        ids = await system.send_many([("s", i) for i in range(3)])
        stats = await quiescent(system)
        dead = system.dead_letters()
    assert [d.id for d in dead] == ids and stats.dead_lettered == 3
    assert all("a batch of 3" in d.last_error for d in dead)


async def test_ask_gets_each_message_its_value(db_path: str, autojump_clock: object) -> None:
    batches: list[list[Any]] = []
    entered, release = trio.Event(), trio.Event()

    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> list[Any] | None:
        batches.append([m.body for m in msgs])
        if msgs[0].body == "hold":
            entered.set()
            await release.wait()
        if msgs[0].body == "none":
            return None
        return [m.body * 10 for m in msgs]

    results: dict[Any, Any] = {}
    async with actors.run_system(db_path, handler=handle) as system:
        await system.send("s", "hold")
        await entered.wait()
        async with trio.open_nursery() as nursery:
            for body in [1, 2, 3, 4]:

                async def ask(body: int = body) -> None:
                    results[body] = await system.ask("s", body)

                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert await system.ask("s", "none") is None
    assert results == {1: 10, 2: 20, 3: 30, 4: 40}
    assert len(batches) == 3 and sorted(batches[1]) == [1, 2, 3, 4]


@pytest.mark.parametrize("failure", ["raise", "wrong length", "timeout"])
async def test_an_ask_in_a_failed_batch_is_answered_by_its_own_retry(
    db_path: str, autojump_clock: object, failure: str
) -> None:
    """The batch's failure is not the message's: its single retry answers the ask."""
    entered, release = trio.Event(), trio.Event()
    attempts: dict[Any, list[int]] = {}

    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> list[Any]:
        for m in msgs:
            attempts.setdefault(m.body, []).append(m.attempt)
        if msgs[0].body == "hold":
            entered.set()
            await release.wait()
        elif len(msgs) > 1:
            if failure == "raise":
                raise Boom("the batch fails")
            if failure == "timeout":
                await trio.sleep_forever()
            return [0]  # wrong length: the batch fails
        return [m.body for m in msgs]

    results: dict[Any, Any] = {}
    async with actors.run_system(
        db_path, handler=handle, **fast_options(handler_timeout=5)
    ) as system:
        await system.send("s", "hold")
        await entered.wait()
        async with trio.open_nursery() as nursery:
            for body in ["a", "b", "c"]:

                async def ask(body: str = body) -> None:
                    results[body] = await system.ask("s", body)

                nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        stats = await quiescent(system)
    assert results == {"a": "a", "b": "b", "c": "c"}
    assert attempts == {"hold": [1], "a": [1, 2], "b": [1, 2], "c": [1, 2]}
    assert stats.failed_attempts == 3


@pytest.mark.parametrize(
    ("returned", "error", "words"),
    [
        ([], ValueError, "returned 0 values for a batch of 1"),
        ([1, 2], ValueError, "returned 2 values for a batch of 1"),
        ((1,), TypeError, "got tuple"),
        ("x", TypeError, "got str"),
    ],
)
async def test_a_wrong_return_fails_the_batch_and_ask_says_why(
    db_path: str, autojump_clock: object, returned: Any, error: type[Exception], words: str
) -> None:
    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> Any:
        return returned

    async with actors.run_system(db_path, handler=handle, **fast_options(max_attempts=2)) as system:
        with pytest.raises(error, match=words):
            await system.ask("s", 1)
        stats = await quiescent(system)
    assert stats.dead_lettered == 1 and stats.processed == 0


async def test_subscribers_get_each_value_that_is_not_none_in_order(
    db_path: str, autojump_clock: object
) -> None:
    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> list[Any]:
        return [m.body if m.body % 2 else None for m in msgs]

    async with actors.run_system(db_path, handler=handle) as system:
        subscription = system.subscribe("s", buffer=64)
        await system.send_many([("s", i) for i in range(8)])
        await quiescent(system)
        assert drain_nowait(subscription) == [1, 3, 5, 7]


async def test_the_keys_of_a_batch_are_marked_processed_with_its_ack(
    db_path: str, autojump_clock: object
) -> None:
    held = Held()
    async with actors.run_system(db_path, handler=held.handle) as system:
        await system.send("s", "hold")
        await held.entered.wait()
        ids = await system.send_many([("s", i, f"k{i}") for i in range(3)])
        held.release.set()
        await quiescent(system)
        found = query(
            db_path, "SELECT key, message_id, done_at FROM keys WHERE session_id = 's' ORDER BY key"
        )
        assert [(k, i) for k, i, _ in found] == [("k0", ids[0]), ("k1", ids[1]), ("k2", ids[2])]
        assert all(done_at is not None for _, _, done_at in found)
        # Processed: a duplicate send is still refused, and nothing runs again.
        assert await system.send("s", "again", key="k1") == ids[1]
        await quiescent(system)
    assert held.bodies("s") == [["hold"], [0, 1, 2]]


@pytest.mark.sqlite_only
def test_process_death_mid_batch_counts_the_attempt_of_every_message(tmp_path: Path) -> None:
    """A separate process dies (os._exit) inside a batch; the next start
    redelivers each message of it with attempt 2, one at a time."""
    db = str(tmp_path / "actors.db")
    child = textwrap.dedent(
        """
        import os, sys, trio, actors

        @actors.batched
        async def handle(ctx, msgs):
            if len(msgs) > 1:
                os._exit(3)

        async def main():
            async with actors.run_system(sys.argv[1], handler=handle) as system:
                await system.send_many([("s", i) for i in range(5)])
                await trio.Event().wait()  # until the handler ends the process

        trio.run(main)
        """
    )
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", child, db], env=env, timeout=120, capture_output=True
    )
    assert done.returncode == 3, done.stderr.decode()

    held = Held()

    async def again() -> actors.SystemStatistics:
        async with actors.run_system(db, handler=held.handle) as system:
            return await quiescent(system)

    stats = trio.run(again)
    assert held.calls == [("s", [(i, 2)]) for i in range(5)]
    assert stats.processed == 5 and stats.dead == 0


async def test_a_hard_stop_mid_batch_gives_every_message_back_with_its_attempt_counted(
    db_path: str, autojump_clock: object
) -> None:
    entered = trio.Event()
    calls: list[list[tuple[Any, int]]] = []

    @actors.batched
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
        calls.append([(m.body, m.attempt) for m in msgs])
        if len(msgs) > 1:
            entered.set()
            await trio.sleep_forever()  # until the stop cancels it

    async with actors.run_system(db_path, handler=handle, shutdown_timeout=1) as system:
        await system.send_many([("s", i) for i in range(3)])
        await entered.wait()
    assert query(db_path, "SELECT state, attempts FROM messages ORDER BY id") == [(0, 1)] * 3
    async with actors.run_system(db_path, handler=handle) as system:
        await quiescent(system)
    assert calls == [[(0, 1), (1, 1), (2, 1)]] + [[(i, 2)] for i in range(3)]


class TestArguments:
    @pytest.mark.parametrize("size", [0, -1])
    def test_max_size_below_one_is_refused(self, size: int) -> None:
        with pytest.raises(ValueError, match="max_size must be at least 1"):
            actors.batched(max_size=size)

    @pytest.mark.parametrize("size", ["3", 2.0, True, None])
    def test_max_size_not_an_int_is_refused(self, size: Any) -> None:
        with pytest.raises(TypeError, match="max_size must be an int"):
            actors.batched(max_size=size)

    def test_a_function_that_is_not_async_is_refused(self) -> None:
        def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
            pass

        with pytest.raises(TypeError, match="marks an async function"):
            actors.batched(handle)
        with pytest.raises(TypeError, match="marks an async function"):
            actors.batched(max_size=3)(handle)

    async def test_a_batched_function_of_the_wrong_signature_is_refused(
        self, tmp_path: Path
    ) -> None:
        @actors.batched
        async def handle(ctx: actors.Context) -> None:
            pass

        with pytest.raises(TypeError, match=r"batched handler .* must take \(ctx, msgs\)"):
            async with actors.run_system(str(tmp_path / "a.db"), handler=handle):
                pass
        assert not (tmp_path / "a.db").exists()

    @pytest.mark.parametrize("shape", ["sync", "batched handle", "neither"])
    async def test_an_actor_class_with_a_bad_batch_method_is_refused(
        self, tmp_path: Path, shape: str
    ) -> None:
        if shape == "sync":

            class Bad(actors.Actor):
                def handle_batch(self, ctx: actors.Context, msgs: list[actors.Message]) -> None:  # type: ignore[override]
                    pass

            words = r"handle_batch must be an async method"
        elif shape == "batched handle":

            class Bad(actors.Actor):  # type: ignore[no-redef]
                @actors.batched
                async def handle(self, ctx: actors.Context, msgs: list[actors.Message]) -> None:  # type: ignore[override]
                    pass

            words = "name the method handle_batch"
        else:

            class Bad(actors.Actor):  # type: ignore[no-redef]
                pass

            words = r"must define handle\(self, ctx, msg\) \(or handle_batch"
        with pytest.raises(TypeError, match=words):
            async with actors.run_system(str(tmp_path / "a.db"), handler=Bad):
                pass

    def test_the_testing_wrappers_refuse_a_batched_handler(self) -> None:
        @actors.batched
        async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
            pass

        class Batcher(actors.Actor):
            async def handle_batch(self, ctx: actors.Context, msgs: list[actors.Message]) -> None:
                pass

        for handler in (handle, Batcher):
            with pytest.raises(TypeError, match="batched handler cannot be intercepted"):
                actors.testing.flaky(handler, rate=0.5, seed=1)

    def test_a_bound_method_is_marked_through_a_function(self) -> None:
        class Handlers:
            async def handle(self, ctx: actors.Context, msgs: list[actors.Message]) -> None:
                pass

        method = Handlers().handle
        marked = actors.batched(max_size=7)(method)
        assert marked is not method and marked.__wrapped__ == method  # type: ignore[attr-defined]


# -- a model: whatever fails, every message is processed once or dead-lettered --


@pytest.mark.sqlite_only
@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    bodies=st.lists(st.integers(0, 9), min_size=1, max_size=30),
    poison=st.sets(st.integers(0, 9), max_size=3),
    max_size=st.integers(1, 8),
    sessions=st.integers(1, 3),
)
def test_model_poison_is_isolated_and_everything_else_runs_once_in_order(
    tmp_path_factory: pytest.TempPathFactory,
    bodies: list[int],
    poison: set[int],
    max_size: int,
    sessions: int,
) -> None:
    db = str(tmp_path_factory.mktemp("model") / "actors.db")
    items = [(f"s{i % sessions}", [i, b]) for i, b in enumerate(bodies)]
    succeeded: list[tuple[str, int]] = []
    sizes: list[int] = []

    @actors.batched(max_size=max_size)
    async def handle(ctx: actors.Context, msgs: list[actors.Message]) -> None:
        sizes.append(len(msgs))
        if any(m.body[1] in poison for m in msgs):
            raise Boom("poison")
        succeeded.extend((ctx.session_id, m.body[0]) for m in msgs)

    async def run() -> list[actors.DeadLetter]:
        async with actors.run_system(db, handler=handle, **fast_options(max_attempts=2)) as system:
            await system.send_many(items)
            await quiescent(system)
            return system.dead_letters()

    dead = trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    expected_dead = sorted(i for i, b in enumerate(bodies) if b in poison)
    assert sorted(d.body[0] for d in dead) == expected_dead
    for session in {s for s, _ in items}:
        mine = [i for s, i in succeeded if s == session]
        wanted = [i for i, (s, b) in enumerate(items) if s == session and b[1] not in poison]
        assert mine == wanted  # each once, in send order
    assert max(sizes) <= max_size
