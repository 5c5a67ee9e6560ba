"""procrastinate integration: the deferrer's ContextVars and trace reach the job, in a worker.

Install with ``pip install "ctxkit-async[procrastinate]"`` and instrument the app that defers
jobs and the one the worker runs (usually the same object), before the worker starts::

    app = procrastinate.App(connector=PsycopgConnector())
    instrument(app, vars=(request_id,))

procrastinate jobs have no free-form metadata field, so the carrier (``ctxkit.propagation``'s
format: a JSON object of strings) travels as the reserved task keyword argument ``_ctxkit``
(``CARRIER_KWARG``) in the job's ``args`` column. The worker takes it out of the job's keyword
arguments before any task middleware or the task function runs, so task signatures do not
change. See ``docs/procrastinate.md`` for what that means for queueing locks, job listings and
workers that are not instrumented.
"""

from __future__ import annotations

import contextvars
import json
import weakref
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace

try:
    import procrastinate
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ctxkit.contrib.procrastinate needs procrastinate; install it with "
        'pip install "ctxkit-async[procrastinate]"'
    ) from exc

from .._clone import as_var_tuple, check_propagation
from .._logging import logger
from .._trace import get_tracer, mark_error
from ..propagation import _check_retries, _owned_keys, _selected, consume, inject

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable

    from opentelemetry import metrics
    from procrastinate import JobContext
    from procrastinate.jobs import Job
    from procrastinate.worker import Worker

    from .._trace import Propagation, Retries

__all__ = ["CARRIER_KWARG", "instrument"]

#: The task keyword argument the carrier travels in (reserved: a user's value is replaced).
CARRIER_KWARG: Final = "_ctxkit"
_SYSTEM: Final = "procrastinate"
#: Writes a failed attempt's carrier into its job row, for the retry to link to. The carrier
#: is a JSON string cast by PostgreSQL, so it reads the same through every connector.
_SAVE_CARRIER: Final = (
    "UPDATE procrastinate_jobs SET args = jsonb_set(args, %(path)s::text[], %(carrier)s::jsonb) "
    "WHERE id = %(job_id)s"
)


@dataclass(frozen=True)
class _Config:
    vars: tuple[ContextVar[Any], ...]
    propagation: Propagation
    retries: Retries
    baggage: bool
    tracer_provider: trace.TracerProvider | None
    meter_provider: metrics.MeterProvider | None
    keys: frozenset[str]


_configs: weakref.WeakKeyDictionary[procrastinate.App, _Config] = weakref.WeakKeyDictionary()


def instrument(
    app: procrastinate.App,
    *,
    vars: Iterable[ContextVar[Any]] = (),
    propagation: Propagation = "child",
    retries: Retries = "link",
    baggage: bool = False,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Carry ContextVars and the trace from every defer of ``app`` into the job a worker runs.

    Semantics:
        Producer: every job deferred through ``app`` (``defer``, ``defer_async``,
        ``batch_defer``, ``batch_defer_async``, ``configure(...).defer``) is inserted inside a
        PRODUCER span ``send {task name}`` -- a child of the current span, with
        ``messaging.system = "procrastinate"``, ``messaging.operation.name`` and ``.type``
        ``"send"``, ``messaging.destination.name`` the task name, ``ctxkit.queue`` the queue,
        and, once PostgreSQL has given it, ``messaging.message.id`` the job id. The span's
        ``ctxkit.propagation.inject`` of the trace and the vars goes into the job's keyword
        arguments under ``CARRIER_KWARG`` (``"_ctxkit"``): a JSON object of strings, bounded
        as ``inject`` bounds it, never pickled. A single job is inserted with its send span
        current; a batch gets one span per job. A var that is not JSON-representable, or vars
        over the size limit, make the defer raise ``TypeError``/``ValueError`` before
        anything is inserted. The span ends when the insert returns, with ERROR if it raised
        (``AlreadyEnqueued`` included). Periodic jobs, deferred by the worker itself, carry
        nothing and run as new roots.

        Worker: ``instrument`` puts a worker middleware first in
        ``app.worker_defaults["worker_middleware"]``, so workers made by ``app`` afterwards
        (``procrastinate worker``, ``run_worker``) wrap every job in it; a worker given its own
        ``worker_middleware=`` list replaces the defaults and must include it. For each job it takes
        ``CARRIER_KWARG`` out of the job's keyword arguments while the job runs (the task never sees
        it; it is put back after) and runs the job inside ``ctxkit.propagation.consume`` of it: the
        CONSUMER span ``process {task name}`` (``messaging.system = "procrastinate"``,
        ``messaging.message.id`` the job id, ``ctxkit.queue``, ``ctxkit.attempt`` the job's
        ``attempts + 1``), related to the send span as ``propagation`` says, with the vars set only
        for that job -- async tasks and sync ones (run in a thread, which gets a copy of the
        context) -- and reset after it, so nothing leaks into the next job of the worker. A job that
        raises gets status ERROR and ``error.type``; the exception goes on to procrastinate
        unchanged. The carrier is untrusted: a missing, malformed, oversized or hostile one never
        fails the job -- it runs as a new root and the rejection is counted and logged once.

        Retries: with ``retries="link"`` (default) a failing attempt that the task's retry
        strategy will retry writes its own carrier into the job row (``ctxkit-producer``: the
        first send span, ``ctxkit-previous``: this attempt's span), and the next attempt
        starts a new trace linked to both; if that write fails the retry links to the first
        send span only. ``retries="child"`` relates every attempt to the first send span as
        ``propagation`` says, and writes nothing.

        Calling ``instrument`` again on the same app only replaces the options.

    Args:
        app: The procrastinate ``App``, on the deferring side and in the worker.
        vars: ContextVars to carry and to restore, besides the registered ones.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"`` (see ``consume``).
        retries: ``"link"`` (default) or ``"child"``: how attempts after the first relate.
        baggage: Also carry W3C baggage (off by default: job arguments are stored durably).
        tracer_provider: Where to create spans; None means the global provider.
        meter_provider: Where to count rejected carriers; None means the global provider.

    Raises:
        TypeError: ``app`` is not a procrastinate ``App``, or an element of ``vars`` is not
            a ContextVar.
        ValueError: ``propagation`` or ``retries`` is not accepted, or two selected vars share
            a name.
    """
    if not isinstance(app, procrastinate.App):
        raise TypeError(f"instrument() takes a procrastinate.App, got {app!r}")
    check_propagation(propagation)
    _check_retries(retries)
    selected = as_var_tuple(vars, "instrument")
    _selected(selected, "instrument")
    first = app not in _configs
    _configs[app] = _Config(
        selected,
        propagation,
        retries,
        bool(baggage),
        tracer_provider,
        meter_provider,
        _owned_keys(None, bool(baggage)),
    )
    if first:
        _instrument_deferrer(app)
        _instrument_worker(app)


def _config_of(ref: weakref.ref[procrastinate.App]) -> tuple[procrastinate.App, _Config] | None:
    """Return an instrumented app and its options (registered before any wrapper exists)."""
    app = ref()
    return None if app is None else (app, _configs[app])


# --- producer ------------------------------------------------------------------------------------


def _instrument_deferrer(app: procrastinate.App) -> None:
    """Make ``app.job_manager`` insert jobs inside send spans, with the carrier in their args.

    Every defer path of procrastinate (single or batch, sync or async) goes through the job
    manager's ``batch_defer_jobs``/``batch_defer_jobs_async``: the instance gets wrappers.
    """
    manager = app.job_manager
    inner_async = manager.batch_defer_jobs_async
    inner_sync = manager.batch_defer_jobs
    ref = weakref.ref(app)

    async def batch_defer_jobs_async(jobs: list[Job], connection: Any | None = None) -> list[Job]:
        found = _config_of(ref)
        if found is None:  # pragma: no cover - the manager outlived its app
            return await inner_async(jobs=jobs, connection=connection)
        sends = _Sends(found[1], jobs)
        token = sends.attach()
        try:
            deferred = await inner_async(jobs=sends.jobs, connection=connection)
        except BaseException as exc:
            sends.end(exc)
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
        sends.end(None, deferred)
        return deferred

    def batch_defer_jobs(jobs: list[Job], connection: Any | None = None) -> list[Job]:
        found = _config_of(ref)
        if found is None:  # pragma: no cover - the manager outlived its app
            return inner_sync(jobs=jobs, connection=connection)
        sends = _Sends(found[1], jobs)
        token = sends.attach()
        try:
            deferred = inner_sync(jobs=sends.jobs, connection=connection)
        except BaseException as exc:
            sends.end(exc)
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
        sends.end(None, deferred)
        return deferred

    manager.batch_defer_jobs_async = batch_defer_jobs_async  # type: ignore[method-assign]
    manager.batch_defer_jobs = batch_defer_jobs  # type: ignore[method-assign]


class _Sends:
    """The send spans of one insert, and the jobs carrying their context."""

    __slots__ = ("jobs", "spans")

    def __init__(self, config: _Config, jobs: list[Job]) -> None:
        tracer = get_tracer(config.tracer_provider)
        self.spans: list[trace.Span] = []
        self.jobs: list[Job] = []
        try:
            for job in jobs:
                span = tracer.start_span(
                    f"send {job.task_name}",
                    kind=trace.SpanKind.PRODUCER,
                    attributes={
                        "messaging.system": _SYSTEM,
                        "messaging.operation.name": "send",
                        "messaging.operation.type": "send",
                        "messaging.destination.name": job.task_name,
                        "ctxkit.queue": job.queue,
                    },
                )
                self.spans.append(span)
                # Inject from a private copy where the send span is current: nothing is
                # attached to the caller's context here.
                context = contextvars.copy_context()
                context.run(otel_context.attach, trace.set_span_in_context(span))
                carrier: dict[str, str] = inject(
                    {},
                    vars=config.vars,
                    context=context,
                    baggage=config.baggage,
                    meter_provider=config.meter_provider,
                )
                self.jobs.append(
                    job.evolve(task_kwargs={**job.task_kwargs, CARRIER_KWARG: carrier})
                )
        except BaseException as exc:
            self.end(exc)
            raise

    def attach(self) -> Token[otel_context.Context] | None:
        """Make the send span current for the insert of a single job; return the token."""
        if len(self.spans) != 1:
            return None
        return otel_context.attach(trace.set_span_in_context(self.spans[0]))

    def end(self, exc: BaseException | None, deferred: list[Job] | None = None) -> None:
        for index, span in enumerate(self.spans):
            if exc is not None:
                mark_error(span, exc)
            elif deferred is not None and index < len(deferred):
                job_id = deferred[index].id
                if job_id is not None:
                    span.set_attribute("messaging.message.id", str(job_id))
            span.end()
        self.spans = []


# --- worker --------------------------------------------------------------------------------------


def _instrument_worker(app: procrastinate.App) -> None:
    """Put the worker middleware first in the app's worker defaults."""
    ref = weakref.ref(app)

    async def ctxkit_worker_middleware(
        call_next: Callable[[], Awaitable[Any]], context: JobContext, worker: Worker
    ) -> Any:
        found = _config_of(ref)
        if found is None:  # pragma: no cover - a worker outlived its app
            return await call_next()
        app, config = found
        job = context.job
        kwargs = job.task_kwargs
        if not isinstance(kwargs, dict) or CARRIER_KWARG not in kwargs:
            return await _process(config, app, job, {}, call_next)
        # The worker calls the task with this very dict: take the carrier out of it for the
        # job's run, and put it back after, leaving the job as it was found (a connector may
        # keep the dict itself as the stored row, as procrastinate's in-memory one does).
        carrier = kwargs.pop(CARRIER_KWARG)
        try:
            return await _process(config, app, job, carrier, call_next)
        finally:
            kwargs[CARRIER_KWARG] = carrier

    defaults = app.worker_defaults
    middlewares = list(defaults.get("worker_middleware") or [])
    middlewares.insert(0, ctxkit_worker_middleware)
    defaults["worker_middleware"] = middlewares


async def _process(
    config: _Config,
    app: procrastinate.App,
    job: Job,
    carrier: object,
    call_next: Callable[[], Awaitable[Any]],
) -> Any:
    message_id = None if job.id is None else str(job.id)
    try:
        scope = consume(
            carrier,
            job.task_name,
            vars=config.vars,
            propagation=config.propagation,
            system=_SYSTEM,
            baggage=config.baggage,
            tracer_provider=config.tracer_provider,
            meter_provider=config.meter_provider,
            attributes={"ctxkit.queue": job.queue},
            message_id=message_id,
            attempt=_attempt(job),
            retries=config.retries,
        )
        scope.__enter__()
    except Exception:  # e.g. a var registered later with a clashing name
        logger.exception(
            "ctxkit could not restore the context of procrastinate job %r; it runs without it",
            job.task_name,
        )
        return await call_next()
    try:
        result = await call_next()
    except BaseException as exc:
        try:
            # Not for a cancelled job (a worker shutting down): nothing is awaited then.
            if config.retries == "link" and isinstance(exc, Exception) and message_id is not None:
                await _save_retry_carrier(config, app, job, exc, message_id)
        finally:
            scope.__exit__(type(exc), exc, exc.__traceback__)
        raise
    scope.__exit__(None, None, None)
    return result


async def _save_retry_carrier(
    config: _Config, app: procrastinate.App, job: Job, exc: BaseException, message_id: str
) -> None:
    """Write this attempt's carrier into the job row if the task's strategy retries it."""
    task = app.tasks.get(job.task_name)
    try:
        if task is None or task.get_retry_exception(exception=exc, job=job) is None:
            return
        carrier: dict[str, str] = inject(
            {},
            vars=config.vars,
            baggage=config.baggage,
            meter_provider=config.meter_provider,
            message_id=message_id,
        )
        await app.connector.execute_query_async(
            _SAVE_CARRIER,
            path="{" + CARRIER_KWARG + "}",
            carrier=json.dumps(carrier),
            job_id=job.id,
        )
    except Exception:
        logger.warning(
            "ctxkit could not save the context of procrastinate job %s for its retry; the "
            "retry links to the first producer only",
            message_id,
            exc_info=True,
        )


def _attempt(job: Job) -> int:
    attempts = job.attempts
    if isinstance(attempts, int) and not isinstance(attempts, bool) and attempts >= 0:
        return attempts + 1
    return 1
