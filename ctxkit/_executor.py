"""Sync code in a clone: ``bind`` for one callable, ``ContextExecutor`` for every job of a pool.

Both clone the calling context without a span (``clone_without_span``: the selected vars, the
trace, a fake trace id where no span is current) at the moment work is handed over, and run the
work in a copy of that clone, so a worker thread never runs a job in a context that an earlier
job left behind or that the thread inherited when it started.

A job handed over already wrapped in a ``Context.run`` (``asyncio.to_thread`` wraps every
function in ``copy_context().run`` before it reaches the loop's default executor) is unwrapped
first: the clone replaces that whole context, it does not run inside it.

``ContextExecutor``'s worker threads start detached, in an empty context, whatever the
interpreter's ``thread_inherit_context``: a pool starts its threads lazily inside ``submit``, so
``submit`` hands the job over from an empty ``Context`` (see ``ContextExecutor.submit``).
"""

from __future__ import annotations

import contextvars
import functools
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._clone import as_var_tuple, build_clone, plan_for
from ._options import is_async_callable

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from contextvars import ContextVar

__all__ = ["ContextExecutor", "bind"]

P = ParamSpec("P")
T = TypeVar("T")


def _clone_now(vars: tuple[ContextVar[Any], ...], caller: str) -> contextvars.Context:
    return build_clone(plan_for(vars, caller), None)[0]


def _is_context_run(fn: object) -> bool:
    """Tell whether ``fn`` is some context's bound ``run`` method (``ctx.run``)."""
    return isinstance(getattr(fn, "__self__", None), contextvars.Context) and (
        getattr(fn, "__name__", None) == "run"
    )


def _without_context_run(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Return the call that ``fn(*args, **kwargs)`` makes inside ``Context.run`` wrappers.

    ``ctx.run(f, *a, **k)`` and ``functools.partial(ctx.run, f, *a, **k)(*b, **j)`` (what
    ``asyncio.to_thread`` submits) both become ``f(*a, *b, **k, **j)``; any other call is
    returned as it is.
    """
    while True:
        wrapper = fn
        # Only functools.partial itself: a subclass may call its function differently.
        if (
            isinstance(wrapper, functools.partial)
            and type(wrapper) is functools.partial
            and _is_context_run(wrapper.func)
            and wrapper.args
        ):
            fn, args = wrapper.args[0], wrapper.args[1:] + args
            kwargs = {**wrapper.keywords, **kwargs}
        elif _is_context_run(fn) and args:
            fn, args = args[0], args[1:]
        else:
            return fn, args, kwargs


def bind(fn: Callable[P, T], *, vars: Iterable[ContextVar[Any]] = ()) -> Callable[P, T]:
    """Return a callable that runs ``fn`` in a span-less clone of the context of this call.

    Semantics:
        The clone is made once, now, as ``clone_without_span(*vars)`` makes it: the values
        ``vars`` and the registered vars have here, the current trace (or a fake trace id). Each
        call of the result runs ``fn(*args, **kwargs)`` in its own copy of that clone, in the
        calling thread, and returns what ``fn`` returns (its exceptions propagate to the
        caller): vars that ``fn`` sets stay in that call. Use it to hand a callback to a thread,
        a sync library's hook or an executor while keeping the request's trace and vars. Nothing
        is supervised: ``bind`` starts nothing by itself (``ctxkit.spawn`` does).

    Args:
        fn: A plain (not ``async``) callable.
        vars: ContextVars to carry, besides the registered ones.

    Returns:
        A callable with ``fn``'s signature (``functools.wraps``).

    Raises:
        TypeError: ``fn`` is not callable or is an async function (its coroutine would run in
            whatever context awaits it: use ``ctxkit.spawn``, or
            ``asyncio.create_task(coro, context=ctxkit.clone_without_span(...))``), or a var is
            not a ContextVar.
    """
    if not callable(fn):
        raise TypeError(f"bind() takes a callable, got {fn!r}")
    if is_async_callable(fn):
        raise TypeError(
            f"bind() takes a plain function, got the async callable {fn!r}: its coroutine would "
            "run in the context of whoever awaits it; use ctxkit.spawn(fn, ...) instead"
        )
    clone = _clone_now(as_var_tuple(vars, "bind"), "bind")

    @functools.wraps(fn)
    def bound(*args: P.args, **kwargs: P.kwargs) -> T:
        return clone.copy().run(fn, *args, **kwargs)

    return bound


class ContextExecutor(ThreadPoolExecutor):
    """A ``concurrent.futures`` executor whose jobs each run in a clone made at ``submit``.

    ``ContextExecutor()`` is a thread pool of its own (a ``ThreadPoolExecutor``, so that
    ``loop.set_default_executor(ctxkit.ContextExecutor())`` accepts it);
    ``ContextExecutor(executor)`` wraps another executor and hands it every job.

    Semantics:
        ``submit(fn, *args, **kwargs)`` clones the submitting context without a span (the
        selected ``vars`` and the registered vars, the trace, a fake id where no span is
        current) and runs ``fn`` in that clone on a worker. So ``loop.run_in_executor(
        ContextExecutor(), fn)``, ``asyncio.to_thread`` with it as the loop's default
        executor, and any ``submit`` keep the caller's trace id and vars, and nothing else; a
        worker thread never runs a job in a context left by an earlier job or inherited when
        the thread started. The worker threads themselves start in an empty context, whatever
        ``sys.flags.thread_inherit_context`` says, so a job's done-callbacks (which run in the
        worker that finished it) see no request's vars or trace, and no request's objects stay
        alive with the pool. A job already wrapped in a context's ``run`` (``ctx.run`` itself,
        or a ``functools.partial`` of it: ``asyncio.to_thread`` submits
        ``partial(copy_context().run, fn, ...)``) is unwrapped, and the function it wraps runs
        in the clone instead of that context: the clone is the whole context of every job, so
        an unselected var (a DB session) never reaches a worker. Pass a var in ``vars`` (or
        register it) to carry it. Errors are the futures' as usual (``Future.result()`` raises
        them). ``shutdown`` shuts down the wrapped executor only if this object created it
        (``executor=None``).

    Args:
        executor: The executor to hand the jobs to; None makes a thread pool.
        vars: ContextVars to carry, besides the registered ones.
        max_workers: For the pool made when ``executor`` is None (``ThreadPoolExecutor``'s).
        thread_name_prefix: Likewise.

    Raises:
        TypeError: ``executor`` is not a ``concurrent.futures.Executor``, or a var is not a
            ContextVar.
    """

    def __init__(
        self,
        executor: Executor | None = None,
        *,
        vars: Iterable[ContextVar[Any]] = (),
        max_workers: int | None = None,
        thread_name_prefix: str = "ctxkit",
    ) -> None:
        if executor is not None and not isinstance(executor, Executor):
            raise TypeError(
                f"executor must be a concurrent.futures.Executor or None, got {executor!r}"
            )
        self._vars = as_var_tuple(vars, "ContextExecutor")
        plan_for(self._vars, "ContextExecutor")  # validate now
        self._wrapped = executor
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)

    def __repr__(self) -> str:
        inner = "its own threads" if self._wrapped is None else repr(self._wrapped)
        return f"<ContextExecutor on {inner} vars={[var.name for var in self._vars]}>"

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        """Schedule ``fn(*args, **kwargs)`` in a clone of the calling context; see the class.

        A ``Context.run`` wrapper around the call (``asyncio.to_thread``'s) is unwrapped: the
        wrapped function runs in the clone, not in the context the wrapper would switch to.
        """
        clone = _clone_now(self._vars, "ContextExecutor.submit")
        call, call_args, call_kwargs = _without_context_run(fn, args, kwargs)
        job: Callable[[], T] = functools.partial(clone.run, call, *call_args, **call_kwargs)
        # Handed over from an empty context: a thread pool starts its worker threads lazily, in
        # submit, and from 3.14 a thread started with sys.flags.thread_inherit_context set runs
        # (and its Thread object keeps) a copy of the context of whoever calls start(). The job
        # runs in its clone anyway; what this keeps out of the worker is the rest of its life:
        # the done-callbacks it calls (Future.set_result runs in the worker's own context) and
        # the objects that context would keep alive as long as the pool. An initializer could
        # not do this: it runs inside the worker's context and can only set vars it knows, never
        # make that context empty. Public submit, not the pool's private _adjust_thread_count,
        # and it also covers a wrapped thread pool's new threads.
        if self._wrapped is not None:
            return contextvars.Context().run(self._wrapped.submit, job)
        return contextvars.Context().run(super().submit, job)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Shut down the pool this object made; a wrapped executor is left running."""
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
