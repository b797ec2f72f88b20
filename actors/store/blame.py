"""Why a message whose attempts were used up without an outcome is dead-lettered.

Shared by the stores' claims (sqlite_claim.py, postgres_ops.py): the reason
a user reads in ``actors dead`` is the same whichever database holds it.
"""

from __future__ import annotations


def gave_up(attempts: int, crashed: int, ran_alone: int, last_error: str | None) -> str:
    """Why a head whose attempts were used up without an outcome is dead-lettered."""
    if crashed and ran_alone:
        reason = (
            f"gave up after {attempts} attempt(s); the process died during the last "
            "one, which ran alone: this message kills the process"
        )
    elif crashed:
        reason = (
            f"gave up after {attempts} attempt(s); the process died during the last "
            "one (other messages were in flight too, so it may not be the cause)"
        )
    else:
        reason = f"gave up after {attempts} attempt(s); the last one ended without an outcome"
    if last_error:
        reason += f"; the error before that:\n{last_error}"
    return reason
