"""Tests for ctxkit.TraceIdFilter: trace and span ids on stdlib log records."""

from __future__ import annotations

import io
import logging
import logging.config
from typing import TYPE_CHECKING

import anyio
import pytest
from opentelemetry import trace

import ctxkit

if TYPE_CHECKING:
    from collections.abc import Iterator

    from opentelemetry.sdk.trace import TracerProvider

FORMAT = "%(trace_id)s|%(span_id)s|%(message)s"


@pytest.fixture
def stream() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def logger(stream: io.StringIO) -> Iterator[logging.Logger]:
    """A logger whose handler has the filter and a format using both ids."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(ctxkit.TraceIdFilter())
    logger = logging.getLogger("test_ctxkit_logging")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)
    handler.close()


@pytest.fixture
def tracer(tracer_provider: TracerProvider) -> trace.Tracer:
    return tracer_provider.get_tracer("test")


def ids(span: trace.Span) -> str:
    """Return ``trace_id|span_id`` of ``span`` as the filter writes them."""
    span_context = span.get_span_context()
    return f"{span_context.trace_id:032x}|{span_context.span_id:016x}"


class TestTraceIdFilter:
    def test_in_a_span_writes_its_trace_and_span_ids(
        self, logger: logging.Logger, stream: io.StringIO, tracer: trace.Tracer
    ) -> None:
        """In a span, the record carries the span's trace id and span id."""
        with tracer.start_as_current_span("request") as span:
            logger.info("hello")
        assert stream.getvalue() == f"{ids(span)}|hello\n"

    def test_in_a_fake_id_clone_writes_the_fake_id(
        self, logger: logging.Logger, stream: io.StringIO
    ) -> None:
        """In a clone with a fake trace id, trace_id is the fake id and span_id is empty."""
        clone = ctxkit.clone_without_span()
        fake = clone.run(ctxkit.current_trace_id)
        assert fake is not None
        clone.run(logger.info, "hello")
        assert stream.getvalue() == f"{fake}||hello\n"

    def test_with_nothing_writes_empty_ids(
        self, logger: logging.Logger, stream: io.StringIO
    ) -> None:
        """With no span and no fake id, both ids are empty strings."""
        logger.info("hello")
        assert stream.getvalue() == "||hello\n"

    def test_in_a_clone_writes_the_marker_span(
        self,
        logger: logging.Logger,
        stream: io.StringIO,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
    ) -> None:
        """In a clone() of a request, the ids are the request's trace and the marker span."""
        with tracer.start_as_current_span("request") as span:
            clone = ctxkit.clone(tracer_provider=tracer_provider)
        marker = clone.run(trace.get_current_span)
        clone.run(logger.info, "hello")
        assert stream.getvalue() == f"{ids(marker)}|hello\n"
        assert marker.get_span_context().trace_id == span.get_span_context().trace_id

    def test_filter_on_a_handler_covers_child_loggers(
        self, logger: logging.Logger, stream: io.StringIO, tracer: trace.Tracer
    ) -> None:
        """Records propagated from a child logger to the filtered handler get the ids."""
        with tracer.start_as_current_span("request") as span:
            logger.getChild("child").info("hello")
        assert stream.getvalue() == f"{ids(span)}|hello\n"

    def test_filter_on_a_logger_works(self, stream: io.StringIO, tracer: trace.Tracer) -> None:
        """The filter also works attached to a logger rather than a handler."""
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter(FORMAT))
        logger = logging.getLogger("test_ctxkit_logging_logger_filter")
        logger.propagate = False
        logger.addHandler(handler)
        trace_id_filter = ctxkit.TraceIdFilter()
        logger.addFilter(trace_id_filter)
        try:
            with tracer.start_as_current_span("request") as span:
                logger.warning("hello")
        finally:
            logger.removeFilter(trace_id_filter)
            logger.removeHandler(handler)
        assert stream.getvalue() == f"{ids(span)}|hello\n"

    @pytest.mark.parametrize("level", [logging.DEBUG, logging.INFO, logging.ERROR])
    def test_filter_keeps_every_record(self, level: int) -> None:
        """The filter never drops a record."""
        record = logging.makeLogRecord({"msg": "hello", "levelno": level})
        assert ctxkit.TraceIdFilter().filter(record) is True
        assert record.__dict__["trace_id"] == ""
        assert record.__dict__["span_id"] == ""

    def test_trace_id_passed_through_extra_is_kept(self, tracer: trace.Tracer) -> None:
        """A record that already has a trace_id keeps it."""
        record = logging.makeLogRecord({"msg": "hello", "trace_id": "from-extra"})
        with tracer.start_as_current_span("request"):
            assert ctxkit.TraceIdFilter().filter(record) is True
        assert record.__dict__["trace_id"] == "from-extra"

    def test_trace_id_passed_through_extra_still_gets_a_span_id(
        self, logger: logging.Logger, stream: io.StringIO
    ) -> None:
        """A record with trace_id from extra= still gets span_id, so the format works."""
        logger.info("hello", extra={"trace_id": "from-extra"})
        assert stream.getvalue() == "from-extra||hello\n"

    def test_dict_config_factory(
        self, tracer: trace.Tracer, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The filter can be configured with logging.config.dictConfig's "()" factory key."""
        name = "test_ctxkit_logging_dict_config"
        logging.config.dictConfig(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "filters": {"trace_id": {"()": "ctxkit.TraceIdFilter"}},
                "formatters": {"plain": {"format": FORMAT}},
                "handlers": {
                    "stderr": {
                        "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr",
                        "filters": ["trace_id"],
                        "formatter": "plain",
                    }
                },
                "loggers": {name: {"handlers": ["stderr"], "level": "INFO", "propagate": False}},
            }
        )
        logger = logging.getLogger(name)
        try:
            with tracer.start_as_current_span("request") as span:
                logger.info("hello")
        finally:
            for handler in logger.handlers[:]:
                logger.removeHandler(handler)
                handler.close()
        assert capsys.readouterr().err == f"{ids(span)}|hello\n"


@pytest.mark.anyio
class TestTraceIdFilterInBackgroundTasks:
    async def test_detached_task_logs_the_request_trace_id(
        self,
        logger: logging.Logger,
        stream: io.StringIO,
        tracer: trace.Tracer,
        tracer_provider: TracerProvider,
    ) -> None:
        """A task run in a clone logs the request's trace id after the request span ended."""
        request_ended = anyio.Event()

        async def background() -> None:
            await request_ended.wait()
            logger.info("background")

        async with anyio.create_task_group() as app:
            with tracer.start_as_current_span("request") as span:
                logger.info("request")
                clone = ctxkit.clone(tracer_provider=tracer_provider)
                app.create_task(background(), context=clone)
            request_ended.set()
        trace_id = f"{span.get_span_context().trace_id:032x}"
        request_line, background_line = stream.getvalue().splitlines()
        assert request_line == f"{ids(span)}|request"
        assert background_line.startswith(f"{trace_id}|")
        assert background_line.endswith("|background")

    async def test_detached_task_without_a_span_logs_its_fake_id(
        self, logger: logging.Logger, stream: io.StringIO
    ) -> None:
        """A task run in a span-less clone logs the clone's fake id on every line."""
        clone = ctxkit.clone_without_span()
        fake = clone.run(ctxkit.current_trace_id)

        async def background() -> None:
            logger.info("first")
            await anyio.lowlevel.checkpoint()
            logger.info("second")

        async with anyio.create_task_group() as app:
            app.create_task(background(), context=clone)
        assert stream.getvalue() == f"{fake}||first\n{fake}||second\n"
