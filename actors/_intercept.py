"""Handler wrappers: :func:`intercept` runs a middleware in a handler's place.

``actors.testing`` builds its fault injectors and its recorder on it, and
re-exports it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ._context import Actor, Context, actor_factory
from ._records import Message

Handler = Callable[[Context, Message], Awaitable[Any]]
"""An ``async def handler(ctx, msg)``, the function spelling of a handler."""

Proceed = Callable[[], Awaitable[Any]]
Middleware = Callable[[Context, Message, Proceed], Awaitable[Any]]
"""``async def middleware(ctx, msg, proceed)``; ``await proceed()`` runs the handler."""

A = TypeVar("A", bound=Actor)


@overload
def intercept(handler: type[A], middleware: Middleware) -> type[A]: ...
@overload
def intercept(handler: Handler, middleware: Middleware) -> Handler: ...
def intercept(handler: type[Actor] | Handler, middleware: Middleware) -> type[Actor] | Handler:
    """Wrap ``handler`` so that every call goes through ``middleware``.

    ``middleware`` is ``async def middleware(ctx, msg, proceed)``; it runs in
    the handler's place, under its timeout, and ``await proceed()`` runs the
    wrapped handler once and returns what it returned. The middleware's own
    return value is the handler's outcome (what ``ask`` gets and subscribers
    see): return ``proceed()``'s to pass it on. Raise to fail the attempt;
    don't call ``proceed`` to skip the handler. :func:`flaky`, :func:`slow`, :func:`hang` and
    :meth:`Recorder.wrap` are built on it.

    ``handler`` is either spelling that ``run_system`` takes, and so is the
    result: an ``async def handler(ctx, msg)`` gives an async function; an
    :class:`~actors.Actor` subclass gives a subclass of it whose ``handle``
    goes through ``middleware`` (``started`` and ``stopped`` are untouched,
    and every instance shares the middleware). Wrappers compose:
    ``recorder.wrap(flaky(slow(handle, ...), ...))``.

    Raises:
      TypeError: ``handler`` is not something ``run_system`` accepts (the
        same error ``run_system`` would raise), or is batched
        (``actors.batched``, ``handle_batch``): a middleware sees one
        message at a time.
    """
    # Validate: run_system's own TypeError, raised now.
    if actor_factory(handler).max_batch:
        raise TypeError(
            "a batched handler cannot be intercepted: a middleware takes one message at a time"
        )
    if isinstance(handler, type):
        base: type[Actor] = handler

        async def handle(self: Actor, ctx: Context, msg: Message) -> Any:
            return await middleware(ctx, msg, functools.partial(base.handle, self, ctx, msg))

        namespace = {
            "handle": handle,
            "__module__": base.__module__,
            "__qualname__": base.__qualname__,
            "__doc__": base.__doc__,
        }
        return type(base.__name__, (base,), namespace)

    fn: Handler = handler

    async def wrapper(ctx: Context, msg: Message) -> Any:
        return await middleware(ctx, msg, functools.partial(fn, ctx, msg))

    for attribute in ("__module__", "__name__", "__qualname__", "__doc__"):
        if hasattr(fn, attribute):
            setattr(wrapper, attribute, getattr(fn, attribute))
    return wrapper
