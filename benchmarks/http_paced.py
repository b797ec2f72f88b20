"""An open-loop, paced HTTP client for ``python -m benchmarks.http``'s latency figure.

``wrk`` sends as fast as answers come back (closed loop), so its latency
at full load is queueing, and it cannot offer a set rate. This client
offers ``rate`` requests per second over ``connections`` keep-alive
connections, each connection with its own schedule (request ``i`` goes on
connection ``i % connections`` at ``start + i / rate``, as wrk2 paces),
and times each request from its *scheduled* time to the end of its answer:
a request that waits behind a slow answer on its connection counts that
wait (no coordinated omission).

HTTP/1.1 with h11 on trio's sockets: httpx costs several times more CPU
per request, and the client shares a 2-core machine with the server. It
measures its own lag too: how late a request went out after the moment it
could have (its schedule, or its connection's previous answer if that came
later). A client that cannot keep up shows as a lag, a CPU share near 100%
and fewer requests sent than offered; the harness then reports the figure
as unsure rather than as the server's.
"""

from __future__ import annotations

import time
from typing import Any

import h11
import trio


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of ``values`` (q in 0..100), or None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


class _Results:
    def __init__(self, measured_from: float) -> None:
        self.measured_from = measured_from
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.statuses: dict[int, int] = {}
        self.errors = 0

    def add(self, due: float, lag: float, done: float, status: int) -> None:
        if due < self.measured_from:
            return  # the warm-up's
        self.latencies.append(done - due)
        self.lags.append(lag)
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def _connection(
    host: str,
    port: int,
    first: int,
    count: int,
    step: int,
    start: float,
    interval: float,
    request: Any,
    results: _Results,
) -> None:
    stream = await trio.open_tcp_stream(host, port)
    conn = h11.Connection(h11.CLIENT)
    free_at = start
    async with stream:
        for i in range(first, count, step):
            due = start + i * interval
            await trio.sleep_until(due)
            sent = trio.current_time()
            await stream.send_all(request(i, conn))
            status = 0
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        results.errors += 1
                        return
                    conn.receive_data(data)
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    break
            done = trio.current_time()
            results.add(due, sent - max(due, free_at), done, status)
            free_at = done
            conn.start_next_cycle()


def _requests(host: str, port: int, token: str, sessions: int, body: bytes) -> Any:
    headers = [
        ("Host", f"{host}:{port}"),
        ("Authorization", f"Bearer {token}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
    ]

    def request(i: int, conn: h11.Connection) -> bytes:
        target = f"/v1/sessions/s{i % sessions}/messages"
        head = conn.send(h11.Request(method="POST", target=target, headers=headers))
        return b"".join(
            (
                head or b"",
                conn.send(h11.Data(data=body)) or b"",
                conn.send(h11.EndOfMessage()) or b"",
            )
        )

    return request


async def paced(
    url: str,
    token: str,
    *,
    rate: float,
    seconds: float,
    warmup: float,
    connections: int,
    sessions: int,
    body: bytes,
) -> dict[str, Any]:
    """Offer ``rate`` req/s for ``warmup + seconds``; figures of the last ``seconds``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    count = int(rate * (warmup + seconds))
    interval = 1.0 / rate
    start = trio.current_time() + 0.2  # every connection opened before the first is due
    results = _Results(start + warmup)
    request = _requests(host, int(port), token, sessions, body)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for c in range(connections):
            nursery.start_soon(
                _connection,
                host,
                int(port),
                c,
                count,
                connections,
                start,
                interval,
                request,
                results,
            )
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    offered = sum(1 for i in range(count) if start + i * interval >= results.measured_from)
    return summarize(results, rate, seconds, offered, cpu / wall if wall else 0.0)


def summarize(
    results: _Results, rate: float, seconds: float, offered: int, cpu_share: float
) -> dict[str, Any]:
    ms = [x * 1e3 for x in results.latencies]
    lags = [x * 1e3 for x in results.lags]
    answered = len(ms)
    lag_p99 = _percentile(lags, 99)
    saturated = (
        answered < 0.98 * offered or (lag_p99 is not None and lag_p99 > 2.0) or cpu_share > 0.9
    )
    return {
        "rate_offered": rate,
        "seconds": seconds,
        "requests_offered": offered,
        "requests_answered": answered,
        "statuses": {str(k): v for k, v in sorted(results.statuses.items())},
        "errors": results.errors,
        "p50_ms": _percentile(ms, 50),
        "p90_ms": _percentile(ms, 90),
        "p99_ms": _percentile(ms, 99),
        "max_ms": max(ms) if ms else None,
        "client_lag_p99_ms": lag_p99,
        "client_cpu_share": cpu_share,
        "client_saturated": saturated,
    }


def run(url: str, token: str, **options: Any) -> dict[str, Any]:
    """:func:`paced` in a trio loop of its own (the harness is otherwise synchronous)."""
    result: dict[str, Any] = trio.run(lambda: paced(url, token, **options))
    return result
