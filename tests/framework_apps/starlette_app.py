"""A plain Starlette app: BackgroundTasks and BackgroundTask on responses, async and def."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.background import BackgroundTask, BackgroundTasks
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

import ctxkit
from ctxkit.contrib.starlette import detach_background_tasks

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
    from collections.abc import AsyncIterator

    from starlette.requests import Request

setup_telemetry()


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    async with ctxkit.BackgroundRunner(drain_timeout=DRAIN_TIMEOUT, on_error=on_error):
        yield


async def mixed(request: Request) -> JSONResponse:
    label = request.query_params["label"]
    tasks = BackgroundTasks()
    tasks.add_task(task_ok, f"{label}-a")
    tasks.add_task(task_fail, f"{label}-b")
    tasks.add_task(task_ok_sync, f"{label}-c")
    tasks.add_task(task_hang, f"{label}-d")
    return JSONResponse({"ok": label}, background=tasks)


def sync_vars(request: Request) -> JSONResponse:
    label = request.query_params["label"]
    enter_request(label)
    tasks = BackgroundTasks()
    tasks.add_task(report_vars, label, suffix="-sync")
    tasks.add_task(areport_vars, label, suffix="-async")
    SELECTED.set("changed after add_task")
    return JSONResponse({"ok": label}, background=tasks)


async def async_vars(request: Request) -> JSONResponse:
    label = request.query_params["label"]
    enter_request(label)
    tasks = BackgroundTasks()
    tasks.add_task(report_vars, label, suffix="-sync")
    tasks.add_task(areport_vars, label, suffix="-async")
    SELECTED.set("changed after add_task")
    return JSONResponse({"ok": label}, background=tasks)


def response(request: Request) -> JSONResponse:
    label = request.query_params["label"]
    enter_request(label)
    return JSONResponse({"ok": label}, background=BackgroundTask(areport_vars, label))


async def slow_task(request: Request) -> JSONResponse:
    label, seconds = request.query_params["label"], float(request.query_params["seconds"])
    return JSONResponse({"ok": label}, background=BackgroundTask(slow, label, seconds))


def make_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/mixed", mixed),
            Route("/sync", sync_vars),
            Route("/async", async_vars),
            Route("/response", response),
            Route("/slow", slow_task),
        ],
        middleware=[Middleware(ServerSpan)],
        # "no-runner": the lifespan opens no runner; detach_background_tasks opens one.
        lifespan=None if MODE == "no-runner" else lifespan,
    )


app = make_app()
if MODE == "plain":  # another app of this process is set up; this one is not
    detach_background_tasks(make_app(), vars=[SELECTED])
else:
    detach_background_tasks(app, vars=[SELECTED], propagation=PROPAGATION, timeout=TIMEOUT)
    if MODE == "twice":
        detach_background_tasks(app, vars=[SELECTED], propagation=PROPAGATION, timeout=TIMEOUT)
