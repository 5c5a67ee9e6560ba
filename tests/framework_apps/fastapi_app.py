"""A FastAPI app with injected BackgroundTasks, ``async def`` and ``def`` endpoints."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

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

setup_telemetry()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with ctxkit.BackgroundRunner(drain_timeout=DRAIN_TIMEOUT, on_error=on_error):
        yield


# "no-runner": the lifespan opens no runner; detach_background_tasks opens one for the app.
app = FastAPI(lifespan=None if MODE == "no-runner" else lifespan, telemetry={"tracing": False})
app.add_middleware(ServerSpan)


@app.get("/mixed")
async def mixed(background_tasks: BackgroundTasks, label: str) -> dict[str, str]:
    background_tasks.add_task(task_ok, f"{label}-a")
    background_tasks.add_task(task_fail, f"{label}-b")
    background_tasks.add_task(task_ok_sync, f"{label}-c")
    background_tasks.add_task(task_hang, f"{label}-d")
    return {"ok": label}


@app.get("/sync")
def sync_vars(background_tasks: BackgroundTasks, label: str) -> dict[str, str]:
    enter_request(label)
    background_tasks.add_task(report_vars, label, suffix="-sync")
    background_tasks.add_task(areport_vars, label, suffix="-async")
    SELECTED.set("changed after add_task")
    return {"ok": label}


@app.get("/async")
async def async_vars(background_tasks: BackgroundTasks, label: str) -> dict[str, str]:
    enter_request(label)
    background_tasks.add_task(report_vars, label, suffix="-sync")
    background_tasks.add_task(areport_vars, label, suffix="-async")
    SELECTED.set("changed after add_task")
    return {"ok": label}


@app.get("/response")
def response(label: str) -> JSONResponse:
    enter_request(label)
    return JSONResponse({"ok": label}, background=BackgroundTask(areport_vars, label))


@app.get("/slow")
async def slow_task(
    background_tasks: BackgroundTasks, label: str, seconds: float
) -> dict[str, str]:
    background_tasks.add_task(slow, label, seconds)
    return {"ok": label}


if MODE == "plain":  # another app of this process is set up; this one is not
    detach_background_tasks(FastAPI(), vars=[SELECTED])
else:
    detach_background_tasks(app, vars=[SELECTED], propagation=PROPAGATION, timeout=TIMEOUT)
    if MODE == "twice":
        detach_background_tasks(app, vars=[SELECTED], propagation=PROPAGATION, timeout=TIMEOUT)
