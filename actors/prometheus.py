"""Prometheus metrics for a running system (the ``prometheus`` extra).

Install with ``pip install 'actors[prometheus]'``, then, inside the
``async with run_system(...)`` block::

    with actors.prometheus.instrument(system) as metrics:
        ...  # every scrape of the registry reads the system's counts

:func:`instrument` registers one collector on a
``prometheus_client.CollectorRegistry`` (the default one unless you pass
another). There is no background task: the gauges and counters are read
from :meth:`actors.System.statistics` at scrape time, and the two
histograms are filled by a handler observer
(:meth:`actors.System.add_handler_observer`), called after each successful
handler call. With ``namespace="actors"`` (the default) a scrape exposes:

=========================================  =========  ===================================
metric                                     type       from
=========================================  =========  ===================================
``actors_pending_messages``                gauge      ``statistics().pending``
``actors_in_flight_messages``              gauge      ``statistics().in_flight``
``actors_dead_letters``                    gauge      ``statistics().dead``
``actors_active_actors``                   gauge      ``statistics().active_actors``
``actors_waiting_sessions``                gauge      ``statistics().waiting_sessions``
``actors_processed_messages_total``        counter    ``statistics().processed``
``actors_failed_attempts_total``           counter    ``statistics().failed_attempts``
``actors_dead_lettered_messages_total``    counter    ``statistics().dead_lettered``
``actors_restarts_total``                  counter    ``statistics().restarts``
``actors_sent_messages_total``             counter    ``statistics().sends``
``actors_commits_total``                   counter    ``statistics().commits``
``actors_handler_duration_seconds``        histogram  how long each successful handler call ran
``actors_message_latency_seconds``         histogram  from ``send()`` to the end of the
                                                      successful handler call
=========================================  =========  ===================================

Counters count since the system started (a new ``run_system`` starts them
at zero again, which Prometheus's ``rate()`` treats as a counter reset).
The latency runs from the message's original send time
(``Message.enqueued_at``), so it includes delays, retries and, for a
message recovered after a crash, the downtime.

Importing this module raises ``ImportError`` if ``prometheus-client`` is
not installed.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import attrs

try:
    import prometheus_client
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.utils import floatToGoString
except ImportError as exc:
    raise ImportError(
        "actors.prometheus needs the prometheus-client package: "
        "install the extra with pip install 'actors[prometheus]'"
    ) from exc

from ._records import Message, SystemStatistics

if TYPE_CHECKING:
    from ._system import System

__all__ = ["DEFAULT_BUCKETS", "Metrics", "MetricsStatistics", "instrument"]

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Upper bounds (seconds) of the histograms' buckets, 1 ms to 5 minutes.

``+Inf`` is always added. The top bound is the default ``handler_timeout``.
"""

# (name after the namespace, SystemStatistics field, help text)
_GAUGES = (
    ("pending_messages", "pending", "Messages waiting, delayed and retry-waiting ones included."),
    ("in_flight_messages", "in_flight", "Messages a handler is running right now."),
    ("dead_letters", "dead", "Dead letters in the database."),
    ("active_actors", "active_actors", "Session actors alive now (running, idle or restarting)."),
    (
        "waiting_sessions",
        "waiting_sessions",
        "Sessions with work queued in memory for an actor slot (a lower bound).",
    ),
)
_COUNTERS = (
    ("processed_messages", "processed", "Messages acknowledged since the system started."),
    (
        "failed_attempts",
        "failed_attempts",
        "Handler attempts that failed (exception, timeout, kill).",
    ),
    ("dead_lettered_messages", "dead_lettered", "Messages moved to dead letters since start."),
    ("restarts", "restarts", "Session actor restarts since start."),
    ("sent_messages", "sends", "Messages accepted by send() and send_many() since start."),
    ("commits", "commits", "Store transactions committed since start."),
)
_HANDLER_HELP = "Seconds each successful handler call ran."
_LATENCY_HELP = "Seconds from send() to the end of the successful handler call."

_NAMESPACE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")

_go_float: Callable[[float], str] = floatToGoString  # untyped in prometheus_client


@attrs.frozen
class MetricsStatistics:
    """One :class:`Metrics` right now.

    Attributes:
      observed: successful handler calls recorded in the histograms.
      scrapes: times the registry collected these metrics.
      closed: whether :meth:`Metrics.close` ran.
    """

    observed: int
    scrapes: int
    closed: bool


class _Histogram:
    """Bucket counts and a sum, filled on the trio thread without a lock.

    ``counts[i]`` counts observations in ``(bounds[i-1], bounds[i]]``; the
    last one those above every bound. A scrape from another thread copies
    ``counts`` in one step (``list(...)`` holds the GIL), so the buckets it
    reports are consistent; the sum may be one observation apart.
    """

    __slots__ = ("counts", "sum")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.sum = 0.0

    def family(self, name: str, doc: str, labels: Sequence[str]) -> HistogramMetricFamily:
        counts = list(self.counts)
        total = self.sum
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for label, count in zip(labels, counts, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class Metrics:
    """The Prometheus collector of one system; :func:`instrument` makes it.

    It is registered on :attr:`registry` and records handler durations
    until :meth:`close` (or the end of its ``with`` block). ``collect()``
    only reads counters kept in memory, so a scrape may run in another
    thread, such as ``prometheus_client.start_http_server``'s.

    Attributes:
      system: the instrumented :class:`actors.System`.
      registry: the ``CollectorRegistry`` it is registered on.
      namespace: the prefix of every metric name.
      buckets: the histograms' upper bounds in seconds, ``+Inf`` excluded.
    """

    def __init__(
        self,
        system: System,
        registry: prometheus_client.CollectorRegistry,
        namespace: str,
        buckets: tuple[float, ...],
    ) -> None:
        self.system = system
        self.registry = registry
        self.namespace = namespace
        self.buckets = buckets
        self._labels = [_go_float(b) for b in buckets] + ["+Inf"]
        self._handler = _Histogram(len(buckets) + 1)
        self._latency = _Histogram(len(buckets) + 1)
        self._scrapes = 0
        self._closed = False
        registry.register(self)  # raises before anything is installed
        self._remove = system.add_handler_observer(self._observer())

    # -- the collector protocol of prometheus_client ----------------------

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (the registry checks names with it)."""
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        """Every metric family with its current samples (called at each scrape)."""
        self._scrapes += 1
        yield from self._families(self.system.statistics())

    def _families(self, stats: SystemStatistics | None) -> Iterator[Metric]:
        ns = self.namespace
        for name, field, doc in _GAUGES:
            value = None if stats is None else getattr(stats, field)
            yield GaugeMetricFamily(f"{ns}_{name}", doc, value=value)
        for name, field, doc in _COUNTERS:
            value = None if stats is None else getattr(stats, field)
            yield CounterMetricFamily(f"{ns}_{name}", doc, value=value)
        handler_name = f"{ns}_handler_duration_seconds"
        latency_name = f"{ns}_message_latency_seconds"
        if stats is None:
            yield HistogramMetricFamily(handler_name, _HANDLER_HELP)
            yield HistogramMetricFamily(latency_name, _LATENCY_HELP)
        else:
            yield self._handler.family(handler_name, _HANDLER_HELP, self._labels)
            yield self._latency.family(latency_name, _LATENCY_HELP, self._labels)

    # -- recording -------------------------------------------------------

    def _observer(self) -> Callable[[Message, float], None]:
        bounds = self.buckets
        handler = self._handler
        latency = self._latency
        handler_counts = handler.counts
        latency_counts = latency.counts
        now = self.system.now  # the clock that stamped enqueued_at (MockClock in tests)
        find = bisect.bisect_left  # first bound >= value: Prometheus's "le"

        # Runs once per message on the trio thread: a few list and float
        # updates, no lock (cheaper than prometheus_client's Histogram,
        # which locks per observation).
        def observe(msg: Message, seconds: float) -> None:
            handler_counts[find(bounds, seconds)] += 1
            handler.sum += seconds
            waited = now() - msg.enqueued_at
            if waited < 0.0:  # the wall clock went back since the send
                waited = 0.0
            latency_counts[find(bounds, waited)] += 1
            latency.sum += waited

        return observe

    def statistics(self) -> MetricsStatistics:
        """Messages observed, scrapes, and whether it is closed."""
        return MetricsStatistics(
            observed=sum(self._handler.counts),
            scrapes=self._scrapes,
            closed=self._closed,
        )

    def close(self) -> None:
        """Unregister from the registry and stop recording (idempotent).

        Only this collector's handler observer is removed: other observers
        of the system, added before or after, stay.
        """
        if self._closed:
            return
        self._closed = True
        self._remove()
        with contextlib.suppress(KeyError):  # someone unregistered it already
            self.registry.unregister(self)

    def __enter__(self) -> Metrics:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def instrument(
    system: System,
    *,
    registry: prometheus_client.CollectorRegistry | None = None,
    namespace: str = "actors",
    buckets: Sequence[float] = DEFAULT_BUCKETS,
) -> Metrics:
    """Expose ``system``'s metrics on ``registry``; returns the collector.

    ``registry`` defaults to ``prometheus_client.REGISTRY``, the one that
    ``start_http_server`` and ``generate_latest()`` serve. ``namespace``
    prefixes every metric name (``actors_pending_messages``); give each
    system in one registry its own. ``buckets`` are the histograms' upper
    bounds in seconds, increasing (``+Inf`` is added).

    From now on every successful handler call is recorded in the two
    histograms, through a handler observer of the system
    (:meth:`actors.System.add_handler_observer`; other observers are not
    disturbed). Call :meth:`Metrics.close` (or use the result as a context
    manager) to unregister and remove it.

    Raises:
      ValueError: ``namespace`` is not a valid metric name prefix;
        ``buckets`` is empty, not increasing, or holds a value that is not
        a finite number > 0; the registry already has metrics of these
        names (another system with the same namespace).
    """
    if not isinstance(namespace, str) or not _NAMESPACE.match(namespace):
        raise ValueError(f"namespace must match [a-zA-Z_:][a-zA-Z0-9_:]*, got {namespace!r}")
    bounds = tuple(buckets)
    if not bounds:
        raise ValueError("buckets must hold at least one bound")
    for bound in bounds:
        if (
            isinstance(bound, bool)
            or not isinstance(bound, int | float)
            or not math.isfinite(bound)
            or bound <= 0
        ):
            raise ValueError(f"buckets must be finite numbers of seconds > 0, got {bound!r}")
    if any(a >= b for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"buckets must increase, got {bounds!r}")
    return Metrics(
        system,
        prometheus_client.REGISTRY if registry is None else registry,
        namespace,
        tuple(float(b) for b in bounds),
    )
