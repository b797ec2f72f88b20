"""The recorder of ``actors.testing``: every handler call, and the checks of the promises.

Re-exported by ``actors.testing``; see :class:`Recorder`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Literal, overload

import attrs
import trio

from ._context import Actor, Context
from ._intercept import A, Handler, Proceed, intercept
from ._records import DeadLetter, Message

Outcome = Literal["completed", "failed", "cancelled"]

MAX_LISTED = 10  # violations spelled out in one AssertionError; the rest are counted


@attrs.frozen
class HandlerEvent:
    """One entry of a :class:`Recorder`'s history: a handler call began or ended.

    Attributes:
      kind: ``"start"`` or ``"end"``.
      session_id, message_id, attempt: the message the call was for
        (``msg.session_id``, ``msg.id``, ``msg.attempt``).
      outcome: for an end, ``"completed"`` (returned normally),
        ``"failed"`` (raised) or ``"cancelled"`` (killed, timed out, or
        stopped with the system); None for a start.
      error: the exception of a failed call, else None.
      time: ``trio.current_time()`` when it happened (None outside trio).
    """

    kind: Literal["start", "end"]
    session_id: str
    message_id: int
    attempt: int
    outcome: Outcome | None = None
    error: BaseException | None = attrs.field(default=None, eq=False)
    time: float | None = None


@attrs.frozen
class RecorderStatistics:
    """Counts of a :class:`Recorder`'s history (``Recorder.statistics()``).

    Attributes:
      started: handler calls that began.
      completed, failed, cancelled: calls that ended each way.
      running: calls that began and have not ended.
      messages: distinct message ids started.
    """

    started: int
    completed: int
    failed: int
    cancelled: int
    running: int
    messages: int


@attrs.frozen
class Violations:
    """What a :class:`Recorder`'s checks found (``Recorder.violations()``).

    Each attribute lists the violations of one check, one sentence each,
    as the ``assert_*`` methods word them; empty when the check passed.

    Attributes:
      lost: acknowledged ids neither completed nor dead (``assert_no_loss``).
      out_of_order: starts out of send order (``assert_fifo``).
      overlapping: a session's calls that overlapped (``assert_one_at_a_time``).
      dishonest: attempt numbers that lied (``assert_honest_attempts``).

    ``str()`` of it is the text ``assert_all`` raises with ("" when ``ok``).
    """

    lost: tuple[str, ...] = ()
    out_of_order: tuple[str, ...] = ()
    overlapping: tuple[str, ...] = ()
    dishonest: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return not (self.lost or self.out_of_order or self.overlapping or self.dishonest)

    def __str__(self) -> str:
        checks = (
            ("no loss", self.lost),
            ("FIFO per session", self.out_of_order),
            ("one at a time per session", self.overlapping),
            ("honest attempts", self.dishonest),
        )
        return "\n".join(_describe(name, list(found)) for name, found in checks if found)


class Recorder:
    """Records every call of the handlers it wraps, and checks the runtime's promises.

    ``recorder.wrap(handler)`` returns the handler with every call recorded
    as a start and an end (:class:`HandlerEvent`), in the order they
    happened. Put the recorder outermost (``recorder.wrap(flaky(...))``) so
    that it sees every attempt, injected failures included. After the run,
    the ``assert_*`` methods check the history against the guarantees and
    raise :class:`AssertionError` naming each violation.

    ``record_start`` / ``record_end`` write the history by hand: that is
    what the wrapper calls, and how a test feeds the checks a history of its
    own. ``events`` is the history, oldest first (read it, don't change it).
    :meth:`violations` runs the checks without raising, for a report of
    your own; :meth:`attempts` gives each message's attempts as seen.
    """

    def __init__(self) -> None:
        self.events: list[HandlerEvent] = []
        # {(session_id, message_id, attempt): calls begun and not ended}
        self._open: Counter[tuple[str, int, int]] = Counter()
        self._counts: Counter[str] = Counter()  # "start" and each outcome
        self._changed: trio.Event | None = None  # set at the next event, for wait_until

    # -- writing the history -----------------------------------------------

    @overload
    def wrap(self, handler: type[A]) -> type[A]: ...
    @overload
    def wrap(self, handler: Handler) -> Handler: ...
    def wrap(self, handler: type[Actor] | Handler) -> type[Actor] | Handler:
        """``handler`` (either spelling) with every call recorded; see :func:`intercept`.

        Raises:
          TypeError: ``handler`` is not a handler ``run_system`` accepts.
        """
        return intercept(handler, self._middleware)

    async def _middleware(self, ctx: Context, msg: Message, proceed: Proceed) -> Any:
        self.record_start(msg.session_id, msg.id, msg.attempt)
        try:
            result = await proceed()
        except BaseException as exc:
            if _is_cancellation(exc):
                self.record_end(msg.session_id, msg.id, msg.attempt, "cancelled")
            else:
                self.record_end(msg.session_id, msg.id, msg.attempt, "failed", exc)
            raise
        self.record_end(msg.session_id, msg.id, msg.attempt, "completed")
        return result

    def record_start(self, session_id: str, message_id: int, attempt: int) -> None:
        """Note that a handler call for this message and attempt began."""
        self._open[session_id, message_id, attempt] += 1
        self._append(HandlerEvent("start", session_id, message_id, attempt, time=_now()))

    def record_end(
        self,
        session_id: str,
        message_id: int,
        attempt: int,
        outcome: Outcome,
        error: BaseException | None = None,
    ) -> None:
        """Note that a handler call ended with ``outcome``.

        Raises:
          ValueError: ``outcome`` is not ``"completed"``, ``"failed"`` or
            ``"cancelled"``.
        """
        if outcome not in ("completed", "failed", "cancelled"):
            raise ValueError(
                f'outcome must be "completed", "failed" or "cancelled", got {outcome!r}'
            )
        key = (session_id, message_id, attempt)
        if self._open[key] > 1:
            self._open[key] -= 1
        else:
            self._open.pop(key, None)
        self._append(
            HandlerEvent("end", session_id, message_id, attempt, outcome, error, time=_now())
        )

    def _append(self, event: HandlerEvent) -> None:
        self.events.append(event)
        self._counts[event.outcome or event.kind] += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # -- reading it ---------------------------------------------------------

    def statistics(self) -> RecorderStatistics:
        """Counts of the history so far."""
        counts = self._counts
        return RecorderStatistics(
            started=counts["start"],
            completed=counts["completed"],
            failed=counts["failed"],
            cancelled=counts["cancelled"],
            running=sum(self._open.values()),
            messages=len({e.message_id for e in self.events if e.kind == "start"}),
        )

    def running(self) -> dict[str, int]:
        """``{session_id: message id}`` of the handler calls running now."""
        return {session: message for (session, message, _), n in self._open.items() if n}

    def completed_ids(self) -> set[int]:
        """Ids of the messages a handler call completed (returned normally) for."""
        return {e.message_id for e in self.events if e.outcome == "completed"}

    def attempts(self) -> dict[int, list[int]]:
        """``{message id: the attempt of each of its calls}``, in the order the calls began."""
        seen: defaultdict[int, list[int]] = defaultdict(list)
        for event in self.events:
            if event.kind == "start":
                seen[event.message_id].append(event.attempt)
        return dict(seen)

    async def wait_until(self, predicate: Callable[[Recorder], bool]) -> None:
        """Return once ``predicate(recorder)`` is true, checking after every event.

        For example ``await recorder.wait_until(lambda r: r.running())``
        waits until some handler runs: a way to aim a kill without a sleep.
        """
        await trio.lowlevel.checkpoint()
        while not predicate(self):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()

    # -- checking it --------------------------------------------------------

    def assert_no_loss(
        self, sent_ids: Iterable[int], dead: Iterable[int | DeadLetter] = ()
    ) -> None:
        """Every id in ``sent_ids`` was completed by a handler call, or is dead.

        ``dead`` is the dead letters (``system.dead_letters()``) or their
        ids. Invariant 1: once ``send()`` returned an id, its message is
        processed or dead-lettered.

        Raises:
          AssertionError: naming each lost id and what the recorder saw of it.
        """
        _raise("no loss", self._lost(sent_ids, dead))

    def assert_fifo(self, dead: Iterable[int | DeadLetter] | None = None) -> None:
        """Each session's messages started in send order.

        A session's handler calls may repeat the current message (a
        redelivery) but never go back to an older one (ids grow in send
        order). With ``dead`` given, also: a session moved on from a message
        only after a call for it completed or it was dead-lettered, since a
        retry holds back the messages behind it. (This assumes plain sends:
        a delayed message or one requeued by ``retry_dead()`` enters its
        queue later than its id says, and an ``abort()`` lets a session
        move on.)

        Raises:
          AssertionError: naming each message that started out of order.
        """
        dead_ids = None if dead is None else _ids(dead)
        _raise("FIFO per session", self._out_of_order(dead_ids))

    def assert_one_at_a_time(self) -> None:
        """No session ever had two handler calls running at once.

        Raises:
          AssertionError: naming each call that started while another call
            of its session ran (or that ended without having started).
        """
        _raise("one at a time per session", self._overlapping())

    def assert_honest_attempts(self, *, seen_all: bool = True) -> None:
        """Redeliveries said so: each message's calls say attempt 1, 2, 3, ...

        A message's first call says ``attempt == 1`` and each redelivery one
        more than the call before, and a message runs again only after a
        call for it failed or was cancelled (a completed message is not
        delivered again). Pass ``seen_all=False`` if the recorder cannot
        have seen every attempt (the system recovered messages a dead
        process left in flight, or a wrapper outside the recorder failed
        some calls): then attempts must only grow.

        Raises:
          AssertionError: naming each message whose attempts were dishonest.
        """
        _raise("honest attempts", self._dishonest(seen_all))

    def assert_all(self, sent_ids: Iterable[int], dead: Iterable[int | DeadLetter] = ()) -> None:
        """All four checks at once: no loss, FIFO (with ``dead``), one at a time, honest attempts.

        Raises:
          AssertionError: listing the violations of every check that failed.
        """
        found = self.violations(sent_ids, dead)
        if not found.ok:
            raise AssertionError(str(found))

    def violations(
        self,
        sent_ids: Iterable[int] | None = None,
        dead: Iterable[int | DeadLetter] | None = None,
        *,
        seen_all: bool = True,
    ) -> Violations:
        """Run the four checks and return what they found, without raising.

        The checks and their arguments are those of the ``assert_*``
        methods: ``lost`` is checked only with ``sent_ids``; FIFO holds
        messages back behind a retry only with ``dead`` (as
        :meth:`assert_fifo`); ``seen_all`` is :meth:`assert_honest_attempts`'s.
        """
        dead_ids = None if dead is None else _ids(dead)
        return Violations(
            lost=() if sent_ids is None else tuple(self._lost(sent_ids, dead_ids or set())),
            out_of_order=tuple(self._out_of_order(dead_ids)),
            overlapping=tuple(self._overlapping()),
            dishonest=tuple(self._dishonest(seen_all)),
        )

    # -- the checks, as lists of violations -----------------------------------

    def _lost(self, sent_ids: Iterable[int], dead: Iterable[int | DeadLetter]) -> list[str]:
        sent = list(sent_ids)
        dead_ids = _ids(dead)
        completed = self.completed_ids()
        lost = [i for i in sent if i not in completed and i not in dead_ids]
        if not lost:
            return []
        calls: defaultdict[int, list[HandlerEvent]] = defaultdict(list)
        wanted = set(lost)
        for event in self.events:
            if event.message_id in wanted:
                calls[event.message_id].append(event)
        found = []
        for message_id in lost:
            seen = calls[message_id]
            starts = [e for e in seen if e.kind == "start"]
            if not starts:
                found.append(
                    f"message {message_id} was acknowledged and is not dead, but never started"
                )
                continue
            ends = [e for e in seen if e.kind == "end"]
            last = (
                f"its last call (attempt {ends[-1].attempt}) {ends[-1].outcome}"
                if ends
                else "no call of it ended"
            )
            found.append(
                f"message {message_id} (session {starts[0].session_id!r}) was acknowledged "
                f"and is not dead, but never completed: started {len(starts)} time(s), {last}"
            )
        return found

    def _out_of_order(self, dead_ids: set[int] | None) -> list[str]:
        found = []
        # {session: [current message id, whether its last call completed]}
        current: dict[str, list[Any]] = {}
        for event in self.events:
            state = current.get(event.session_id)
            if event.kind == "end":
                if state is not None and state[0] == event.message_id:
                    state[1] = event.outcome == "completed"
                continue
            if state is None:
                current[event.session_id] = [event.message_id, False]
            elif event.message_id < state[0]:
                found.append(
                    f"session {event.session_id!r}: message {event.message_id} "
                    f"(attempt {event.attempt}) started after message {state[0]}, "
                    "which was sent after it"
                )
            elif event.message_id > state[0]:
                if dead_ids is not None and not state[1] and state[0] not in dead_ids:
                    found.append(
                        f"session {event.session_id!r}: message {event.message_id} started "
                        f"while message {state[0]}, sent before it, had neither completed "
                        "nor been dead-lettered (a retry must hold back the messages behind it)"
                    )
                current[event.session_id] = [event.message_id, False]
        return found

    def _overlapping(self) -> list[str]:
        found = []
        running: defaultdict[str, list[tuple[int, int]]] = defaultdict(list)
        for event in self.events:
            calls = running[event.session_id]
            call = (event.message_id, event.attempt)
            if event.kind == "start":
                if calls:
                    other, other_attempt = calls[-1]
                    found.append(
                        f"session {event.session_id!r}: message {event.message_id} "
                        f"(attempt {event.attempt}) started while message {other} "
                        f"(attempt {other_attempt}) was still running"
                    )
                calls.append(call)
            elif call in calls:
                calls.remove(call)
            else:
                found.append(
                    f"session {event.session_id!r}: a call for message {event.message_id} "
                    f"(attempt {event.attempt}) ended without having started"
                )
        return found

    def _dishonest(self, seen_all: bool) -> list[str]:
        found = []
        attempts: defaultdict[int, list[int]] = defaultdict(list)
        last_outcome: dict[int, Outcome | None] = {}
        for event in self.events:
            message_id = event.message_id
            if event.kind == "end":
                last_outcome[message_id] = event.outcome
                continue
            seen = attempts[message_id]
            attempt = event.attempt
            if not seen:
                if attempt < 1 or (seen_all and attempt != 1):
                    found.append(
                        f"message {message_id}: its first delivery said attempt {attempt}, not 1"
                    )
            elif attempt <= seen[-1]:
                found.append(
                    f"message {message_id}: delivered again with attempt {attempt} after "
                    f"attempt {seen[-1]}; a redelivery must say a higher attempt"
                )
            elif seen_all and attempt != seen[-1] + 1:
                found.append(
                    f"message {message_id}: attempt {attempt} came after attempt {seen[-1]}; "
                    f"attempt {seen[-1] + 1} was never seen"
                )
            if seen and seen_all and last_outcome.get(message_id) == "completed":
                found.append(
                    f"message {message_id}: delivered again (attempt {attempt}) after "
                    f"attempt {seen[-1]} completed; a duplicate needs a failure, a kill or "
                    "a crash in between"
                )
            seen.append(attempt)
        return found


def _ids(dead: Iterable[int | DeadLetter]) -> set[int]:
    return {d.id if isinstance(d, DeadLetter) else d for d in dead}


def _now() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:  # outside trio.run: a history written by hand
        return None


def _is_cancellation(exc: BaseException) -> bool:
    if isinstance(exc, trio.Cancelled):
        return True
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return False


def _describe(check: str, found: list[str]) -> str:
    shown = found[:MAX_LISTED]
    lines = [f"{check}: {len(found)} violation(s)"]
    lines += [f"  - {line}" for line in shown]
    if len(found) > len(shown):
        lines.append(f"  ... and {len(found) - len(shown)} more")
    return "\n".join(lines)


def _raise(check: str, found: list[str]) -> None:
    if found:
        raise AssertionError(_describe(check, found))
