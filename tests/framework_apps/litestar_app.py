"""A Litestar app: BackgroundTask(s) on responses, async and sync handlers, CtxkitPlugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Litestar, Response, get
from litestar.background_tasks import BackgroundTask, BackgroundTasks
from litestar.middleware.base import DefineMiddleware

from ctxkit.contrib.litestar import CtxkitPlugin

from ._common import (
    DRAIN_TIMEOUT,
    MODE,
    PROPAGATION,
    SELECTED,
    TIMEOUT,
    ServerSpan,
    areport_vars,
    enter_request,
    on_error,
    report_vars,
    setup_telemetry,
    slow,
    task_fail,
    task_hang,
    task_ok,
    task_ok_sync,
)

if TYPE_CHECKING:
    from litestar.types import ControllerRouterHandler

setup_telemetry()


@get("/mixed")
async def mixed(label: str) -> Response[dict[str, str]]:
    tasks = [
        BackgroundTask(task_ok, f"{label}-a"),
        BackgroundTask(task_fail, f"{label}-b"),
        BackgroundTask(task_ok_sync, f"{label}-c"),
        BackgroundTask(task_hang, f"{label}-d"),
    ]
    return Response({"ok": label}, background=BackgroundTasks(tasks))


@get("/sync", sync_to_thread=True)
def sync_vars(label: str) -> Response[dict[str, str]]:
    enter_request(label)
    tasks = [
        BackgroundTask(report_vars, label, suffix="-sync"),
        BackgroundTask(areport_vars, label, suffix="-async"),
    ]
    SELECTED.set("changed after add_task")
    return Response({"ok": label}, background=BackgroundTasks(tasks))


@get("/async")
async def async_vars(label: str) -> Response[dict[str, str]]:
    enter_request(label)
    tasks = [
        BackgroundTask(report_vars, label, suffix="-sync"),
        BackgroundTask(areport_vars, label, suffix="-async"),
    ]
    SELECTED.set("changed after add_task")
    return Response({"ok": label}, background=BackgroundTasks(tasks))


@get("/response", sync_to_thread=False)
def response(label: str) -> Response[dict[str, str]]:
    enter_request(label)
    return Response({"ok": label}, background=BackgroundTask(areport_vars, label))


@get("/slow")
async def slow_task(label: str, seconds: float) -> Response[dict[str, str]]:
    return Response({"ok": label}, background=BackgroundTask(slow, label, seconds))


HANDLERS: list[ControllerRouterHandler] = [mixed, sync_vars, async_vars, response, slow_task]


def plugin() -> CtxkitPlugin:
    return CtxkitPlugin(
        vars=[SELECTED],
        propagation=PROPAGATION,
        timeout=TIMEOUT,
        drain_timeout=DRAIN_TIMEOUT,
        on_error=on_error,
    )


if MODE == "plain":  # another app of this process is set up; this one is not
    Litestar(route_handlers=[], plugins=[plugin()])
    app = Litestar(route_handlers=HANDLERS, middleware=[DefineMiddleware(ServerSpan)])
else:
    plugins = [plugin(), plugin()] if MODE == "twice" else [plugin()]
    app = Litestar(
        route_handlers=HANDLERS, middleware=[DefineMiddleware(ServerSpan)], plugins=plugins
    )
