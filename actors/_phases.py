"""The session actor's states: its phases, the legal changes between them, its steps.

:class:`Phase` is where a :class:`~actors._actor.SessionActor` is;
:data:`TRANSITIONS` the changes it may make (docs/architecture.md prints the
table, and tests/test_state_machine.py checks that the two agree);
:class:`Step` what a serving actor decides to do next; :class:`Exit` why an
incarnation ended; :class:`Cancel` why its cancel scope was cancelled.
"""

from __future__ import annotations

import enum


class Exit(enum.Enum):
    """Why an incarnation ended."""

    IDLE = "idle"  # no work for idle_timeout, or others wait for a slot
    YIELD = "yield"  # used its fair share while others wait; has more work
    WAIT = "wait"  # the head waits for its retry time; the timer brings it back
    STOP = "stop"  # the system is stopping
    CRASH = "crash"  # handler raised, timed out, was killed, or a hook failed
    START_FAILED = "start failed"  # (internal) the factory or started() raised
    TIMEOUT = "timeout"  # (internal to _serve) the handler outlived handler_timeout


class Phase(enum.Enum):
    """Where a session actor is. The legal changes are :data:`TRANSITIONS`."""

    NEW = "new"  # registered; its task has not run yet
    STARTING = "starting"  # builds an instance, loads the state, runs started()
    CLAIMING = "claiming"  # a claim of the session's head (with the previous ack) commits
    HOLDING = "holding"  # holds a claimed message whose handler has not started
    RUNNING = "running"  # the handler runs (handler_timeout applies)
    ACKING = "acking"  # waits for its ack to commit (before an answer, a leave, isolation)
    EMITTING = "emitting"  # waits for subscribers to take the handler's result
    IDLE = "idle"  # nothing to do: parked until a notice, a handoff or a wake-up
    HANDOFF = "handoff"  # waits for messages being inserted claimed for it
    ISOLATION = "isolation"  # waits while a crash suspect runs alone, or to run one alone
    DUE = "due"  # waits (keeping its slot) for its head's retry time, which is near
    STOPPING = "stopping"  # runs the instance's stopped() hook
    FAILING = "failing"  # records a crash: fails the attempt, gives back what it holds
    BACKOFF = "backoff"  # waits out the restart delay before the next incarnation
    RELEASING = "releasing"  # gives back the messages it holds (they were not started)
    LEFT = "left"  # out of the registry; its task ends

    # Enum's own __hash__ is a Python function (hash of the name); _to()
    # hashes the phase twice per change, three changes per message. Members
    # are singletons compared by identity, so the identity hash agrees.
    __hash__ = object.__hash__


# Phases of serving (an incarnation between started() and its end): the
# router may hand such an actor messages claimed on delivery.
SERVING = frozenset(
    {
        Phase.CLAIMING,
        Phase.HOLDING,
        Phase.RUNNING,
        Phase.ACKING,
        Phase.EMITTING,
        Phase.IDLE,
        Phase.HANDOFF,
        Phase.ISOLATION,
        Phase.DUE,
    }
)

# {phase: the phases it may change to}. docs/architecture.md prints this
# table; tests/test_architecture.py checks that the two agree.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.STARTING, Phase.RELEASING}),
    Phase.STARTING: frozenset(
        {Phase.CLAIMING, Phase.HOLDING, Phase.HANDOFF, Phase.ISOLATION, Phase.RELEASING}
        | {Phase.STOPPING, Phase.FAILING}
    ),
    Phase.CLAIMING: frozenset(
        {Phase.HOLDING, Phase.IDLE, Phase.ISOLATION, Phase.DUE, Phase.CLAIMING}
        | {Phase.HANDOFF, Phase.ACKING, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.HOLDING: frozenset({Phase.RUNNING, Phase.RELEASING, Phase.FAILING}),
    Phase.RUNNING: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.IDLE, Phase.ACKING, Phase.EMITTING}
        | {Phase.HANDOFF, Phase.ISOLATION, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.ACKING: frozenset(
        {Phase.EMITTING, Phase.HOLDING, Phase.CLAIMING, Phase.IDLE, Phase.HANDOFF}
        | {Phase.ISOLATION, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.EMITTING: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.IDLE, Phase.ACKING, Phase.HANDOFF}
        | {Phase.ISOLATION, Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.IDLE: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.HANDOFF, Phase.ISOLATION, Phase.ACKING}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING, Phase.LEFT}
    ),
    Phase.HANDOFF: frozenset(
        {Phase.HOLDING, Phase.CLAIMING, Phase.ISOLATION, Phase.HANDOFF, Phase.ACKING}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.ISOLATION: frozenset(
        {Phase.CLAIMING, Phase.HOLDING, Phase.HANDOFF, Phase.ACKING, Phase.ISOLATION}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.DUE: frozenset(
        {Phase.CLAIMING, Phase.HOLDING, Phase.HANDOFF, Phase.ISOLATION, Phase.ACKING}
        | {Phase.RELEASING, Phase.STOPPING, Phase.FAILING}
    ),
    Phase.STOPPING: frozenset({Phase.STARTING, Phase.FAILING, Phase.RELEASING, Phase.LEFT}),
    # (Failing gives back what the actor holds itself: no releasing from it.)
    Phase.FAILING: frozenset({Phase.STARTING, Phase.BACKOFF, Phase.LEFT}),
    Phase.BACKOFF: frozenset({Phase.STARTING, Phase.RELEASING, Phase.LEFT}),
    Phase.RELEASING: frozenset(
        {Phase.STOPPING, Phase.STARTING, Phase.ISOLATION, Phase.FAILING, Phase.LEFT}
    ),
    Phase.LEFT: frozenset(),
}


class TransitionError(BaseException):
    """A session actor was asked to change phase against :data:`TRANSITIONS`: a bug of ours.

    Not an ``Exception``: no path that records a handler's failure may take
    it for one. It ends the actor's task (its messages go back to pending)
    and fails the system, whose ``async with`` raises it.
    """

    def __init__(self, session_id: str, old: Phase, new: Phase) -> None:
        super().__init__(f"session {session_id!r}: illegal phase change {old.value} -> {new.value}")


class Step(enum.Enum):
    """What a serving actor does next (SessionActor._next_step)."""

    STOP = "stop"  # the system stops: flush the ack, give back what it holds
    YIELD = "yield"  # its fair share is used and others wait: leave for the back of the line
    END_ISOLATION = "end isolation"  # the suspect it ran alone is done: let others claim
    WAIT_ISOLATION = "wait isolation"  # another actor runs a suspect alone: hold nothing, wait
    WAIT_HANDOFF = "wait handoff"  # messages are being inserted claimed for it
    TAKE_HANDED = "take handed"  # run the next message it was handed
    LOAD_AND_TAKE = "load and take"  # the same, handed before the state was loaded
    CLAIM = "claim"  # claim the session's head from the database
    NEXT = "next"  # (after a step) decide again
    AWAIT_WORK = "await work"  # (after a step) nothing to do: wait for work


class Cancel(enum.Enum):
    """Why the incarnation's cancel scope was cancelled (a kill wins over a timeout)."""

    KILLED = "killed"
    TIMED_OUT = "timed out"
