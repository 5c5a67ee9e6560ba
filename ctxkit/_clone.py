"""Cloning: build a detached ``contextvars.Context`` from a source context.

A clone holds the selected ContextVars (those passed plus the registered ones) with the values
they have in the source, the source's OpenTelemetry span context and baggage (nothing else of
its OpenTelemetry context), and a fake trace id when no valid span is current. This module owns
the registry of always-carried vars and the small caches that make repeated clones of an
unchanged source cost one ``Context.copy()``.
"""

from __future__ import annotations

import weakref
from contextvars import Context, ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace

from ._trace import (
    PROPAGATIONS,
    detached_otel_context,
    dropped_like,
    fake_trace_id_var,
    get_tracer,
    new_fake_trace_id,
    start_span,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from ._trace import Propagation

__all__ = [
    "build_clone",
    "check_propagation",
    "clone",
    "clone_without_span",
    "plan_for",
    "plans",
    "register",
    "registered",
    "selection",
    "unregister",
]

T = TypeVar("T")

_MISSING: Final = object()
_MARKER_NAME: Final = "ctxkit.clone"
_MARKER_ATTRIBUTES: Final = {"ctxkit.async": True}

#: The ContextVars every clone carries; replaced as a whole on change, so reading is lock-free.
_registered: tuple[ContextVar[Any], ...] = ()

# Each plan's ``cache`` (replaced as a whole tuple: safe to read from any thread) keeps the most
# recent span-less clone's *selected* values (and its span and baggage) alive until the next
# clone with the same selection; values that were not selected are never referenced.
# docs/cloning.md says so.


def _check_vars(vars: Iterable[object], caller: str) -> None:
    for var in vars:
        if not isinstance(var, ContextVar):
            raise TypeError(
                f"{caller}() takes contextvars.ContextVar objects, got {var!r}; "
                "pass the ContextVar itself, not its value or its name"
            )


def check_propagation(propagation: object, accepted: tuple[str, ...] = PROPAGATIONS) -> None:
    """Raise ``ValueError`` unless ``propagation`` is one of ``accepted``."""
    if propagation not in accepted:
        raise ValueError(
            f"propagation must be one of {', '.join(map(repr, accepted))}, got {propagation!r}"
        )


def register(*vars: ContextVar[Any]) -> None:
    """Make every clone carry these ContextVars, on top of the ones passed to each call.

    Registering a var that is already registered does nothing. Registration is process-wide;
    call it at import time of the module that owns the var (a request id, a tenant id).

    Raises:
        TypeError: An argument is not a ``contextvars.ContextVar``.
        ValueError: Another registered var has the same ``name`` (names identify vars in
            job metadata, see ``ctxkit.propagation``).
    """
    global _registered
    _check_vars(vars, "register")
    result = list(_registered)
    for var in vars:
        if var in result:
            continue
        for other in result:
            if other.name == var.name:
                raise ValueError(
                    f"cannot register {var!r}: the registered {other!r} has the same name "
                    f"{var.name!r}; give each carried ContextVar a unique name"
                )
        result.append(var)
    _registered = tuple(result)
    plans.clear()


def unregister(*vars: ContextVar[Any]) -> None:
    """Stop carrying these ContextVars in every clone; vars not registered are ignored.

    Raises:
        TypeError: An argument is not a ``contextvars.ContextVar``.
    """
    global _registered
    _check_vars(vars, "unregister")
    _registered = tuple(var for var in _registered if var not in vars)
    plans.clear()


def registered() -> tuple[ContextVar[Any], ...]:
    """Return the registered ContextVars, in registration order."""
    return _registered


def selection(vars: tuple[object, ...], caller: str) -> tuple[ContextVar[Any], ...]:
    """Validate ``vars`` and return them followed by the registered ones, without repeats."""
    if not vars:
        return _registered
    _check_vars(vars, caller)
    if _registered or len(vars) > 1:
        return tuple(dict.fromkeys((*vars, *_registered)))  # type: ignore[arg-type]
    return vars  # type: ignore[return-value]


class _Plan:
    """What is worked out once per selection: a reader of its vars, and its clone cache.

    ``current()`` is the hot path of ``clone_without_span()`` and ``spawn(span=False)``: it
    reads the selected vars and the OpenTelemetry context of the calling context, and when
    they are the very objects the plan's last span-less clone was made from -- and so is the
    fake trace id, where that clone has no valid span (a clone with one carries no fake id,
    so the fake id is not even read then) --, returns a copy of that clone
    (``Context.copy()`` is O(1)); otherwise it builds one and keeps it in ``cache``, the one
    cache of the clone path.

    ``read``, ``fill`` and ``current`` are straight-line code generated for the selection (as
    ``dataclasses`` does for ``__init__``), for every size, with no loop version beside them:
    reading k ContextVars in a Python loop costs several times what k unrolled ``.get()``
    calls cost, on every spawn (benchmarks/RESULTS.md, "Decisions measured outside the
    suite").
    """

    __slots__ = ("cache", "current", "fill", "read", "registered", "valid_span_context", "vars")

    def __init__(self, selected: tuple[ContextVar[Any], ...]) -> None:
        self.vars = selected
        #: The registered vars when the plan was made (``register()`` drops every plan).
        self.registered = _registered
        # (values, the source OTel context -- itself when the clone holds it anyway, else a
        # weak reference --, source fake id or _VALID when the clone has a valid span, clone,
        # its span context, whether each copy needs a new fake id) of the last span-less clone.
        self.cache: (
            tuple[
                tuple[object, ...],
                otel_context.Context | weakref.ref[otel_context.Context],
                object,  # str | None, or _VALID
                Context,
                trace.SpanContext,
                bool,
            ]
            | None
        ) = None
        #: The span context of ``cache``'s clone when it is valid, else None: a caller that
        #: got that very object from ``current()`` knows it is valid without asking.
        self.valid_span_context: trace.SpanContext | None = None
        count = len(selected)
        names = [f"_v{i}" for i in range(count)]
        defaults = "".join(f"{name}={name}, " for name in names)
        gets = "".join(f"{name}.get(_M), " for name in names)
        reads = "".join(f"    a{i} = _v{i}.get(_M)\n" for i in range(count))
        values = "".join(f"a{i}, " for i in range(count))
        hits = "".join(f" and v[{i}] is a{i}" for i in range(count))
        sets = "".join(
            f"    a = v[{i}]\n    if a is not _M:\n        _v{i}.set(a)\n" for i in range(count)
        )
        source = (
            f"def read({defaults}_M=_M):\n"
            f"    return ({gets})\n"
            f"def fill(v, o, f, {defaults}_M=_M, _A=_A, _F=_F):\n"
            f"{sets}"
            f"    _A(o)\n"
            f"    if f is not None:\n"
            f"        _F.set(f)\n"
            f"def current({defaults}_M=_M, _P=_P, _O=_O, _F=_F, _B=_B, _N=_N, _W=_W, _V=_V):\n"
            f"{reads}"
            f"    o = _O()\n"
            f"    c = _P.cache\n"
            f"    if c is not None:\n"
            f"        v = c[0]\n"
            f"        k = c[1]\n"
            f"        if (k is o or (type(k) is _W and k() is o)){hits}:\n"
            f"            f = c[2]\n"
            f"            if f is _V:\n"
            f"                return c[3].copy(), c[4]\n"
            f"            if f is _F.get(None):\n"
            f"                if c[5]:\n"
            f"                    return _N(c[3]), c[4]\n"
            f"                return c[3].copy(), c[4]\n"
            f"    return _B(_P, ({values}), o, _F.get(None))\n"
        )
        namespace: dict[str, Any] = dict(zip(names, selected, strict=True))
        namespace.update(
            _M=_MISSING,
            _P=self,
            _O=get_current,
            _F=fake_var,
            _B=_build_current,
            _N=_with_new_fake,
            _W=weakref.ReferenceType,
            _V=_VALID,
            _A=otel_context.attach,  # the clone is private: its token is never needed
        )
        exec(source, namespace)  # the code is built from integers only, never from user text
        #: The selected vars' values in the calling context (``_MISSING`` where unset).
        self.read: Callable[[], tuple[object, ...]] = namespace["read"]
        #: Set up a new, empty clone, run in it: the selected vars that have a value in
        #: ``v`` (as ``read`` returned them), the OpenTelemetry context ``o``, the fake id ``f``.
        self.fill: Callable[[tuple[object, ...], otel_context.Context, str | None], None] = (
            namespace["fill"]
        )
        #: The span-less clone of the calling context and the span context current in it: a
        #: copy of ``cache``'s clone when the vars, OTel context and fake id are the very
        #: objects it was made from, else a new one (kept in ``cache``).
        self.current: Callable[[], tuple[Context, trace.SpanContext]] = namespace["current"]


get_current: Final = otel_context.get_current
#: In a plan's cache instead of the fake id: the clone has a valid span and no fake id.
_VALID: Final = object()
fake_var: Final = fake_trace_id_var
_MAX_PLANS: Final = 256
#: The plan of each ``vars=`` tuple as callers pass it (the registered vars are added to it);
#: emptied whenever the registered vars change. ``plan_for`` fills and reads it.
plans: dict[tuple[ContextVar[Any], ...], _Plan] = {}


def plan_for(vars: Iterable[ContextVar[Any]], caller: str) -> _Plan:
    """Return the plan of ``selection(vars)`` (``vars``: spawn's ``vars=`` option, any iterable).

    Every shape takes the same path: a list (or any iterable) is looked up as the tuple of its
    items, so it finds the plan its tuple made (one cache, keyed by tuples).
    """
    key = vars if type(vars) is tuple else as_var_tuple(vars, caller)
    try:
        return plans[key]
    except (KeyError, TypeError):  # new, or holding something unhashable: check it
        return _new_plan(key, caller)


def _new_plan(vars: Iterable[ContextVar[Any]], caller: str) -> _Plan:
    given = as_var_tuple(vars, caller)
    selected = selection(given, caller)
    plan = plans.get(given)
    if plan is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        plan = plans[given] = _Plan(selected)
        if plan.registered is not _registered:  # register() ran meanwhile, in another thread
            plans.pop(given, None)
    return plan


def as_var_tuple(vars: Iterable[ContextVar[Any]], caller: str) -> tuple[ContextVar[Any], ...]:
    """Return ``vars`` as a tuple, with a helpful error for a lone var or a non-iterable."""
    if type(vars) is tuple:
        return vars
    given: object = vars  # typed as an iterable, but callers pass a lone var by mistake
    if isinstance(given, ContextVar):
        raise TypeError(
            f"{caller}() takes vars= as an iterable of ContextVars, got the ContextVar {vars!r}; "
            "pass vars=(var,)"
        )
    try:
        return tuple(vars)
    except TypeError:
        raise TypeError(
            f"{caller}() takes vars= as an iterable of ContextVars, got {vars!r}"
        ) from None


def _read(
    plan: _Plan, source: Context
) -> tuple[tuple[object, ...], otel_context.Context, str | None]:
    """Return the selected vars' values, the OTel context and the fake id of ``source``."""
    return _run_in(source, _read_current, plan)


def _read_current(plan: _Plan) -> tuple[tuple[object, ...], otel_context.Context, str | None]:
    return plan.read(), get_current(), fake_var.get(None)


def _run_in(source: Context, fn: Callable[..., T], *args: object) -> T:
    """Run ``fn(*args)`` in ``source``, also when ``source`` is entered already.

    A context that is entered (the caller's own, as ``asyncio.current_task().get_context()``
    returns it) cannot be run again; a copy of it holds the same values and can.

    Raises:
        TypeError: ``source`` is not a ``contextvars.Context``.
    """
    if not isinstance(source, Context):
        raise TypeError(
            f"context must be a contextvars.Context or None, got {source!r}; "
            "use contextvars.copy_context() to capture one"
        )
    try:
        return source.run(fn, *args)
    except RuntimeError:
        return source.copy().run(fn, *args)


def otel_of(source: Context) -> otel_context.Context:
    """Return the OpenTelemetry context current in ``source``, without changing anything.

    Raises:
        TypeError: ``source`` is not a ``contextvars.Context``.
    """
    return _run_in(source, get_current)


def _make_current(span: trace.Span) -> None:
    otel_context.attach(trace.set_span_in_context(span))  # the clone is private: no detach


def _build_current(
    plan: _Plan, values: tuple[object, ...], otel_src: otel_context.Context, fake: str | None
) -> tuple[Context, trace.SpanContext]:
    """Build the span-less clone of a source with these selected values, OTel context, fake id.

    The clone is kept in ``plan.cache`` when the next clone of the same source may reuse it.
    """
    current = trace.get_current_span(otel_src)
    span_context = current.get_span_context()
    otel = detached_otel_context(otel_src)
    valid = span_context.is_valid
    result = Context()
    result.run(plan.fill, values, otel, None if valid else fake)
    # No trace at all (no valid span, no fake id): each clone gets a fake trace id of its own,
    # so the cached clone has none and each reuse adds a new one.
    traceless = not valid and fake is None
    # The source's OTel context is the cache key: held as it is when the clone holds it
    # anyway, else weakly (the cache never keeps the rest of a request's context alive).
    key = otel if otel is otel_src else weakref.ref(otel_src)
    plan.valid_span_context = span_context if valid else None
    plan.cache = (values, key, _VALID if valid else fake, result, span_context, traceless)
    if traceless:
        return _with_new_fake(result), span_context
    return result.copy(), span_context


def _with_new_fake(base: Context) -> Context:
    """Return a copy of ``base`` with a new fake trace id."""
    result = base.copy()
    result.run(fake_var.set, new_fake_trace_id())
    return result


def build_clone(
    plan: _Plan,
    source: Context | None,
    span: trace.Span | None = None,
    propagation: Propagation = "child",
) -> tuple[Context, trace.SpanContext]:
    """Build a clone of ``source`` (None: the current context) carrying ``plan.vars``.

    With ``span`` None the clone keeps the source's current span (``clone_without_span``);
    otherwise ``span`` becomes current in it, unless it is invalid (a no-op tracer), in which
    case a ``"child"`` clone keeps the source's span and other modes keep no span, or unless the
    sampler dropped it as the source's span was (``dropped_like``), in which case the source's
    span stays current: spans started in the clone are sampled alike, with the same trace id.

    Returns:
        The clone, and the span context current in it (invalid when only a fake id is there).
    """
    if source is None:
        if span is None:
            return plan.current()
        span_context = span.get_span_context()
        if span_context.is_valid:
            # The span-less clone of the caller (usually a cached one) with ``span`` made
            # current in it: same vars, baggage and fake id, one OpenTelemetry entry changed.
            result, parent = plan.current()
            if dropped_like(span, span_context, parent):
                return result, parent  # sampled out as the caller's span: it stands in
            if parent.is_valid:  # else the clone got a fake id it does not need: build anew
                result.run(_make_current, span)
                return result, span_context
        values = plan.read()
        otel_src = get_current()
        fake = fake_var.get(None)
    else:
        values, otel_src, fake = _read(plan, source)
        if span is None:
            return _build_current(plan, values, otel_src, fake)
    current: trace.Span = trace.get_current_span(otel_src)
    span_context = span.get_span_context()
    if span_context.is_valid:
        if not dropped_like(span, span_context, current.get_span_context()):
            current = span
    elif propagation != "child":
        current = trace.INVALID_SPAN
    otel = detached_otel_context(otel_src, current)
    span_context = current.get_span_context()
    if span_context.is_valid:
        fake = None  # the span's trace id is the one the clone's logs show
    elif fake is None:
        fake = new_fake_trace_id()
    result = Context()
    result.run(plan.fill, values, otel, fake)
    return result, span_context


def clone_without_span(*vars: ContextVar[Any], context: Context | None = None) -> Context:
    """Return a detached Context carrying ``vars``, the registered vars and the trace, no span.

    Semantics:
        The result holds, for each ContextVar in ``vars`` plus the registered ones, the value
        it has in the source (``context``, else the current context) when it is set there;
        every other ContextVar is unset in it. It holds the source's current OpenTelemetry span
        and its baggage, and no other entry of the source's OpenTelemetry context. Spans started
        in it are children of the source's current span, and ``current_trace_id()`` in it is the
        source's trace id. When the source has no valid span, the clone carries the source's
        fake trace id, or a newly generated one; when it has one, the clone carries no fake id
        (only the span's trace id is ever shown there).

        The clone is a new ``contextvars.Context``: setting a var inside it never changes the
        source, and nothing in it can cancel work run in it. Run work in it with
        ``asyncio.create_task(coro, context=...)``, anyio's ``TaskGroup.create_task(coro,
        context=...)``, ``trio.lowlevel.spawn_system_task(fn, context=...)`` or
        ``ctx.run(fn)``; or let ``ctxkit.spawn`` do all of it.

    Args:
        *vars: ContextVars to carry, besides the registered ones.
        context: The source context; None means the calling one.

    Returns:
        A new ``contextvars.Context``; each call returns a distinct object.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar, or ``context`` is not a Context.
    """
    try:
        plan = plans[vars]  # plan_for's first case, inlined (the hot path)
    except (KeyError, TypeError):  # new, or an unhashable element: check it
        plan = _new_plan(vars, "clone_without_span")
    if context is None:
        return plan.current()[0]
    return build_clone(plan, context)[0]


def clone(
    *vars: ContextVar[Any],
    context: Context | None = None,
    propagation: Propagation = "child",
    tracer_provider: trace.TracerProvider | None = None,
) -> Context:
    """Return a detached Context carrying ``vars``, the registered vars and a marker span.

    Semantics:
        Like ``clone_without_span``, and it also marks the fork with one span named
        ``ctxkit.clone``, kind INTERNAL, attribute ``ctxkit.async = True``. The marker is
        already ended when ``clone()`` returns and is the current span in the returned
        context, so spans started there are its children (unless the sampler dropped it as it
        did the source's span: then the source's span stays current, under which they are
        sampled alike). The caller's current span and context are never changed.

        - ``propagation="child"``: the marker is a child of the source's current span (same
          trace id), or a root when no span is active.
        - ``propagation="link"``: the marker starts a new trace and has one span link to the
          source's current span, when that span is valid -- for long-running or fanned-out
          work that should not stretch the request's trace.
        - ``propagation="none"``: the marker starts a new trace with no link.

        When the marker is invalid (tracing is a no-op), a ``"child"`` clone keeps the
        source's span; when no valid span ends up current, the clone carries the source's
        fake trace id or a newly generated one, for log correlation only (and no fake id
        when a valid span does).

    Args:
        *vars: ContextVars to carry, besides the registered ones.
        context: The source context; None means the calling one.
        propagation: ``"child"`` (default), ``"link"`` or ``"none"``.
        tracer_provider: Where to create the marker span; None means the global provider.

    Returns:
        A new ``contextvars.Context``.

    Raises:
        TypeError: An element of ``vars`` is not a ContextVar, or ``context`` is not a Context.
        ValueError: ``propagation`` is not one of the accepted strings.
    """
    check_propagation(propagation)
    plan = plan_for(vars, "clone")
    source_otel = otel_context.get_current() if context is None else otel_of(context)
    marker = start_span(
        get_tracer(tracer_provider),
        _MARKER_NAME,
        source_otel,
        propagation,
        attributes=_MARKER_ATTRIBUTES,
    )
    marker.end()
    return build_clone(plan, context, marker, propagation)[0]
