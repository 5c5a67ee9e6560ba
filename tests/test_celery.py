"""Tests for ctxkit.contrib.celery: a real prefork worker on a real Redis, then eager mode.

The module starts one ``redis-server`` on a free loopback port and one ``celery worker``
(prefork, two processes) in a temporary directory, and stops both at the end. The worker's app
(``tests/celery_app/app.py``) is instrumented by ctxkit and by
``opentelemetry-instrumentation-celery`` alongside; its tasks return what they saw, and it
exports its spans to a JSONL file that the tests read.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from celery import Celery, Task, chain
from celery.app.trace import build_tracer
from celery.exceptions import Ignore
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

import ctxkit
from ctxkit import propagation
from ctxkit.contrib import celery as celery_contrib
from ctxkit.contrib.celery import instrument

from ._servers import REPO, TIMEOUT, redis_url, stop

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

__all__ = ["redis_url"]  # a fixture, used by name

# Same names as in tests/celery_app/app.py: names identify vars across processes.
request_id: ContextVar[str] = ContextVar("request_id")
tenant: ContextVar[object] = ContextVar("tenant")
secret: ContextVar[str] = ContextVar("secret")


@pytest.fixture(autouse=True)
def _fresh_log_once() -> Iterator[None]:
    saved = set(propagation._logged)
    propagation._logged.clear()
    yield
    propagation._logged.clear()
    propagation._logged.update(saved)


def hex_trace(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def hex_span(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


@dataclass
class Worker:
    queue: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.directory / "worker.log").read_text(errors="replace")

    def _lines(self, name: str) -> list[dict[str, Any]]:
        """The complete lines the worker wrote so far (it may be writing the last one now)."""
        path = self.directory / name
        if not path.exists():
            return []
        complete, _, _being_written = path.read_text().rpartition("\n")
        return [json.loads(line) for line in complete.splitlines() if line]

    def spans(self, name: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self._lines("spans.jsonl") if name is None or s["name"] == name]

    def span(self, name: str, **match: object) -> dict[str, Any]:
        """The one span named ``name`` with these fields (waiting for the worker's export)."""
        found = eventually(
            lambda: [s for s in self.spans(name) if all(s.get(k) == v for k, v in match.items())]
        )
        assert len(found) == 1, f"{name} {match}: {found}\n{self.log}"
        return found[0]

    def failures(self) -> list[dict[str, Any]]:
        return self._lines("failures.jsonl")


MODES = ("child", "link")


def start_worker(redis_url: str, directory: Path, mode: str) -> Worker:
    queue = f"ctxkit-celery-{mode}-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "CTXKIT_TEST_REDIS_URL": redis_url,
        "CTXKIT_TEST_QUEUE": queue,
        "CTXKIT_TEST_PROPAGATION": mode,
        "CTXKIT_TEST_OUT": str(directory),
    }
    with (directory / "worker.log").open("wb") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tests.celery_app.app",
                "worker",
                "--pool=prefork",
                "--concurrency=2",
                "-Q",
                queue,
                "-n",
                f"{queue}@127.0.0.1",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel=INFO",
            ],
            cwd=directory,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(queue, directory, process)


@pytest.fixture(scope="module")
def workers(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Worker]]:
    """A prefork worker with two processes per propagation mode, for the whole module."""
    started: dict[str, Worker] = {}
    try:
        for mode in MODES:
            directory = tmp_path_factory.mktemp(f"celery-{mode}")
            started[mode] = start_worker(redis_url, directory, mode)
        yield started
    finally:
        stop(*(worker.process for worker in started.values()))


@pytest.fixture(scope="module")
def worker(workers: dict[str, Worker]) -> Worker:
    """The child-mode worker."""
    return workers["child"]


@pytest.fixture(scope="module")
def apps(redis_url: str, worker: Worker) -> Iterator[tuple[Celery, Celery]]:
    """The request side: an app instrumented by ctxkit, and a plain one without it."""
    producer = Celery("producer", broker=redis_url, backend=redis_url)
    plain = Celery("plain", broker=redis_url, backend=redis_url)
    for app in (producer, plain):
        app.conf.update(task_default_queue=worker.queue, broker_connection_retry_on_startup=True)
    instrument(producer, vars=(request_id, tenant, secret))
    try:
        yield producer, plain
    finally:
        for app in (producer, plain):
            app.close()


@pytest.fixture
def producer(apps: tuple[Celery, Celery], tracer_provider: TracerProvider) -> Celery:
    """The instrumented producer app, reporting to this test's tracer provider."""
    app = apps[0]
    instrument(app, vars=(request_id, tenant, secret), tracer_provider=tracer_provider)
    return app


def result_of(worker: Worker, result: Any, *, propagate: bool = True) -> Any:
    try:
        return result.get(timeout=TIMEOUT, propagate=propagate)
    except TimeoutError as exc:
        alive = worker.process.poll() is None
        raise AssertionError(f"no result from the worker (alive={alive}):\n{worker.log}") from exc


def eventually(
    find: Callable[[], list[dict[str, Any]]],
    until: Callable[[list[dict[str, Any]]], bool] = bool,
) -> list[dict[str, Any]]:
    """Return what ``find`` finds in the worker's output once ``until`` holds for it (by
    default: once it finds anything), or what it finds at the deadline."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = find()
        if until(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.02)  # polling another process's output, not synchronising tasks


def sends(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def by_attempt(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(spans, key=lambda span: int(span["attributes"]["ctxkit.attempt"]))


class TestWorker:
    @pytest.mark.parametrize("mode", MODES)
    def test_child_and_link(
        self,
        workers: dict[str, Worker],
        producer: Celery,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        mode: str,
    ) -> None:
        """In a prefork worker the task sees the allowed vars (never the others) and runs in
        process observe: a child of the request's send observe span (child), or the root of
        a new trace linked to it that names the linked trace in an attribute (link)."""
        worker = workers[mode]
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-celery")
            tenant.set({"id": 42})
            secret.set("s3cr3t")
            async_result = producer.send_task("observe", queue=worker.queue)
        seen = result_of(worker, async_result)
        assert seen["pid"] != os.getpid()
        assert seen["request_id"] == "r-celery"
        assert seen["tenant"] == {"id": 42}
        assert seen["secret"] is None
        [send] = sends(span_exporter, "send observe")
        request_trace = f"{request.get_span_context().trace_id:032x}"
        assert send.kind is SpanKind.PRODUCER
        assert hex_trace(send) == request_trace
        assert dict(send.attributes or {}) == {
            "messaging.system": "celery",
            "messaging.operation.name": "send",
            "messaging.operation.type": "send",
            "messaging.destination.name": "observe",
            "messaging.message.id": async_result.id,
        }
        process = worker.span("process observe", span_id=seen["span_id"])
        assert process["kind"] == "CONSUMER"
        attributes = process["attributes"]
        assert attributes["messaging.system"] == "celery"
        assert attributes["messaging.operation.name"] == "process"
        assert attributes["messaging.operation.type"] == "process"
        assert attributes["messaging.destination.name"] == "observe"
        assert attributes["messaging.message.id"] == async_result.id
        assert attributes["ctxkit.attempt"] == 1
        assert seen["trace_id"] == process["trace_id"]
        if mode == "child":
            assert process["trace_id"] == request_trace
            assert process["parent_span_id"] == hex_span(send)
            assert process["links"] == []
        else:
            assert process["trace_id"] != request_trace
            assert process["parent_span_id"] is None
            assert process["links"] == [{"trace_id": request_trace, "span_id": hex_span(send)}]
            assert attributes["ctxkit.linked_trace_id"] == request_trace

    @pytest.mark.parametrize("task_name", ["flaky", "flaky_auto"])
    def test_fails_twice_then_succeeds(
        self,
        worker: Worker,
        producer: Celery,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        task_name: str,
    ) -> None:
        """A task that fails twice (self.retry() or autoretry_for) and then succeeds leaves
        three process spans: attempt 1 a child of the request's send span, attempts 2 and 3
        new traces linked to that send span and to the attempt before; all see the vars."""
        key = f"{task_name}-{uuid.uuid4().hex}"
        with tracer_provider.get_tracer("test").start_as_current_span("request"):
            request_id.set("r-retry")
            async_result = producer.send_task(task_name, args=(key,))
        seen = result_of(worker, async_result)
        assert seen["request_id"] == "r-retry"
        [send] = sends(span_exporter, f"send {task_name}")
        # The result comes from attempt 3, maybe in the other worker process before the process
        # that ran attempt 2 wrote its span (it ends after the retry is published): poll.
        attempts = by_attempt(
            eventually(
                lambda: [
                    s
                    for s in worker.spans(f"process {task_name}")
                    if s["attributes"]["messaging.message.id"] == async_result.id
                ],
                until=lambda found: len(found) >= 3,
            )
        )
        assert [s["attributes"]["ctxkit.attempt"] for s in attempts] == [1, 2, 3], worker.log
        first, second, third = attempts
        assert first["trace_id"] == hex_trace(send)
        assert first["parent_span_id"] == hex_span(send)
        for attempt, previous in ((second, first), (third, second)):
            assert attempt["parent_span_id"] is None
            assert attempt["trace_id"] not in {hex_trace(send), previous["trace_id"]}
            assert attempt["links"] == [
                {"trace_id": hex_trace(send), "span_id": hex_span(send)},
                {"trace_id": previous["trace_id"], "span_id": previous["span_id"]},
            ]
            assert attempt["attributes"]["ctxkit.linked_trace_id"] == hex_trace(send)
            assert attempt["attributes"]["ctxkit.previous_trace_id"] == previous["trace_id"]
        assert [s["status"] for s in attempts] == ["ERROR", "ERROR", "UNSET"]
        expected = "RuntimeError" if task_name == "flaky" else "LookupError"
        assert first["attributes"]["error.type"] == expected
        assert seen["trace_id"] == third["trace_id"]

    def test_chain_of_two_tasks(
        self,
        worker: Worker,
        producer: Celery,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """A chain built in a request carries the request's context into both tasks, also the
        second one, which the worker publishes after the first returned."""
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-chain")
            async_result = chain(
                producer.signature("step"), producer.signature("step")
            ).apply_async()
        first, second = result_of(worker, async_result)
        request_trace = f"{request.get_span_context().trace_id:032x}"
        assert [first["request_id"], second["request_id"]] == ["r-chain", "r-chain"]
        assert first["trace_id"] == second["trace_id"] == request_trace
        assert len(worker.spans("process step")) >= 2

    def test_failing_task(
        self,
        worker: Worker,
        producer: Celery,
        tracer_provider: TracerProvider,
    ) -> None:
        """A task that raises: its process span is ERROR with error.type, Celery stores the
        failure and sends task_failure as usual, and the worker runs the next task."""
        with tracer_provider.get_tracer("test").start_as_current_span("request"):
            request_id.set("r-fail")
            failing = producer.send_task("fail")
        with pytest.raises(RuntimeError, match="r-fail"):
            result_of(worker, failing)
        assert failing.state == "FAILURE"
        [process] = [
            s
            for s in worker.spans("process fail")
            if s["attributes"]["messaging.message.id"] == failing.id
        ]
        assert process["status"] == "ERROR"
        assert process["attributes"]["error.type"] == "RuntimeError"
        assert "exception" in process["events"]
        # Celery sends task_failure after it stored the failure: poll the worker's file.
        failures = eventually(lambda: [f for f in worker.failures() if f["task_id"] == failing.id])
        assert failures == [{"task_id": failing.id, "exception": "RuntimeError"}]
        assert result_of(worker, producer.send_task("observe"))["request_id"] == "r-fail"

    def test_no_var_leaks_into_the_next_task(self, worker: Worker, producer: Celery) -> None:
        """A worker process runs task after task in one context: the vars restored for one
        task are reset after it, so a task sent without them sees none."""
        seen: list[tuple[str | None, dict[str, Any]]] = []
        # Every third task carries a var: whether the pool hands tasks out in turns or to the
        # first idle process, some task without one runs where one with a var ran before.
        for index in range(9):
            value = f"r-{index}" if index % 3 == 0 else None

            def send(value: str | None = value) -> Any:
                if value is not None:
                    request_id.set(value)
                return producer.send_task("observe")

            async_result = contextvars.Context().run(send)
            seen.append((value, result_of(worker, async_result)))
        for value, observed in seen:
            assert observed["request_id"] == value
        pids_with_a_var = set()
        followed = False
        for value, observed in seen:
            if value is None and observed["pid"] in pids_with_a_var:
                followed = True
            if value is not None:
                pids_with_a_var.add(observed["pid"])
        assert followed, seen

    def test_exception_without_text_leaks_nothing(self, worker: Worker, producer: Celery) -> None:
        """A task raising an exception whose __str__ raises: Celery records that exception
        (not one from ctxkit's span handling), its process span is exported as ERROR, and the
        next task the same worker process runs without vars sees none of the failed task's."""
        failures: list[tuple[Any, Any]] = []
        seen: list[dict[str, Any]] = []
        # As above: a failing task, then two without a var, so that whether the pool hands
        # tasks out in turns or to the first idle process, one runs where the failure ran.
        for index in range(3):

            def fail(index: int = index) -> Any:
                request_id.set(f"r-unprintable-{index}")
                return producer.send_task("fail_unprintable")

            failing = contextvars.Context().run(fail)
            failures.append((failing, result_of(worker, failing, propagate=False)))
            seen.extend(
                result_of(worker, contextvars.Context().run(producer.send_task, "observe"))
                for _ in range(2)
            )
        assert [observed["request_id"] for observed in seen] == [None] * len(seen)
        failed_pids = {error.args[0] for _, error in failures if error.args}
        assert failed_pids & {observed["pid"] for observed in seen}, (failures, seen)
        for failing, error in failures:
            assert failing.state == "FAILURE"
            assert type(error).__name__ == "Unprintable", worker.log
            [process] = [
                s
                for s in worker.spans("process fail_unprintable")
                if s["attributes"]["messaging.message.id"] == failing.id
            ]
            assert process["status"] == "ERROR"
            assert process["attributes"]["error.type"] == "Unprintable"
            assert process["events"] == ["exception"]

            def recorded_failure(task_id: str = failing.id) -> list[dict[str, Any]]:
                return [f for f in worker.failures() if f["task_id"] == task_id]

            recorded = eventually(recorded_failure)
            assert recorded == [{"task_id": failing.id, "exception": "Unprintable"}]

    def test_garbage_headers_run_as_new_root(
        self, worker: Worker, apps: tuple[Celery, Celery]
    ) -> None:
        """A producer without ctxkit sending garbage, malformed or oversized headers never
        fails a task: it runs as a new root without vars, and each rejection is logged."""
        plain = apps[1]
        results = [
            plain.send_task(
                "observe",
                headers={
                    "traceparent": "00-" + "0" * 32 + "-0123456789abcdef-01",
                    "ctxkit-vars": '{"request_id": "evil", "request_id": "x"}',
                    "ctxkit-trace-id": "not hex",
                },
            ),
            plain.send_task(
                "observe",
                headers={"traceparent": "garbage", "ctxkit-vars": "[" * 5000, "tracestate": 7},
            ),
            plain.send_task("observe", headers={"ctxkit-vars": ["not", "a", "string"]}),
            plain.send_task("observe"),
        ]
        for async_result in results:
            seen = result_of(worker, async_result)
            assert seen["request_id"] is None
            process = worker.span("process observe", span_id=seen["span_id"])
            assert process["parent_span_id"] is None
        log = worker.log
        for reason in (
            "traceparent.zero_trace_id",
            "vars.duplicate_name",
            "trace_id.invalid",
            "traceparent.invalid_format",
            "vars.too_large",
            "vars.not_string",
        ):
            assert f"({reason})" in log, log
        assert "evil" not in log
        assert worker.process.poll() is None

    def test_fake_trace_id_reaches_the_worker_logs(
        self, worker: Worker, apps: tuple[Celery, Celery]
    ) -> None:
        """A producer without a valid span (no SDK) but with a ctxkit fake trace id: the
        task's current_trace_id(), which log lines carry, is that id, although the worker has
        an SDK and a real process span; the span records the id as ctxkit.fake_trace_id."""
        producer = apps[0]
        instrument(producer, vars=(request_id,), tracer_provider=trace.NoOpTracerProvider())
        context = ctxkit.clone_without_span()
        fake = context.run(ctxkit.current_trace_id)
        assert fake is not None
        seen = result_of(worker, context.run(producer.send_task, "observe"))
        assert seen["trace_id"] == fake
        process = worker.span("process observe", span_id=seen["span_id"])
        assert process["attributes"]["ctxkit.fake_trace_id"] == fake
        assert process["trace_id"] != fake

    def test_opentelemetry_instrumentation_alongside(
        self, worker: Worker, producer: Celery, tracer_provider: TracerProvider
    ) -> None:
        """With opentelemetry-instrumentation-celery in the worker too, both spans exist for
        a task, in the request's trace, and the task sees the vars."""
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-otel")
            async_result = producer.send_task("observe")
        seen = result_of(worker, async_result)
        assert seen["request_id"] == "r-otel"
        request_trace = f"{request.get_span_context().trace_id:032x}"
        # Its span ends in task_postrun, after the result is stored: poll the worker's file.
        run = eventually(
            lambda: [s for s in worker.spans("run/observe") if s["trace_id"] == request_trace]
        )
        ours = [s for s in worker.spans("process observe") if s["trace_id"] == request_trace]
        assert len(run) == 1, worker.spans()
        assert len(ours) == 1


# --- in the caller's process: eager, apply(), direct calls ---------------------------------------


class Base(Task):  # type: ignore[misc]
    """A task class of the app's own, overriding __call__."""

    calls: ClassVar[list[str]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        Base.calls.append(self.name)
        return super().__call__(*args, **kwargs)


class Unprintable(Exception):
    """An exception whose ``__str__`` raises."""

    def __str__(self) -> str:
        raise RuntimeError("this exception has no text")


@pytest.fixture
def eager(tracer_provider: TracerProvider) -> Iterator[Celery]:
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, task_store_eager_result=False)

    @app.task(name="eager.observe", shared=False)
    def observe() -> dict[str, object]:
        span = trace.get_current_span()
        return {
            "request_id": request_id.get(None),
            "span": span,
            "trace_id": ctxkit.current_trace_id(),
        }

    @app.task(name="eager.bound", bind=True, base=Base, shared=False)
    def bound(self: Any) -> object:
        return {"id": self.request.id, "eager": self.request.is_eager}

    @app.task(name="eager.fail", shared=False)
    def fail() -> None:
        raise ValueError("eager failure")

    @app.task(name="eager.fail_unprintable", shared=False)
    def fail_unprintable() -> None:
        raise Unprintable

    instrument(app, vars=(request_id,), tracer_provider=tracer_provider)
    instrument(app, vars=(request_id,), tracer_provider=tracer_provider)  # harmless
    Base.calls.clear()
    try:
        yield app
    finally:
        app.close()


class TestEager:
    @pytest.mark.parametrize("how", ["delay", "apply", "call"])
    def test_continues_the_callers_trace(
        self,
        eager: Celery,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
        how: str,
    ) -> None:
        """task_always_eager's delay(), apply() and a direct call run in the caller's trace,
        in process <task> a child of the current span, with the caller's vars."""
        task = eager.tasks["eager.observe"]
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-eager")
            if how == "delay":
                seen = task.delay().get()
            elif how == "apply":
                seen = task.apply().get()
            else:
                seen = task()
        [process] = [
            s for s in span_exporter.get_finished_spans() if s.name == "process eager.observe"
        ]
        assert seen["request_id"] == "r-eager"
        assert seen["trace_id"] == f"{request.get_span_context().trace_id:032x}"
        assert seen["span"].get_span_context() == process.context
        assert process.parent is not None
        assert process.parent.span_id == request.get_span_context().span_id
        assert process.kind is SpanKind.CONSUMER
        assert (process.attributes or {})["messaging.operation.name"] == "process"
        assert trace.get_current_span() is trace.INVALID_SPAN
        assert sends(span_exporter, "send eager.observe") == []

    def test_other_task_classes_keep_working(self, eager: Celery) -> None:
        """A task with its own base class and bind=True keeps its __call__ and its request."""
        # What Celery itself gives such a task, uninstrumented: it differs between versions
        # (Celery 5.3.0, the floor, runs a base class with its own __call__ eagerly without a
        # pushed request; the latest pushes one).
        plain_app = Celery("plain", set_as_current=False)
        plain_app.conf.task_always_eager = True

        @plain_app.task(name="eager.bound", bind=True, base=Base, shared=False)
        def plain_bound(self: Any) -> object:
            return {"id": self.request.id, "eager": self.request.is_eager}

        expected: Any = plain_bound.delay().get()
        Base.calls.clear()
        bound = eager.tasks["eager.bound"]
        seen = bound.delay().get()
        assert seen["eager"] is expected["eager"]
        assert (seen["id"] is None) is (expected["id"] is None)
        assert Base.calls == ["eager.bound"]

    def test_eager_failure(self, eager: Celery, span_exporter: InMemorySpanExporter) -> None:
        """An eager task that raises: ERROR and error.type on its span, and the exception
        reaches the caller as Celery makes it."""
        with pytest.raises(ValueError, match="eager failure"):
            eager.tasks["eager.fail"].delay().get()
        [process] = span_exporter.get_finished_spans()
        assert process.status.status_code is StatusCode.ERROR
        assert (process.attributes or {})["error.type"] == "ValueError"

    def test_eager_exception_without_text(
        self, eager: Celery, span_exporter: InMemorySpanExporter
    ) -> None:
        """An exception whose __str__ raises reaches the caller as itself, and the span is
        ERROR with a stand-in text."""
        with pytest.raises(Unprintable):
            eager.tasks["eager.fail_unprintable"]()
        [process] = span_exporter.get_finished_spans()
        assert process.status.status_code is StatusCode.ERROR
        assert process.status.description == "Unprintable: <str() of the Unprintable raised>"
        assert (process.attributes or {})["error.type"] == "Unprintable"
        assert [event.name for event in process.events] == ["exception"]

    def test_arguments_are_checked(self, eager: Celery) -> None:
        """Bad options raise at once."""
        with pytest.raises(ValueError, match="propagation"):
            instrument(eager, propagation="both")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="retries"):
            instrument(eager, retries="never")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="ContextVar"):
            instrument(eager, vars=("request_id",))  # type: ignore[arg-type]


# --- the worker's path, in this process: Celery's own tracer on the in-memory broker ---------


@dataclass
class InProcess:
    app: Celery
    seen: list[dict[str, object]]
    worker: contextvars.Context

    def run_next(self) -> Any:
        """Take the next message off the queue and run it as a worker does, in the worker's
        own context; return what the tracer returns."""
        with self.app.connection_for_write() as connection:
            queue = connection.SimpleQueue("inproc")
            message = queue.get(timeout=TIMEOUT)
            args, kwargs, embed = message.decode()
            request = {**message.headers, **embed, "delivery_info": message.delivery_info}
            task = self.app.tasks[message.headers["task"]]
            tracer = build_tracer(task.name, task, app=self.app, eager=False)
            result = self.worker.run(tracer, message.headers["id"], args, kwargs, request)
            message.ack()
            queue.close()
        return result


@pytest.fixture
def inproc(tracer_provider: TracerProvider) -> Iterator[InProcess]:
    app = Celery("inproc", broker="memory://", set_as_current=False)
    app.conf.update(task_default_queue="inproc", task_ignore_result=True)
    seen: list[dict[str, object]] = []

    def observation() -> dict[str, object]:
        span = trace.get_current_span()
        return {"request_id": request_id.get(None), "span": span.get_span_context()}

    @app.task(name="inproc.observe", shared=False)
    def observe() -> None:
        seen.append(observation())

    @app.task(name="inproc.flaky", shared=False, bind=True, max_retries=5)
    def flaky(self: Any) -> None:
        seen.append(observation())
        if len(seen) < 3:
            raise self.retry(countdown=0)

    @app.task(name="inproc.step", shared=False)
    def step(previous: object = None) -> int:
        seen.append(observation())
        return len(seen)

    @app.task(name="inproc.ignore", shared=False)
    def ignore() -> None:
        raise Ignore

    instrument(app, vars=(request_id,), tracer_provider=tracer_provider)
    try:
        yield InProcess(app, seen, contextvars.Context())
    finally:
        app.close()


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


class TestInProcessWorker:
    def test_vars_for_the_task_only(
        self,
        inproc: InProcess,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """The task sees the producer's var and runs in a child of the send span; the
        worker's context has no var afterwards."""
        with tracer_provider.get_tracer("test").start_as_current_span("request"):
            request_id.set("r-in")
            inproc.app.send_task("inproc.observe")
        inproc.run_next()
        [seen] = inproc.seen
        assert seen["request_id"] == "r-in"
        [send] = spans_named(span_exporter, "send inproc.observe")
        [process] = spans_named(span_exporter, "process inproc.observe")
        assert process.parent is not None
        assert process.parent.span_id == int(hex_span(send), 16)
        assert seen["span"] == process.context
        assert inproc.worker.run(request_id.get, None) is None
        assert inproc.worker.run(trace.get_current_span) is trace.INVALID_SPAN

    def test_retries_link(
        self,
        inproc: InProcess,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """self.retry() publishes the next attempt from inside the task: attempts 2 and 3
        are new traces linked to the first send span and to the attempt before."""
        with tracer_provider.get_tracer("test").start_as_current_span("request"):
            request_id.set("r-in")
            inproc.app.send_task("inproc.flaky")
        for _ in range(3):
            inproc.run_next()
        assert [s["request_id"] for s in inproc.seen] == ["r-in"] * 3
        processes = {
            p.context.span_id
            for p in spans_named(span_exporter, "process inproc.flaky")
            if p.context
        }
        [first_send] = [
            s
            for s in spans_named(span_exporter, "send inproc.flaky")
            if s.parent is not None and s.parent.span_id not in processes
        ]
        attempts = sorted(
            spans_named(span_exporter, "process inproc.flaky"),
            key=lambda s: int(str((s.attributes or {})["ctxkit.attempt"])),
        )
        assert [(s.attributes or {})["ctxkit.attempt"] for s in attempts] == [1, 2, 3]
        assert [s.status.status_code for s in attempts] == [
            StatusCode.ERROR,
            StatusCode.ERROR,
            StatusCode.UNSET,
        ]
        for attempt, previous in zip(attempts[1:], attempts[:2], strict=True):
            assert attempt.parent is None
            assert previous.context is not None
            assert [link.context.span_id for link in attempt.links] == [
                int(hex_span(first_send), 16),
                previous.context.span_id,
            ]

    def test_chain_follow_up_carries_the_request(
        self,
        inproc: InProcess,
        tracer_provider: TracerProvider,
        span_exporter: InMemorySpanExporter,
    ) -> None:
        """The chain's second task, published by the tracer after the first returned, carries
        the request's var and trace, not the worker's empty context."""
        with tracer_provider.get_tracer("test").start_as_current_span("request") as request:
            request_id.set("r-chain")
            chain(
                inproc.app.signature("inproc.step"), inproc.app.signature("inproc.step")
            ).apply_async()
        inproc.run_next()
        inproc.run_next()
        assert [s["request_id"] for s in inproc.seen] == ["r-chain", "r-chain"]
        trace_id = request.get_span_context().trace_id
        for process in spans_named(span_exporter, "process inproc.step"):
            assert process.context is not None
            assert process.context.trace_id == trace_id
        assert len(spans_named(span_exporter, "send inproc.step")) == 2

    def test_ignore_is_not_an_error(
        self, inproc: InProcess, span_exporter: InMemorySpanExporter
    ) -> None:
        """A task that raises Ignore leaves its span UNSET."""
        inproc.app.send_task("inproc.ignore")
        inproc.run_next()
        [process] = spans_named(span_exporter, "process inproc.ignore")
        assert process.status.status_code is StatusCode.UNSET

    def test_clashing_registration_is_logged_and_the_task_runs(
        self, inproc: InProcess, caplog: pytest.LogCaptureFixture
    ) -> None:
        """A var registered after instrument() with the name of a carried one: the task runs
        without the context and the error is logged."""
        request_id.set("r-x")
        inproc.app.send_task("inproc.observe")
        ctxkit.register(ContextVar("request_id"))
        with caplog.at_level(logging.ERROR, logger="ctxkit"):
            inproc.run_next()
        assert "could not restore" in caplog.text
        assert inproc.seen[0]["request_id"] is None

    def test_publish_failure_ends_the_send_span(
        self,
        inproc: InProcess,
        span_exporter: InMemorySpanExporter,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A publish that raises ends the send span with ERROR and the exception."""

        def refuse(*args: object, **kwargs: object) -> None:
            raise ConnectionRefusedError("broker down")

        monkeypatch.setattr("kombu.messaging.Producer.publish", refuse)
        with pytest.raises(ConnectionRefusedError):
            inproc.app.send_task("inproc.observe")
        [send] = spans_named(span_exporter, "send inproc.observe")
        assert send.status.status_code is StatusCode.ERROR
        assert (send.attributes or {})["error.type"] == "ConnectionRefusedError"

    def test_uninstrumented_app_of_a_wrapped_task(
        self, inproc: InProcess, span_exporter: InMemorySpanExporter
    ) -> None:
        """A wrapped task whose app lost its options runs as plain Celery would: no span."""
        task = inproc.app.tasks["inproc.observe"]
        del celery_contrib._configs[inproc.app]
        try:
            task()
            assert len(inproc.seen) == 1
            assert span_exporter.get_finished_spans() == ()
        finally:
            instrument(inproc.app, vars=(request_id,))

    def test_helpers(self) -> None:
        """Headers nested under request.headers are read too; a junk retry count is attempt 1."""
        request = SimpleNamespace(headers={"traceparent": "x"}, retries="junk")
        assert celery_contrib._carrier(request, frozenset({"traceparent", "ctxkit-vars"})) == {
            "traceparent": "x"
        }
        assert celery_contrib._attempt(request) == 1


def test_instrument_before_the_configuration(tracer_provider: TracerProvider) -> None:
    """instrument() may come before the app is configured: the sender Celery makes later
    reads the final configuration (here, the default queue) and is instrumented."""
    app = Celery("late", broker="memory://", set_as_current=False)
    instrument(app, vars=(request_id,), tracer_provider=tracer_provider)
    app.conf.update(task_default_queue="late-queue")
    try:
        request_id.set("r-late")
        app.send_task("late.task")
        with app.connection_for_write() as connection:
            queue = connection.SimpleQueue("late-queue")
            message = queue.get(timeout=TIMEOUT)
            assert json.loads(message.headers["ctxkit-vars"]) == {"request_id": "r-late"}
            message.ack()
            queue.close()
    finally:
        app.close()
