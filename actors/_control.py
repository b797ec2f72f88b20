"""Changes asked for from outside the running system: the ``control`` table.

The command line (``actors retry / abort / purge``) must not write to the
messages of a database that a running system owns: the system keeps counts
in memory (what ``drain()`` waits for, ``statistics()``) and actors that
read their queues from the database, and a change behind its back would
make them wrong. So, while a system runs, the command line *asks*: it
inserts a row into ``control`` (command, arguments as JSON) and waits. The
system's :class:`Control` task looks for open requests every
``control_interval`` seconds, applies each, oldest first, through the
system's own methods (``retry_dead``, ``abort``, ``purge``), which keep its
counts right, and writes the outcome (``done_at``, ``result`` as JSON).

On PostgreSQL every member of the cluster runs a Control task; the store
hands each open request to one of them (``take_control``).

With no system running, the command line takes the database's lock itself
(so none can start meanwhile; on PostgreSQL it acts once no member is
alive, with nothing to lock) and applies the same command through
:class:`DirectTarget`, on the same store operations. Either way one function,
:func:`apply`, reads the arguments and words the outcome.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
import trio
from trio_util import periodic

from ._errors import StoreError
from ._purge import purge_batches
from ._validate import check_message_id, purge_scope
from .store import MessageState, Store
from .store.backends import open_control_requests

log = logging.getLogger("actors.control")

COMMANDS = ("abort", "purge", "retry")
TAKE_LIMIT = 100  # requests taken per look
CONTROL_RETENTION = 7 * 86400.0  # seconds a finished request stays in the table


class Target(Protocol):
    """What a control command acts on: a running System, or a DirectTarget."""

    @property
    def closed(self) -> bool: ...

    async def retry_dead(self, message_id: int | None = None) -> int: ...

    async def abort(self, message_id: int) -> bool: ...

    async def purge(
        self, *, session_id: str | None = None, dead: bool = False, older_than: float | None = None
    ) -> int: ...


# -- arguments and outcome (both sides) --------------------------------------


def _message_id(args: dict[str, Any]) -> int:
    # Checked here too, not only by the System's methods: DirectTarget
    # passes the id straight to the store.
    return check_message_id(args.get("id"), "'id'")


async def apply(target: Target, command: str, args_json: str) -> dict[str, Any]:
    """Apply one command; returns its outcome as a JSON-ready dict.

    ``{"ok": True, "count": n, "detail": text}``, or ``{"ok": False,
    "error": text}`` for an unknown command, bad arguments, or a command
    that found nothing to do to the message it names. Never raises for
    those; a StoreError (the database failed) propagates.
    """
    try:
        args = json.loads(args_json)
        if not isinstance(args, dict):
            raise TypeError("the arguments must be a JSON object")
        if command == "retry":
            if args.get("all") is True:
                count = await target.retry_dead()
                return {"ok": True, "count": count, "detail": f"requeued {count} dead letter(s)"}
            message_id = _message_id(args)
            count = await target.retry_dead(message_id)
            if not count:
                return {"ok": False, "error": f"message {message_id} is not a dead letter"}
            return {"ok": True, "count": count, "detail": f"requeued dead letter {message_id}"}
        if command == "abort":
            message_id = _message_id(args)
            if not await target.abort(message_id):
                return {"ok": False, "error": f"no pending or dead message {message_id}"}
            return {"ok": True, "count": 1, "detail": f"aborted message {message_id}"}
        if command == "purge":
            count = await target.purge(
                session_id=args.get("session"),
                dead=args.get("dead", False),
                older_than=args.get("older_than"),
            )
            return {"ok": True, "count": count, "detail": f"purged {count} message(s)"}
        known = ", ".join(COMMANDS)
        return {"ok": False, "error": f"unknown command {command!r} (known: {known})"}
    except StoreError:
        raise
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


# -- with no system running ---------------------------------------------------


class DirectTarget:
    """Applies commands straight to a store that no system runs on.

    The caller holds the database's lock (SQLite), or found no member alive
    (PostgreSQL). Same semantics as the System's methods. On SQLite, opening
    the store recovered whatever a dead process left in flight, so nothing
    is in flight; on PostgreSQL, what a dead member left in flight stays so
    until another member takes its bucket over, and is not aborted.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    @property
    def closed(self) -> bool:
        return False

    async def retry_dead(self, message_id: int | None = None) -> int:
        return len(await self._store.retry_dead(message_id))

    async def abort(self, message_id: int) -> bool:
        found = await self._store.abort(message_id)
        if found is None:
            return False
        if found.state == MessageState.IN_FLIGHT:
            raise ValueError(f"message {message_id} is in flight and cannot be aborted now")
        return True

    async def purge(
        self, *, session_id: str | None = None, dead: bool = False, older_than: float | None = None
    ) -> int:
        session_id, before = purge_scope(session_id, dead, older_than, time.time())
        return await purge_batches(self._store, session_id, dead, before, lambda _p, _d, _ids: None)


# -- the running system's side ----------------------------------------------------


@attrs.frozen
class ControlStatistics:
    """The control task since the system started."""

    looks: int  # reads of the control table
    applied: int  # requests applied (their outcome written)
    refused: int  # of those, how many had an error outcome


class Control:
    """The running system's task that applies requests from the control table.

    It looks with a read of the store's that never blocks the writer and
    costs no transaction (``Store.has_open_requests``), and only when a
    request is open does it queue operations: take the open requests, apply
    each through the system, write each outcome.
    """

    def __init__(
        self,
        target: Target,
        store: Store,
        now: Callable[[], float],
        interval: float,
    ) -> None:
        self._target = target
        self._store = store
        self._now = now
        self._interval = interval
        self._looks = 0
        self._applied = 0
        self._refused = 0
        self._warned = False

    async def run(self) -> None:
        """Look every ``interval`` seconds until cancelled."""
        async for _ in periodic(self._interval):
            # A stopping system takes no more requests: they wait for
            # the next start (or their command line withdraws them).
            if not self._target.closed and self._has_open_requests():
                await self.serve()

    def _has_open_requests(self) -> bool:
        self._looks += 1
        try:
            return self._store.has_open_requests()
        except StoreError as exc:
            # Never fail the system for this: say so once, look again later.
            if not self._warned:
                self._warned = True
                log.warning("%s", exc)
            return False

    async def serve(self) -> None:
        """Take the open requests and apply them, oldest first."""
        store = self._store
        for taken in await store.take_control(TAKE_LIMIT):
            # Apply and record as one unit: a stop of the system in between
            # would apply the request again at the next start.
            with trio.CancelScope(shield=True):
                outcome = await apply(self._target, taken.command, taken.args)
                now = self._now()
                await store.finish_control(
                    taken.id, now, json.dumps(outcome), now - CONTROL_RETENTION
                )
            self._applied += 1
            if not outcome["ok"]:
                self._refused += 1
            log.info("control request %d (%s %s): %s", taken.id, taken.command, taken.args, outcome)

    def statistics(self) -> ControlStatistics:
        """Looks, applied and refused requests since start."""
        return ControlStatistics(looks=self._looks, applied=self._applied, refused=self._refused)


# -- the command line's side ------------------------------------------------------


class RequestTimeoutError(Exception):
    """The running system did not answer a control request in time.

    ``withdrawn`` says whether the request was taken back (nothing was
    changed) or had already been taken by the system (it will be applied).
    """

    def __init__(self, request_id: int, waited: float, withdrawn: bool) -> None:
        self.request_id = request_id
        self.withdrawn = withdrawn
        if withdrawn:
            what = "withdrawn: nothing was changed"
        else:
            what = "the system took it and will finish it; check again later"
        super().__init__(f"no answer to control request {request_id} within {waited:g}s ({what})")


class SystemStoppedError(Exception):
    """The system stopped before it answered a control request.

    Raised once ``stopped()`` (see :func:`request`) said so, which means the
    caller holds the database's lock now and can apply the command itself.
    ``withdrawn``: the request was taken back; otherwise the stopped system
    had taken it without finishing it, and whoever applies it must write its
    outcome into the request (else the next system applies it again).
    """

    def __init__(self, request_id: int, withdrawn: bool) -> None:
        self.request_id = request_id
        self.withdrawn = withdrawn
        super().__init__(f"the system stopped before it answered control request {request_id}")


def request(
    path: str,
    command: str,
    args: dict[str, Any],
    *,
    wait: float,
    poll: float = 0.05,
    busy_timeout: float = 5.0,
    stopped: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Ask the system running on ``path`` (a file or a URL) to apply a command; return its outcome.

    Blocks (polling every ``poll`` seconds) until the system wrote the
    outcome, at most ``wait`` seconds. ``stopped()``, called at every poll,
    says whether the system is gone; the command line passes one that
    tries to take the database's lock (so a yes leaves the caller holding
    it: no other system can start and take the request meanwhile), or on
    PostgreSQL one that finds no member alive. A system
    that is stopping takes no more requests, so without this a request
    issued at that moment would wait out ``wait`` for nothing.

    Raises:
      RequestTimeoutError: no outcome within ``wait``.
      SystemStoppedError: ``stopped()`` said yes before an outcome came.
      StoreError: the database cannot be written.
    """
    requests = open_control_requests(path, busy_timeout)
    try:
        request_id = requests.submit(command, json.dumps(args), time.time())

        def answered() -> dict[str, Any] | None:
            result = requests.answer(request_id)
            if result is None:
                return None
            outcome: dict[str, Any] = json.loads(result)
            return outcome

        deadline = time.monotonic() + wait
        try:
            while True:
                outcome = answered()
                if outcome is not None:
                    return outcome
                if stopped is not None and stopped():
                    # It may have answered just before it went: look once more.
                    outcome = answered()
                    if outcome is not None:
                        return outcome
                    raise SystemStoppedError(request_id, withdrawn=requests.withdraw(request_id))
                if time.monotonic() >= deadline:
                    raise RequestTimeoutError(
                        request_id, wait, withdrawn=requests.withdraw(request_id)
                    )
                time.sleep(poll)
        except KeyboardInterrupt:
            requests.withdraw(request_id)
            raise
    finally:
        requests.close()
