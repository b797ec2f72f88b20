"""What a failed attempt leaves behind: its error as text, made once and safely.

A handler may raise anything: an exception whose ``__repr__`` or ``__str__``
raises, returns something that is not a ``str``, or returns a megabyte; a
message with lone surrogates (text decoded with ``errors="surrogateescape"``),
which SQLite's UTF-8 cannot store. The runtime turns the exception into text
once, where the attempt's failure is recorded (``SessionActor._after_crash``),
with :func:`describe`, which never raises, and passes that text on: to the
database (``last_error``), the log, the events stream and dead-letter
reasons. Nothing downstream calls ``repr()`` or ``str()`` on a user's
exception again.

:class:`WarningLimiter` keeps the WARNING a handler's failure earns from
flooding the log.
"""

from __future__ import annotations

import math
import traceback
from typing import cast

import attrs
import trio

from ._errors import Reject

# Bounds, in characters: a failure's one-line summary (log lines, events,
# dead-letter reasons), and the traceback kept as ``last_error``. A longer
# text keeps its head and its tail (the outermost frames, and the exception
# raised with its message), with what was cut counted in between.
MAX_SUMMARY_CHARS = 1_000
MAX_REPORT_CHARS = 20_000
MAX_PART_CHARS = 5_000  # one part of a traceback: a frame, or the exception's line


@attrs.frozen
class FailureText:
    """A failure as text: safe to store (valid UTF-8), bounded, never raising again."""

    summary: str  # ``repr(exc)``, or the best that could be had; one line in logs
    report: str  # the traceback (what a dead letter's ``last_error`` shows)


def describe(exc: BaseException) -> FailureText:
    """Turn ``exc`` into text. Never raises (for an ``Exception`` raised while formatting).

    The summary is ``repr(exc)``; if that raises or is not a ``str``, the
    type's name and ``str(exc)``; failing that too, the type's name alone.
    A :class:`Reject` (alone or as every leaf of an exception group) is
    summarised as ``"rejected by the handler: <reason>"``. The report is
    the traceback as ``traceback.format_exception`` writes it (preceded by
    the rejection's summary for a ``Reject``). Both are cut to their bound
    and have lone surrogates escaped (``backslashreplace``).
    """
    rejection = rejected(exc)
    if rejection is not None:
        summary = "rejected by the handler: " + _safe_str(rejection.reason, "reason")
    else:
        summary = _summary(exc)
    summary = _escape(_bound(summary, MAX_SUMMARY_CHARS), MAX_SUMMARY_CHARS)
    try:
        # Each part bounded first: an enormous message must not push the
        # exception's type (at the head of its line) out of the report.
        report = "".join(_bound(part, MAX_PART_CHARS) for part in traceback.format_exception(exc))
        report = report.rstrip()
    except Exception as inner:  # a hostile object can break even traceback's own guards
        report = f"{summary}\n(its traceback could not be formatted: {_type_name(inner)})"
    if rejection is not None:
        report = f"{summary}\n\n{report}"
    return FailureText(summary, _escape(_bound(report, MAX_REPORT_CHARS), MAX_REPORT_CHARS))


def rejected(exc: BaseException) -> Reject | None:
    """The :class:`Reject` that ``exc`` is, or that every leaf of the group ``exc`` is.

    Never raises: a hostile exception cannot make it fail. Types are asked
    with ``type()``, which reads no attribute of the object (``isinstance``
    falls back to ``exc.__class__``, which a user's class may make raise).
    """
    cls = type(exc)
    if issubclass(cls, Reject):
        return cast(Reject, exc)  # (a Reject, by its real type)
    if issubclass(cls, BaseExceptionGroup):
        try:
            matched, rest = cast(BaseExceptionGroup[BaseException], exc).split(Reject)
            if matched is None or rest is not None:
                return None
            leaf: BaseException = matched
            while issubclass(type(leaf), BaseExceptionGroup):
                leaf = cast(BaseExceptionGroup[BaseException], leaf).exceptions[0]
        except Exception:  # a group subclass whose derive() (or a leaf) misbehaves
            return None
        return cast(Reject, leaf) if issubclass(type(leaf), Reject) else None
    return None


def _type_name(exc: BaseException) -> str:
    try:
        name = type(exc).__qualname__
    except Exception:  # a metaclass with a hostile __qualname__
        return "<exception>"
    return name if type(name) is str else "<exception>"


def _safe_str(value: object, what: str) -> str:
    try:
        text = str(value)
        if type(text) is not str:  # (a str subclass: its plain value)
            text = str.__str__(text)
    except Exception as exc:
        return f"<{what}: str() failed with {_type_name(exc)}>"
    return text


def _summary(exc: BaseException) -> str:
    try:
        text = repr(exc)
        if isinstance(text, str):
            return str.__str__(text)
    except Exception:
        pass
    name = _type_name(exc)
    try:
        message = str(exc)
        if not isinstance(message, str):
            raise TypeError("__str__ returned something other than str")
    except Exception:
        return f"{name} (its repr() and str() failed)"
    return f"{name}: {str.__str__(message)}"


def _bound(text: str, limit: int) -> str:
    """``text``, or its head and tail with the number of characters cut between them."""
    if len(text) <= limit:
        return text
    keep = limit // 2
    return f"{text[:keep]}\n... [{len(text) - 2 * keep} characters cut] ...\n{text[-keep:]}"


def _escape(text: str, limit: int) -> str:
    """``text`` encodable as UTF-8: lone surrogates as ``\\udcff`` escapes (bounded again)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        return _bound(text, limit)  # an escape is six characters: it may have grown
    return text


@attrs.frozen
class WarningLimiterStatistics:
    """What :meth:`WarningLimiter.statistics` returns."""

    allowed: int  # warnings let through, in all
    held_back: int  # warnings held back, in all
    suppressed: int  # held back since the last one let through (the next one says so)


class WarningLimiter:
    """Rate limit for WARNINGs: one per kind of failure per ``interval``, ``burst`` in all.

    Time is trio's clock (a MockClock in tests). Windows are ``interval``
    seconds long and start with the first warning after the last window
    ended. :meth:`allow` tells how many warnings were held back since the
    last one logged, so that one can say so.
    """

    __slots__ = (
        "_allowed",
        "_burst",
        "_held_back",
        "_interval",
        "_kinds",
        "_suppressed",
        "_window_end",
    )

    def __init__(self, interval: float = 10.0, burst: int = 5) -> None:
        self._interval = interval
        self._burst = burst
        self._window_end = -float("inf")
        self._kinds: set[str] = set()  # kinds warned of in this window (at most burst)
        self._suppressed = 0  # held back since the last warning logged
        self._allowed = 0
        self._held_back = 0

    def allow(self, kind: str, now: float) -> int | None:
        """None to hold this warning back; else log it, with this many held back before it."""
        if now >= self._window_end:
            self._window_end = now + self._interval
            self._kinds.clear()
        if kind in self._kinds or len(self._kinds) >= self._burst:
            self._suppressed += 1
            self._held_back += 1
            return None
        self._kinds.add(kind)
        self._allowed += 1
        held, self._suppressed = self._suppressed, 0
        return held

    def statistics(self) -> WarningLimiterStatistics:
        return WarningLimiterStatistics(
            allowed=self._allowed, held_back=self._held_back, suppressed=self._suppressed
        )


def failure_of(exc: BaseException) -> BaseException | None:
    """The failure that ``exc``, raised by user code (the factory, a hook, a
    handler), records; None if it must go on (the caller re-raises it).

    An ``Exception`` is itself the failure; a stray ``Cancelled`` (see
    :func:`stray_cancellation`) fails as a RuntimeError that says so; a
    real cancellation, ``KeyboardInterrupt``, ``SystemExit`` and the like
    go on. (``type()``: an exception's ``__class__`` may raise.)
    """
    if issubclass(type(exc), Exception):
        return exc
    return stray_cancellation(exc)


def stray_cancellation(exc: BaseException) -> RuntimeError | None:
    """The failure to record if ``exc``, raised by user code, is a cancellation not for us.

    A handler can catch a ``trio.Cancelled`` inside a cancel scope (or a
    nursery) of its own and raise it again outside that scope. No scope of
    the actor's catches it then: it would end the actor's task, and trio's
    nursery would swallow it silently, ending the supervisor while the
    system still accepts sends. Returns None if ``exc`` is no such thing
    (the caller re-raises it): not a Cancelled (nor a group of Cancelled
    and ordinary exceptions), or the calling task is cancelled indeed.
    """
    if isinstance(exc, BaseExceptionGroup):
        if exc.split((Exception, trio.Cancelled))[1] is not None:
            return None  # holds a KeyboardInterrupt, SystemExit...: not ours to judge
        if exc.subgroup(trio.Cancelled) is None:
            return None  # (an ExceptionGroup: the caller's except Exception took it)
    elif not isinstance(exc, trio.Cancelled):
        return None
    # Effectively cancelled (a kill, a timeout, the system stopping): it is ours.
    if trio.current_effective_deadline() == -math.inf:
        return None
    error = RuntimeError(
        f"the handler raised {type(exc).__name__}, a trio.Cancelled its own scope did not cause "
        "(a Cancelled caught inside a cancel scope or nursery must not be raised outside it)"
    )
    error.__cause__ = exc
    return error
