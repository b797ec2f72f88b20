"""actors.prometheus: what a scrape reports agrees with what the system did."""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any

import prometheus_client
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import actors
import actors.prometheus

FAST: dict[str, Any] = {
    "retry_backoff": actors.Backoff(initial=0.01, jitter=0.0),
    "restart_policy": actors.RestartPolicy(backoff=actors.Backoff(initial=0.01, jitter=0.0)),
}

# metric name -> the SystemStatistics field it reports
GAUGES = {
    "actors_pending_messages": "pending",
    "actors_in_flight_messages": "in_flight",
    "actors_dead_letters": "dead",
    "actors_active_actors": "active_actors",
    "actors_waiting_sessions": "waiting_sessions",
}
COUNTERS = {
    "actors_processed_messages_total": "processed",
    "actors_failed_attempts_total": "failed_attempts",
    "actors_dead_lettered_messages_total": "dead_lettered",
    "actors_restarts_total": "restarts",
    "actors_sent_messages_total": "sends",
    "actors_commits_total": "commits",
}
HANDLER = "actors_handler_duration_seconds"
LATENCY = "actors_message_latency_seconds"


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample of the text exposition, as ``name`` or ``name{le="..."}``."""
    text = generate_latest(registry).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "le" in sample.labels:
                key += f'{{le="{sample.labels["le"]}"}}'
            samples[key] = sample.value
    return samples


def assert_matches(samples: dict[str, float], stats: actors.SystemStatistics) -> None:
    for name, field in {**GAUGES, **COUNTERS}.items():
        assert samples[name] == getattr(stats, field), name


async def test_a_scrape_reports_the_statistics_and_the_histograms(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        if msg.body.get("fail") == "always" or (
            msg.body.get("fail") == "once" and msg.attempt == 1
        ):
            raise RuntimeError("downstream is down")
        await trio.sleep(msg.body["work"])

    registry = CollectorRegistry()
    async with actors.run_system(db_path, handler=handler, max_attempts=2, **FAST) as system:
        metrics = actors.prometheus.instrument(system, registry=registry)
        for n in range(10):
            await system.send(f"s{n % 2}", {"work": 0.02})
        await system.send("quick", {"work": 0})
        await system.send("flaky", {"work": 0.02, "fail": "once"})
        await system.send("poison", {"work": 0, "fail": "always"})
        await system.send("later", {"work": 0.02}, delay=5)
        await system.drain()
        stats = system.statistics()
        samples = scrape(registry)

    # The counts are the system's, and they are what happened.
    assert_matches(samples, stats)
    assert (stats.sends, stats.processed, stats.pending, stats.in_flight) == (14, 13, 0, 0)
    assert (stats.failed_attempts, stats.restarts) == (3, 3)  # flaky once, poison twice
    assert (stats.dead, stats.dead_lettered) == (1, 1)
    assert stats.commits > 0

    # One observation per processed message, in the right buckets.
    assert samples[f"{HANDLER}_count"] == samples[f"{LATENCY}_count"] == 13
    assert samples[f'{HANDLER}_bucket{{le="+Inf"}}'] == 13
    assert samples[f'{HANDLER}_bucket{{le="0.001"}}'] == 1  # "quick" did no work
    assert samples[f'{HANDLER}_bucket{{le="0.01"}}'] == 1
    assert samples[f'{HANDLER}_bucket{{le="0.025"}}'] == 13  # the others slept 0.02 s
    assert samples[f"{HANDLER}_sum"] == pytest.approx(12 * 0.02)
    # The delayed message waited 5 s from its send; everything else < 2.5 s.
    assert samples[f'{LATENCY}_bucket{{le="2.5"}}'] == 12
    assert samples[f'{LATENCY}_bucket{{le="5.0"}}'] == 12
    assert samples[f'{LATENCY}_bucket{{le="10.0"}}'] == 13
    assert samples[f"{LATENCY}_sum"] >= 5.02 + 11 * 0.02
    assert metrics.statistics() == actors.prometheus.MetricsStatistics(
        observed=13, scrapes=1, closed=False
    )


async def test_gauges_follow_a_busy_system(db_path: str, autojump_clock: object) -> None:
    release = trio.Event()
    running: set[str] = set()
    both = trio.Event()

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        running.add(ctx.session_id)
        if len(running) == 2:
            both.set()
        await release.wait()

    registry = CollectorRegistry()
    async with actors.run_system(db_path, handler=handler) as system:
        with actors.prometheus.instrument(system, registry=registry):
            for _ in range(3):
                await system.send("a", "x")
            await system.send("b", "x")
            await both.wait()
            busy = scrape(registry)
            assert_matches(busy, system.statistics())
            assert busy["actors_in_flight_messages"] == 2
            assert busy["actors_pending_messages"] == 2  # a's second and third
            assert busy["actors_active_actors"] == 2
            assert busy["actors_processed_messages_total"] == 0
            assert busy[f"{HANDLER}_count"] == 0

            release.set()
            await system.drain()
            done = scrape(registry)
            assert_matches(done, system.statistics())
            assert done["actors_in_flight_messages"] == done["actors_pending_messages"] == 0
            assert done["actors_processed_messages_total"] == done[f"{HANDLER}_count"] == 4


async def test_a_scrape_may_run_in_another_thread(db_path: str) -> None:
    # As prometheus_client.start_http_server's thread does.
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    registry = CollectorRegistry()
    async with actors.run_system(db_path, handler=handler) as system:
        with actors.prometheus.instrument(system, registry=registry):
            await system.send_many([("a", 1), ("b", 2)])
            await system.drain()
            text = await trio.to_thread.run_sync(generate_latest, registry)
    assert b"actors_processed_messages_total 2.0" in text


async def test_closing_removes_only_its_own_observer(db_path: str, autojump_clock: object) -> None:
    before: list[int] = []
    after: list[int] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    registry = CollectorRegistry()
    async with actors.run_system(db_path, handler=handler) as system:
        remove_before = system.add_handler_observer(lambda msg, _s: before.append(msg.id))
        metrics = actors.prometheus.instrument(system, registry=registry)
        remove_after = system.add_handler_observer(lambda msg, _s: after.append(msg.id))
        first = await system.send("a", 1)
        await system.drain()
        assert before == after == [first]
        assert metrics.statistics().observed == 1

        metrics.close()
        second = await system.send("a", 2)
        await system.drain()
        assert before == after == [first, second]  # theirs stay
        assert metrics.statistics() == actors.prometheus.MetricsStatistics(
            observed=1, scrapes=0, closed=True
        )
        # Unregistered: the registry has no actors metrics any more.
        assert "actors_" not in generate_latest(registry).decode()
        metrics.close()  # idempotent
        remove_before()
        remove_after()
        assert system._sup.observer is None  # nothing left to call per message


async def test_handler_observers_run_in_order_and_survive_their_errors(
    db_path: str, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[str, int, float]] = []

    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep(msg.body)
        if msg.body == 2:
            raise RuntimeError("not observed: the call failed")

    def first(msg: actors.Message, seconds: float) -> None:
        calls.append(("first", msg.id, seconds))

    def broken(msg: actors.Message, seconds: float) -> None:
        raise ValueError(f"observer bug on message {msg.id}")

    def last(msg: actors.Message, seconds: float) -> None:
        calls.append(("last", msg.id, seconds))

    async with actors.run_system(db_path, handler=handler, max_attempts=1) as system:
        with pytest.raises(TypeError, match="callable"):
            system.add_handler_observer("not a function")  # type: ignore[arg-type]
        assert system._sup.observer is None
        system.add_handler_observer(first)
        remove_broken = system.add_handler_observer(broken)
        remove_last = system.add_handler_observer(last)
        remove_twice = system.add_handler_observer(last)  # the same callable again: called twice
        ids = await system.send_many([("a", 1), ("a", 2), ("a", 0.5)])
        await system.drain()
        remove_twice()
        remove_twice()  # idempotent, and removes only the one it was returned for
        await system.send("a", 0)
        await system.drain()
        remove_broken()
        remove_last()

    one, _, three = ids
    assert [c[:2] for c in calls[:6]] == [
        ("first", one),
        ("last", one),
        ("last", one),
        ("first", three),
        ("last", three),
        ("last", three),
    ]
    assert calls[0][2] == 1.0 and calls[3][2] == 0.5  # seconds the handler ran (MockClock)
    assert [c[0] for c in calls[6:]] == ["first", "last"]
    # The broken observer raised three times, and was logged once.
    logged = [r for r in caplog.records if "handler observer" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None
    assert "observer bug on message" in str(logged[0].exc_info[1])


async def test_the_default_registry_and_a_second_namespace(
    db_path: str, autojump_clock: object
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    async with actors.run_system(db_path, handler=handler) as system:
        with actors.prometheus.instrument(system) as metrics:
            assert metrics.registry is prometheus_client.REGISTRY
            installed = system._sup.observer
            # The same names again in the same registry: refused, nothing installed.
            with pytest.raises(ValueError, match="Duplicated"):
                actors.prometheus.instrument(system)
            assert system._sup.observer is installed
            with actors.prometheus.instrument(system, namespace="app_queue") as other:
                await system.send("a", 1)
                await system.drain()
                text = generate_latest().decode()
                assert "\nactors_processed_messages_total 1.0\n" in text
                assert "\napp_queue_processed_messages_total 1.0\n" in text
                assert other.statistics().observed == metrics.statistics().observed == 1
        assert system._sup.observer is None
    assert "actors_processed_messages_total" not in generate_latest().decode()


async def test_custom_buckets(db_path: str, autojump_clock: object) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        await trio.sleep(msg.body)

    registry = CollectorRegistry()
    async with actors.run_system(db_path, handler=handler) as system:
        with actors.prometheus.instrument(system, registry=registry, buckets=[1, 2]) as metrics:
            assert metrics.buckets == (1.0, 2.0)
            await system.send_many([("a", 0.5), ("b", 1.5), ("c", 3)])
            await system.drain()
            samples = scrape(registry)
    buckets = {k: v for k, v in samples.items() if k.startswith(f"{HANDLER}_bucket")}
    assert buckets == {
        f'{HANDLER}_bucket{{le="1.0"}}': 1,
        f'{HANDLER}_bucket{{le="2.0"}}': 2,
        f'{HANDLER}_bucket{{le="+Inf"}}': 3,
    }


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"namespace": ""}, "namespace"),
        ({"namespace": "1st"}, "namespace"),
        ({"namespace": "my-app"}, "namespace"),
        ({"buckets": []}, "at least one"),
        ({"buckets": [0.5, 0.5]}, "increase"),
        ({"buckets": [2, 1]}, "increase"),
        ({"buckets": [0]}, "> 0"),
        ({"buckets": [math.inf]}, "> 0"),
        ({"buckets": [math.nan]}, "> 0"),
        ({"buckets": [True]}, "> 0"),
        ({"buckets": ["1"]}, "> 0"),
    ],
)
async def test_bad_arguments_are_refused_before_anything_is_installed(
    db_path: str, options: dict[str, object], match: str
) -> None:
    async def handler(ctx: actors.Context, msg: actors.Message) -> None:
        pass

    registry = CollectorRegistry()
    async with actors.run_system(db_path, handler=handler) as system:
        with pytest.raises(ValueError, match=match):
            actors.prometheus.instrument(system, registry=registry, **options)  # type: ignore[arg-type]
        assert system._sup.observer is None
    assert generate_latest(registry) == b""


def test_without_prometheus_client_the_import_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "actors.prometheus")
    with pytest.raises(ImportError, match=r"pip install 'actors\[prometheus\]'"):
        importlib.import_module("actors.prometheus")
