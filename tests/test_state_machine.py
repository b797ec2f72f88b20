"""The session actor's written state machine: the code, its table, and the docs agree.

docs/architecture.md prints the transition table; these tests fail when
the code's ``TRANSITIONS`` and the document drift apart, when a phase
cannot be reached or left, and when ``_to`` lets an illegal change pass.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import actors._actor
from actors._actor import SessionActor
from actors._phases import SERVING, TRANSITIONS, Phase, TransitionError

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
# The actor's task, and its state with the calls others make (a base class).
SOURCES = (ROOT / "actors" / "_actor.py", ROOT / "actors" / "_actor_state.py")


def _documented() -> dict[Phase, frozenset[Phase]]:
    text = DOC.read_text()
    block = text.split("<!-- transitions:begin -->")[1].split("<!-- transitions:end -->")[0]
    table: dict[Phase, frozenset[Phase]] = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        source = Phase(cells[0].strip("`"))
        table[source] = frozenset(Phase(name) for name in re.findall(r"`([a-z]+)`", cells[1]))
    return table


def test_the_documented_table_is_the_code_table() -> None:
    assert _documented() == TRANSITIONS


def test_every_phase_is_in_the_table_and_in_the_phase_list_of_the_docs() -> None:
    assert set(TRANSITIONS) == set(Phase)
    text = DOC.read_text()
    for phase in Phase:
        assert f"| `{phase.value}` | " in text, phase


def test_every_phase_but_new_can_be_reached_and_every_phase_but_left_can_be_left() -> None:
    reached = {target for targets in TRANSITIONS.values() for target in targets}
    assert reached == set(Phase) - {Phase.NEW}
    assert [p for p, targets in TRANSITIONS.items() if not targets] == [Phase.LEFT]


def test_every_phase_the_code_enters_is_entered_through_to() -> None:
    """Each ``Phase.X`` the actor moves to is named in a ``self._to(Phase.X)`` call
    (or ``self._to(_X)``, a module global bound to it: the per-message path reads
    those), and nothing assigns ``self.phase`` but ``_to`` (and ``__init__``)."""
    entered: set[str] = set()
    assigners: set[str] = set()
    functions = [
        node
        for source in SOURCES
        for node in ast.walk(ast.parse(source.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    for func in functions:
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_to"
            ):
                arg = node.args[0]
                if isinstance(arg, ast.Attribute):
                    entered.add(arg.attr)
                elif isinstance(arg, ast.Name):
                    bound = getattr(actors._actor, arg.id)
                    assert isinstance(bound, Phase), arg.id
                    entered.add(bound.name)
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "phase" for t in node.targets
            ):
                assigners.add(func.name)
    assert assigners == {"__init__", "_to"}
    assert entered == {p.name for p in Phase} - {"NEW"}


def test_handoffs_are_taken_only_while_serving() -> None:
    assert Phase.STARTING not in SERVING and Phase.FAILING not in SERVING
    assert {Phase.CLAIMING, Phase.RUNNING, Phase.IDLE} <= SERVING


class _Host:
    """Just enough of an ActorHost to build an actor (nothing runs)."""

    class store:  # (an attribute namespace: host.store.starts)
        starts = None


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (Phase.NEW, Phase.RUNNING),
        (Phase.HOLDING, Phase.IDLE),
        (Phase.BACKOFF, Phase.RUNNING),
        (Phase.STOPPING, Phase.RUNNING),
        (Phase.LEFT, Phase.STARTING),
        (Phase.IDLE, Phase.RUNNING),
    ],
)
def test_an_illegal_change_raises_and_leaves_the_phase_alone(old: Phase, new: Phase) -> None:
    actor = SessionActor("s", _Host())  # type: ignore[arg-type]
    actor.phase = old
    with pytest.raises(TransitionError, match=f"{old.value} -> {new.value}"):
        actor._to(new)
    assert actor.phase is old
    assert not issubclass(TransitionError, Exception)  # no failure path can take it for a handler's


def test_legal_changes_pass() -> None:
    actor = SessionActor("s", _Host())  # type: ignore[arg-type]
    for phase in (Phase.STARTING, Phase.CLAIMING, Phase.HOLDING, Phase.RUNNING, Phase.IDLE):
        actor._to(phase)
        assert actor.phase is phase
    assert actor.statistics().phase == "idle"


async def test_isolation_says_who_holds_it_and_how_many_suspects_wait() -> None:
    import trio.testing

    from actors._gauge import Gauge
    from actors._isolation import Isolation

    isolation: Isolation[str] = Isolation(Gauge(0), Gauge(0))
    assert isolation.statistics().held is False
    await isolation.enter("a", "a")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(isolation.enter, "b", "b")
        await trio.testing.wait_all_tasks_blocked()
        stats = isolation.statistics()
        assert (stats.held, stats.suspects_waiting) == (True, 1)
        isolation.end("a")
    assert isolation.holder == "b" and isolation.statistics().suspects_waiting == 0
