"""The FastAPI app that benchmarks/case_background.py serves: one background task per request.

``BENCH_VARIANT`` picks how the endpoint's task runs: ``none`` (no task), ``stock`` (Starlette's
own ``BackgroundTasks``), ``detached`` (the same endpoint after ``detach_background_tasks``) or
``handwritten`` (``asyncio.create_task`` in a copy of the context, kept in a strong set).
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from contextvars import ContextVar, copy_context
from typing import TYPE_CHECKING

from fastapi import BackgroundTasks, FastAPI

import ctxkit
from ctxkit.contrib.starlette import detach_background_tasks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

VARIANT = os.environ.get("BENCH_VARIANT", "detached")
request_id: ContextVar[int] = ContextVar("request_id", default=0)
done = 0
tasks: set[asyncio.Task[None]] = set()


async def work(number: int) -> None:
    """The task: a little bookkeeping and one checkpoint, as a short real task has."""
    global done
    await asyncio.sleep(0)
    done += number - number + 1


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with ctxkit.BackgroundRunner(limit=None):
        yield


app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

if VARIANT == "none":

    @app.get("/")
    async def plain() -> dict[str, int]:
        request_id.set(1)
        return {"ok": 1}

elif VARIANT == "handwritten":

    @app.get("/")
    async def handwritten() -> dict[str, int]:
        request_id.set(1)
        task = asyncio.create_task(work(1), context=copy_context())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return {"ok": 1}

else:

    @app.get("/")
    async def with_background(background_tasks: BackgroundTasks) -> dict[str, int]:
        request_id.set(1)
        background_tasks.add_task(work, 1)
        return {"ok": 1}

    if VARIANT == "detached":
        detach_background_tasks(app, vars=[request_id])
