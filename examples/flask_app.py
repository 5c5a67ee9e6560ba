"""Flask (WSGI) + ctxkit on gunicorn: background work after the response, drained at SIGTERM.

A WSGI app has no event loop; each gunicorn worker process starts a ``ctxkit.RunnerThread``
after the fork (``examples/gunicorn_conf.py``), and request handlers spawn into it. Run it:

    gunicorn -c examples/gunicorn_conf.py --chdir examples flask_app:app
    curl -X POST 'localhost:8000/signup?address=ada@example.com' -H 'x-request-id: r-1'

SIGTERM (Ctrl+C) makes each worker drain its tasks and log its shutdown summary.
"""

from __future__ import annotations

import contextvars
import logging
import time

from _telemetry import setup_telemetry
from flask import Flask, request

import ctxkit

setup_telemetry("flask-example")
log = logging.getLogger("example")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id")
ctxkit.register(request_id)

app = Flask(__name__)


def send_welcome_email(address: str, seconds: float) -> None:
    time.sleep(seconds)
    log.info("welcome email sent to %s for %s", address, request_id.get("unset"))


@app.post("/signup")
def signup() -> dict[str, str | None]:
    request_id.set(request.headers.get("x-request-id", "-"))
    address = request.args["address"]
    task = ctxkit.spawn(send_welcome_email, address, float(request.args.get("seconds", 0.05)))
    log.info("signup of %s accepted", address)
    return {"task": task.name, "trace_id": task.trace_id}
