"""send(): validation at the boundary, ids, durability before return."""

from __future__ import annotations

import math

import pytest
import trio
from dbrows import query

import actors


@pytest.fixture
def db_path(store: str) -> str:
    """Each test of this module runs on SQLite and on PostgreSQL (conftest.store)."""
    return store


async def noop(ctx: actors.Context, msg: actors.Message) -> None:
    pass


def count_rows(db_path: str) -> int:
    return int(query(db_path, "SELECT count(*) FROM messages")[0][0])


class Unencodable:
    pass


BAD_BODIES = [
    (Unencodable(), TypeError),
    ({"a": {1, 2}}, TypeError),
    (math.nan, TypeError),
    ({"x": math.inf}, TypeError),
    ("\ud800", TypeError),
]


@pytest.mark.parametrize(("body", "error"), BAD_BODIES)
async def test_unencodable_body_raises_type_error_and_persists_nothing(
    db_path: str, body: object, error: type[Exception]
) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        with pytest.raises(error):
            await system.send("s", body)
        assert system.statistics().sends == 0
    assert count_rows(db_path) == 0


async def test_cyclic_body_raises_type_error(db_path: str) -> None:
    cyclic: list[object] = []
    cyclic.append(cyclic)
    async with actors.run_system(db_path, handler=noop) as system:
        with pytest.raises(TypeError):
            await system.send("s", cyclic)
    assert count_rows(db_path) == 0


@pytest.mark.parametrize(
    ("session_id", "error"),
    [
        (42, TypeError),
        (None, TypeError),
        (b"bytes", TypeError),
        ("", ValueError),
        ("x" * 257, ValueError),
        ("x" * 10_000, ValueError),
        ("a\x00b", ValueError),
        ("\udc80", ValueError),
    ],
)
async def test_bad_session_id(db_path: str, session_id: object, error: type[Exception]) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        with pytest.raises(error):
            await system.send(session_id, "body")  # type: ignore[arg-type]
    assert count_rows(db_path) == 0


async def test_session_id_of_256_characters_is_accepted(db_path: str) -> None:
    seen: list[str] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(ctx.session_id)

    async with actors.run_system(db_path, handler=handler) as system:
        await system.send("é" * 256, 1)
        await system.drain()
    assert seen == ["é" * 256]


async def test_body_over_max_message_bytes(db_path: str) -> None:
    async with actors.run_system(db_path, handler=noop, max_message_bytes=100) as system:
        with pytest.raises(ValueError, match="max_message_bytes"):
            await system.send("s", "x" * 200)
        # Multi-byte text is measured in encoded bytes, not characters.
        with pytest.raises(actors.MessageTooLargeError):
            await system.send("s", "é" * 60)
        with pytest.raises(ValueError):
            await system.send("s", b"\x00" * 101)
        await system.send("s", b"\x00" * 100)
        await system.drain()
        assert system.statistics().processed == 1


async def test_default_limit_is_one_mebibyte(db_path: str) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        await system.send("s", b"x" * (1 << 20))
        with pytest.raises(actors.MessageTooLargeError):
            await system.send("s", b"x" * ((1 << 20) + 1))
        await system.drain()


@pytest.mark.parametrize("delay", [-1, math.inf, math.nan])
async def test_bad_delay(db_path: str, delay: float) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        with pytest.raises(ValueError):
            await system.send("s", 1, delay=delay)
        with pytest.raises(TypeError):
            await system.send("s", 1, delay="soon")  # type: ignore[arg-type]
    assert count_rows(db_path) == 0


async def test_bodies_round_trip_as_json_or_bytes(db_path: str) -> None:
    bodies: list[object] = [
        None,
        True,
        3,
        2.5,
        "text ✓",
        [1, "two", None],
        {"nested": {"list": [1, 2], "s": "é"}},
        b"\x00\xffraw",
    ]
    received: list[object] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        received.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        for body in bodies:
            await system.send("s", body)
        await system.send("s", (1, 2))  # a tuple arrives as a list
        await system.send("s", bytearray(b"ba"))
        await system.drain()
    assert received == [*bodies, [1, 2], b"ba"]


async def test_ids_increase_in_send_order_and_message_is_durable_on_return(
    db_path: str,
) -> None:
    gate = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await gate.wait()

    async with actors.run_system(db_path, handler=handler) as system:
        ids = [await system.send(f"s{i % 4}", i) for i in range(20)]
        assert ids == sorted(ids)
        assert len(set(ids)) == 20
        # Durable on return: another connection sees every row already.
        assert count_rows(db_path) == 20
        gate.set()
        await system.drain()
    assert count_rows(db_path) == 0  # processed messages leave no rows


async def test_send_many_is_one_transaction_and_validates_all_first(db_path: str) -> None:
    seen: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(TypeError, match="item 2"):
            await system.send_many([("a", 1), ("b", 2), ("c", object())])
        assert count_rows(db_path) == 0
        before = system.statistics().commits
        ids = await system.send_many([(f"s{i % 3}", i) for i in range(300)])
        assert ids == list(range(ids[0], ids[0] + 300))
        assert system.statistics().commits - before <= 2
        assert await system.send_many([]) == []
        await system.drain()
    assert sorted(seen) == list(range(300))


async def test_send_on_closed_system_raises_at_once(db_path: str) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        pass
    assert system.closed
    with pytest.raises(actors.SystemClosedError):
        await system.send("s", 1)
    with pytest.raises(trio.ClosedResourceError):
        await system.send_many([("s", 1)])
    with pytest.raises(actors.SystemClosedError):
        await system.retry_dead()
    assert count_rows(db_path) == 0


async def test_concurrent_sends_share_commits(db_path: str) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        ids: list[int] = []

        async def sender(i: int) -> None:
            ids.append(await system.send(f"s{i % 10}", i))

        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(sender, i)
        await system.drain()
        stats = system.statistics()
        assert stats.sends == 500
        assert stats.processed == 500
        assert len(set(ids)) == 500
        # Group commit: far fewer batches than sends.
        assert system._router.batches < 50


async def test_a_cancelled_sender_stops_waiting_and_the_others_are_answered(db_path: str) -> None:
    seen: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=handler) as system:
        ids: list[int] = []
        async with trio.open_nursery() as nursery:

            async def sender(i: int) -> None:
                ids.append(await system.send("s", i))

            for i in range(10):
                nursery.start_soon(sender, i)
            with trio.CancelScope() as scope:
                scope.cancel()  # cancelled before its batch commits
                await system.send("s", 99)
        assert scope.cancelled_caught
        assert len(ids) == 10
        await system.drain()
    # The cancelled send may or may not have been persisted; the others were.
    assert sorted(b for b in seen if b != 99) == list(range(10))
    assert seen.count(99) <= 1


async def test_send_many_with_keys_dedups_against_the_database_and_within_the_call(
    db_path: str,
) -> None:
    seen: list[object] = []

    async def record(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=record) as system:
        first = await system.send("s", "a", key="k-a")
        ids = await system.send_many(
            [("s", "a again", "k-a"), ("s", "b", "k-b"), ("s", "b again", "k-b"), ("t", "c")]
        )
        assert ids[0] == first  # the key was sent before
        assert ids[2] == ids[1]  # the same key twice in one call
        assert len({first, ids[1], ids[3]}) == 3
        await system.drain()
        assert system._router.statistics().duplicates == 2
    assert sorted(map(str, seen)) == ["a", "b", "c"]
    assert count_rows(db_path) == 0


@pytest.mark.parametrize(
    ("item", "error"),
    [
        (("s", 1, 2), TypeError),  # a key that is not a str
        (("s", 1, ""), ValueError),
        (("s", 1, "k", "extra"), ValueError),
    ],
)
async def test_send_many_rejects_bad_keys_and_persists_nothing(
    db_path: str, item: tuple[object, ...], error: type[Exception]
) -> None:
    async with actors.run_system(db_path, handler=noop) as system:
        with pytest.raises(error, match="item 1"):
            await system.send_many([("s", 0), item])  # type: ignore[list-item]
    assert count_rows(db_path) == 0


@pytest.mark.sqlite_only  # (it holds the SQLite file's write lock)
async def test_drain_waits_for_a_send_whose_batch_is_still_committing(db_path: str) -> None:
    import trio.testing
    from dblock import WriteLock

    seen: list[object] = []

    async def record(ctx: actors.Context, msg: actors.Message) -> None:
        seen.append(msg.body)

    async with actors.run_system(db_path, handler=record) as system:
        drained = trio.Event()

        async def drain() -> None:
            await system.drain()
            drained.set()

        # Another connection holds the write lock: the batch cannot commit yet.
        with WriteLock(db_path) as lock:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(system.send, "s", "in flight")
                await trio.testing.wait_all_tasks_blocked()  # its batch is committing
                nursery.start_soon(drain)
                await trio.testing.wait_all_tasks_blocked()
                assert not drained.is_set()  # the send is not durable yet: not drained
                lock.release()
        assert drained.is_set()
        assert seen == ["in flight"]  # drain returned only after it was processed
