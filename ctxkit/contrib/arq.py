"""arq integration: the enqueuer's ContextVars and trace reach the job, in the worker process.

Install with ``pip install "ctxkit-async[arq]"``. arq has no middleware and no metadata field on
jobs, so one ``CtxkitArq`` object holds the options and instruments both sides: the worker's
functions (in ``WorkerSettings``) and the producer's pool (its ``enqueue_job``)::

    ctxkit_arq = CtxkitArq(vars=(request_id,))

    class WorkerSettings:
        functions = ctxkit_arq.functions(send_email, resize_image)
        redis_settings = RedisSettings()

    redis = ctxkit_arq.instrument(await create_pool(RedisSettings()))
    await redis.enqueue_job("send_email", "to@example.com")

The carrier travels as the job's reserved keyword argument ``_ctxkit`` (``KWARG``): a dict of
strings in ``ctxkit.propagation``'s format, serialised with the job's other arguments. The
worker's wrapper removes it before the function runs, so job functions keep their signatures.
A job from an instrumented producer needs an instrumented worker (an uninstrumented function
would get an unexpected ``_ctxkit`` argument). Importing this module does not import arq.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final
from uuid import uuid4

from opentelemetry import context as otel_context
from opentelemetry import trace

from .._clone import as_var_tuple, check_propagation
from .._logging import logger
from .._w3c import format_traceparent
from ..propagation import PREVIOUS, _check_retries, _owned_keys, _selected, consume
from ._messaging import inject_in_span, send_span

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from opentelemetry import metrics

    from .._trace import Propagation, Retries

__all__ = ["KWARG", "CtxkitArq"]

_SYSTEM: Final = "arq"
#: The job keyword argument that carries the context (removed before the function runs).
KWARG: Final = "_ctxkit"
#: Where a failed attempt leaves its span's ``traceparent`` for the next attempt (plus job id).
PREVIOUS_KEY_PREFIX: Final = "ctxkit:arq:previous:"
#: How long that key lives, in seconds: as long as arq keeps a job's retry count.
_PREVIOUS_TTL: Final = 88400
#: Marks an ``enqueue_job`` this module made.
_WRAPPED: Final = "_ctxkit_wrapped"


class CtxkitArq:
    """Carry ContextVars and the trace from ``enqueue_job`` into the job function, in a worker.

    Semantics:
        Producer (``instrument(pool)``): each ``pool.enqueue_job(name, ...)`` runs in a
        PRODUCER span ``send {name}`` (a child of the current span; ``messaging.system =
        "arq"``, ``messaging.operation.name``/``.type`` ``"send"``,
        ``messaging.destination.name`` the function name, ``messaging.message.id`` the job id,
        which is made here when ``_job_id`` is not given) that is current while arq writes the
        job, and ``inject``-s the trace and the vars into the job's reserved keyword argument
        ``_ctxkit``. The span ends when ``enqueue_job`` returns, with ERROR if it raised (also
        when a var is not JSON-representable, which makes ``enqueue_job`` raise).

        Worker (``functions(...)``): each run of a wrapped function takes ``_ctxkit`` out of
        its keyword arguments and runs inside ``ctxkit.propagation.consume`` of it: the
        CONSUMER span ``process {name}`` (``messaging.message.id`` the job id,
        ``ctxkit.attempt`` arq's ``job_try``), related to the send span as ``propagation``
        says, with the vars set for that run only. arq runs each job in an asyncio task of its
        own, so nothing leaks into the jobs running beside it or after it. A function that
        raises gets ERROR and ``error.type`` (``Retry`` too: that attempt failed). The carrier
        is untrusted: a malformed, oversized or hostile one is ignored, counted in
        ``ctxkit.propagation.rejected`` and logged once per kind, and the job runs as a new
        root; a job without one runs as a new root too.

        Retries: arq runs a retried job (``Retry``, or a job cut off by shutdown) again with
        the same arguments, so the carrier names the first producer span. A failed attempt
        leaves its span's ``traceparent`` in Redis (``ctxkit:arq:previous:{job id}``, expiring
        like arq's retry count), which the next attempt reads: with ``retries="link"``
        (default) each attempt after the first starts a new trace linked to the producer span
        and to the previous attempt's span; ``retries="child"`` relates every attempt to the
        producer span as ``propagation`` says. A Redis error there only loses that link.

    Args:
        vars: ContextVars to carry and to restore, besides the registered ones.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"`` (see ``consume``).
        retries: ``"link"`` (default) or ``"child"``: how attempts after the first relate.
        baggage: Also carry W3C baggage (off by default: jobs are stored in Redis).
        tracer_provider: Where to create spans; None means the global provider.
        meter_provider: Where to count rejected carriers; None means the global provider.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar.
        ValueError: ``propagation`` or ``retries`` is not accepted, or two selected vars share
            a name.
    """

    def __init__(
        self,
        *,
        vars: Iterable[ContextVar[Any]] = (),
        propagation: Propagation = "child",
        retries: Retries = "link",
        baggage: bool = False,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        check_propagation(propagation)
        _check_retries(retries)
        self._vars = as_var_tuple(vars, "CtxkitArq")
        _selected(self._vars, "CtxkitArq")
        self._propagation: Propagation = propagation
        self._retries: Retries = retries
        self._baggage = bool(baggage)
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self._keys = _owned_keys(None, self._baggage)

    # --- producer --------------------------------------------------------------------------------

    def instrument(self, pool: Any) -> Any:
        """Make ``pool.enqueue_job`` (an ``arq.ArqRedis``) send in a span and carry the context.

        Returns ``pool`` itself; instrumenting it again replaces the options.
        """
        enqueue = getattr(pool, "enqueue_job", None)
        if not callable(enqueue):
            raise TypeError(f"instrument() takes an arq ArqRedis pool, got {pool!r}")
        enqueue = getattr(enqueue, _WRAPPED, enqueue)

        async def enqueue_job(
            function: str, *args: Any, _job_id: str | None = None, **kwargs: Any
        ) -> Any:
            job_id = _job_id or uuid4().hex  # what arq does, made here to name the message
            context = contextvars.copy_context()
            send = send_span(self._tracer_provider, context, _SYSTEM, str(function), job_id)
            carrier: dict[str, object] = {}
            inject_in_span(
                send,
                carrier,
                context,
                vars=self._vars,
                baggage=self._baggage,
                meter_provider=self._meter_provider,
                message_id=job_id,
            )
            kwargs[KWARG] = carrier
            assert send.span is not None
            token = otel_context.attach(trace.set_span_in_context(send.span))
            try:
                job = await enqueue(function, *args, _job_id=job_id, **kwargs)
            except BaseException as exc:
                send.end(exc)
                raise
            finally:
                otel_context.detach(token)
            send.end()
            return job

        setattr(enqueue_job, _WRAPPED, enqueue)
        pool.enqueue_job = enqueue_job
        return pool

    # --- worker ----------------------------------------------------------------------------------

    def functions(self, *functions: Any) -> list[Any]:
        """Return arq worker functions that run each of ``functions`` in the carried context.

        Each item is a job coroutine function or an ``arq.worker.Function`` (from
        ``arq.worker.func``); the result goes into ``WorkerSettings.functions``. Names,
        timeouts, ``max_tries`` and the other settings are kept.
        """
        from arq.worker import Function, func  # arq is needed from here on

        wrapped = []
        for item in functions:
            if isinstance(item, Function):
                name, coroutine = item.name, item.coroutine
            elif inspect.iscoroutinefunction(item):
                name, coroutine, item = item.__qualname__, item, func(item)
            else:
                raise TypeError(
                    f"functions() takes coroutine functions or arq Function objects, got {item!r}"
                )
            run: Any = self._wrap(name, coroutine)  # an arq WorkerCoroutine
            wrapped.append(dataclasses.replace(item, coroutine=run))
        return wrapped

    def _wrap(
        self, name: str, coroutine: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(coroutine)
        async def run(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            carrier: object = kwargs.pop(KWARG, {})
            job_id = ctx.get("job_id")
            message_id = job_id if isinstance(job_id, str) else None
            attempt = _attempt(ctx.get("job_try"))
            if attempt > 1 and message_id is not None and isinstance(carrier, Mapping):
                carrier = await _with_previous(ctx, message_id, carrier, self._keys)
            try:
                scope = consume(
                    carrier,
                    name,
                    vars=self._vars,
                    propagation=self._propagation,
                    system=_SYSTEM,
                    baggage=self._baggage,
                    tracer_provider=self._tracer_provider,
                    meter_provider=self._meter_provider,
                    message_id=message_id,
                    attempt=attempt,
                    retries=self._retries,
                )
                span = scope.__enter__()
            except Exception:  # e.g. a var registered later with a clashing name
                logger.exception(
                    "ctxkit could not restore the context of arq job %r; it runs without it", name
                )
                return await coroutine(ctx, *args, **kwargs)
            try:
                result = await coroutine(ctx, *args, **kwargs)
            except Exception as exc:
                if message_id is not None:
                    await _leave_previous(ctx, message_id, span)
                scope.__exit__(type(exc), exc, exc.__traceback__)
                raise
            except BaseException as exc:
                scope.__exit__(type(exc), exc, exc.__traceback__)
                raise
            scope.__exit__(None, None, None)
            return result

        return run


def _attempt(job_try: object) -> int:
    """Return the attempt number from arq's ``job_try`` (1 if absent or bad)."""
    if isinstance(job_try, int) and not isinstance(job_try, bool) and 1 <= job_try < 10**9:
        return job_try
    return 1


async def _leave_previous(ctx: Mapping[str, Any], job_id: str, span: trace.Span) -> None:
    """Keep the failed attempt's span in Redis for the next attempt to link to."""
    context = span.get_span_context()
    redis = ctx.get("redis")
    if not context.is_valid or redis is None:
        return
    try:
        await redis.setex(PREVIOUS_KEY_PREFIX + job_id, _PREVIOUS_TTL, format_traceparent(context))
    except Exception:
        logger.warning("ctxkit could not keep the span of failed arq job %r", job_id, exc_info=True)


async def _with_previous(
    ctx: Mapping[str, Any], job_id: str, carrier: Mapping[str, Any], keys: frozenset[str]
) -> Mapping[str, Any]:
    """Return the ``keys`` of ``carrier``, with the previous attempt's span as ``PREVIOUS``.

    Only the keys ctxkit reads are copied: a hostile carrier's size costs nothing here.
    """
    redis = ctx.get("redis")
    if redis is None:
        return carrier
    try:
        value = await redis.get(PREVIOUS_KEY_PREFIX + job_id)
    except Exception:
        logger.warning("ctxkit could not read the previous attempt of arq job %r", job_id)
        return carrier
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        return carrier
    fixed = {key: carrier[key] for key in keys if key in carrier}
    fixed[PREVIOUS] = value  # validated like any carrier value when read
    return fixed
