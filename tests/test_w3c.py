"""Conformance tests for ctxkit._w3c, table-driven from the W3C test suite.

Vectors whose id starts with ``test_`` come from ``w3c/trace-context``
``test/test.py`` at ``acab820`` (the suite after w3c/trace-context#584, which
moved ``tracestate`` keys to the Level 2 grammar, and #477, which lets a
duplicated key through); the suffix letter is the request's order inside that
test. The suite drives an HTTP service, so header fields are read here with
``HttpGetter``: names in any case, a repeated field as one more list value.
Vectors whose id starts with ``extra_`` are not in the suite and check the
spec's grammar at its edges.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import (
    TraceContextTextMapPropagator,
)

from ctxkit._w3c import (
    MAX_TRACEPARENT_LENGTH,
    MAX_TRACESTATE_LENGTH,
    Reason,
    W3CTraceContextPropagator,
    format_traceparent,
    format_tracestate,
    parse_traceparent,
    parse_tracestate,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

Headers = list[tuple[str, str]]

TRACE_ID = "12345678901234567890123456789012"
PARENT_ID = "1234567890123456"
TP = f"00-{TRACE_ID}-{PARENT_ID}-01"  # the suite's traceparent, sampled
TP_00 = f"00-{TRACE_ID}-{PARENT_ID}-00"  # the one its tracestate tests send
CC = f"cc-{TRACE_ID}-{PARENT_ID}-01"
FUTURE = "-what-the-future-will-be-like"
BAR = [f"bar{i:02d}={i:02d}" for i in range(1, 34)]
BAR_32 = [(f"bar{i:02d}", f"{i:02d}") for i in range(1, 33)]
KEY = "abcdefghijklmnopqrstuvwxyz0123456789_-*/"
VALUE = "".join(map(chr, [*range(0x20, 0x2C), *range(0x2D, 0x3D), *range(0x3E, 0x7F)]))

PROPAGATOR = W3CTraceContextPropagator()


class HttpGetter(Getter[Headers]):
    """Read header fields as an HTTP server does: any case, repeats as a list."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        return [value for name, value in carrier if name.lower() == key] or None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


HTTP = HttpGetter()


def extract(headers: Headers) -> tuple[SpanContext, list[Reason]]:
    context, reasons = PROPAGATOR.extract_with_reasons(headers, getter=HTTP)
    return trace.get_current_span(context).get_span_context(), reasons


def with_tracestate(*values: str) -> Headers:
    return [("traceparent", TP_00), *(("tracestate", value) for value in values)]


CONTINUED = [
    pytest.param([("traceparent", TP)], 1, id="test_traceparent_included_tracestate_missing"),
    pytest.param([("TraceParent", TP)], 1, id="test_traceparent_header_name_valid_casing_a"),
    pytest.param([("TrAcEpArEnT", TP)], 1, id="test_traceparent_header_name_valid_casing_b"),
    pytest.param([("TRACEPARENT", TP)], 1, id="test_traceparent_header_name_valid_casing_c"),
    pytest.param([("traceparent", CC)], 1, id="test_traceparent_version_0xcc_a"),
    pytest.param([("traceparent", CC + FUTURE)], 1, id="test_traceparent_version_0xcc_b"),
    pytest.param([("traceparent", " " + TP)], 1, id="test_traceparent_ows_handling_a"),
    pytest.param([("traceparent", "\t" + TP)], 1, id="test_traceparent_ows_handling_b"),
    pytest.param([("traceparent", TP + " ")], 1, id="test_traceparent_ows_handling_c"),
    pytest.param([("traceparent", TP + "\t")], 1, id="test_traceparent_ows_handling_d"),
    pytest.param([("traceparent", "\t " + TP + " \t")], 1, id="test_traceparent_ows_handling_e"),
    pytest.param([("traceparent", TP_00)], 0, id="test_tracestate_included_traceparent_included"),
    pytest.param([("traceparent", TP[:-2] + "02")], 2, id="test_propagates_random_flag"),
    pytest.param([("traceparent", TP[:-2] + "ff")], 3, id="extra_reserved_flags_cleared"),
    pytest.param([("traceparent", CC + "-")], 1, id="extra_higher_version_empty_field"),
]


@pytest.mark.parametrize(("headers", "flags"), CONTINUED)
def test_valid_traceparent_continues_the_trace(headers: Headers, flags: int) -> None:
    """A valid traceparent yields a remote span context with its ids and flags."""
    span_context, reasons = extract(headers)
    assert reasons == []
    assert span_context.is_valid
    assert span_context.is_remote
    assert f"{span_context.trace_id:032x}" == TRACE_ID
    assert f"{span_context.span_id:016x}" == PARENT_ID
    assert span_context.trace_flags == flags
    assert isinstance(span_context.trace_flags, TraceFlags)


def bad(value: str, reason: Reason, case_id: str) -> object:
    return pytest.param([("traceparent", value)], reason, id=case_id)


INVALID = Reason.TRACEPARENT_INVALID_FORMAT
RESTARTED = [
    pytest.param(
        [
            ("traceparent", TP.replace(TRACE_ID, TRACE_ID[:-1] + "1")),
            ("traceparent", TP),
        ],
        Reason.TRACEPARENT_MULTIPLE,
        id="test_traceparent_duplicated",
    ),
    pytest.param([("trace-parent", TP)], None, id="test_traceparent_header_name_a"),
    pytest.param([("trace.parent", TP)], None, id="test_traceparent_header_name_b"),
    bad(TP + ".", INVALID, "test_traceparent_version_0x00_a"),
    bad(TP + FUTURE, INVALID, "test_traceparent_version_0x00_b"),
    bad(CC + ".what-the-future-will-be-like", INVALID, "test_traceparent_version_0xcc_c"),
    bad("ff" + TP[2:], Reason.TRACEPARENT_VERSION_FF, "test_traceparent_version_0xff"),
    bad(".0" + TP[2:], INVALID, "test_traceparent_version_illegal_characters_a"),
    bad("0." + TP[2:], INVALID, "test_traceparent_version_illegal_characters_b"),
    bad("000" + TP[2:], INVALID, "test_traceparent_version_too_long_a"),
    bad("0000" + TP[2:], INVALID, "test_traceparent_version_too_long_b"),
    bad("0" + TP[2:], INVALID, "test_traceparent_version_too_short"),
    bad(
        TP.replace(TRACE_ID, "0" * 32),
        Reason.TRACEPARENT_ZERO_TRACE_ID,
        "test_traceparent_trace_id_all_zero",
    ),
    bad(
        TP.replace(TRACE_ID, "." + TRACE_ID[1:]),
        INVALID,
        "test_traceparent_trace_id_illegal_characters_a",
    ),
    bad(
        TP.replace(TRACE_ID, TRACE_ID[:-1] + "."),
        INVALID,
        "test_traceparent_trace_id_illegal_characters_b",
    ),
    bad(
        TP.replace(TRACE_ID, TRACE_ID + "3"),
        INVALID,
        "test_traceparent_trace_id_too_long",
    ),
    bad(
        TP.replace(TRACE_ID, TRACE_ID[:-1]),
        INVALID,
        "test_traceparent_trace_id_too_short",
    ),
    bad(
        TP.replace(PARENT_ID, "0" * 16),
        Reason.TRACEPARENT_ZERO_PARENT_ID,
        "test_traceparent_parent_id_all_zero",
    ),
    bad(
        TP.replace(PARENT_ID, "." + PARENT_ID[1:]),
        INVALID,
        "test_traceparent_parent_id_illegal_characters_a",
    ),
    bad(
        TP.replace(PARENT_ID, PARENT_ID[:-1] + "."),
        INVALID,
        "test_traceparent_parent_id_illegal_characters_b",
    ),
    bad(
        TP.replace(PARENT_ID, PARENT_ID + "7"),
        INVALID,
        "test_traceparent_parent_id_too_long",
    ),
    bad(
        TP.replace(PARENT_ID, PARENT_ID[:-1]),
        INVALID,
        "test_traceparent_parent_id_too_short",
    ),
    bad(TP[:-2] + ".0", INVALID, "test_traceparent_trace_flags_illegal_characters_a"),
    bad(TP[:-2] + "0.", INVALID, "test_traceparent_trace_flags_illegal_characters_b"),
    bad(TP[:-2] + "001", INVALID, "test_traceparent_trace_flags_too_long"),
    bad(TP[:-2] + "1", INVALID, "test_traceparent_trace_flags_too_short"),
    bad(
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        INVALID,
        "extra_uppercase_hex",
    ),
    bad("CC" + CC[2:], INVALID, "extra_uppercase_version"),
    bad(TP + "-", INVALID, "extra_version_00_trailing_dash"),
    bad(
        CC.replace(TRACE_ID, "0" * 32),
        Reason.TRACEPARENT_ZERO_TRACE_ID,
        "extra_higher_version_zero_trace_id",
    ),
    bad(CC[:-3] + "x01", INVALID, "extra_higher_version_bad_delimiter"),
    bad(TP + "\r\n", INVALID, "extra_crlf_is_not_ows"),
    bad(TP + "," + TP, INVALID, "extra_repeated_field_joined_with_comma"),
    bad("", INVALID, "extra_empty"),
    bad(
        CC + "-" + "x" * MAX_TRACEPARENT_LENGTH,
        Reason.TRACEPARENT_TOO_LONG,
        "extra_too_long",
    ),
]


@pytest.mark.parametrize(("headers", "reason"), RESTARTED)
def test_invalid_traceparent_restarts_the_trace(headers: Headers, reason: Reason | None) -> None:
    """An invalid or missing traceparent leaves the context without a span."""
    headers = [*headers, ("tracestate", "foo=1")]
    given_context = Context({"unrelated": 1})
    context, reasons = PROPAGATOR.extract_with_reasons(headers, given_context, HTTP)
    assert context is given_context
    assert reasons == ([] if reason is None else [reason])


def kept(
    values: Sequence[str],
    items: list[tuple[str, str]],
    case_id: str,
    reason: Reason | None = None,
) -> object:
    return pytest.param(values, items, reason, id=case_id)


Z256, Z257 = "z" * 256, "z" * 257
T241_V14 = "t" * 241 + "@" + "v" * 14
T242_V, T_V15 = "t" * 242 + "@v", "t@" + "v" * 15
DUPLICATE = Reason.TRACESTATE_DUPLICATE_KEY
KEPT = [
    kept(
        ["foo=1,bar=2"],
        [("foo", "1"), ("bar", "2")],
        "test_tracestate_included_traceparent_included",
    ),
    kept([""], [], "test_tracestate_empty_header_a"),
    kept(["foo=1", ""], [("foo", "1")], "test_tracestate_empty_header_b"),
    kept(["", "foo=1"], [("foo", "1")], "test_tracestate_empty_header_c"),
    kept(
        ["foo=1,bar=2", "rojo=1,congo=2", "baz=3"],
        [("foo", "1"), ("bar", "2"), ("rojo", "1"), ("congo", "2"), ("baz", "3")],
        "test_tracestate_multiple_headers_different_keys",
    ),
    kept(["foo=1,foo=1"], [("foo", "1")], "test_tracestate_duplicated_keys_a", DUPLICATE),
    kept(["foo=1,foo=2"], [("foo", "1")], "test_tracestate_duplicated_keys_b", DUPLICATE),
    kept(
        ["foo=1", "foo=1"],
        [("foo", "1")],
        "test_tracestate_duplicated_keys_c",
        DUPLICATE,
    ),
    kept(
        ["foo=1", "foo=2"],
        [("foo", "1")],
        "test_tracestate_duplicated_keys_d",
        DUPLICATE,
    ),
    kept([f"{KEY}={VALUE}"], [(KEY, VALUE)], "test_tracestate_all_allowed_characters_a"),
    kept(
        [f"{KEY}@a-z0-9_-*/={VALUE}"],
        [(f"{KEY}@a-z0-9_-*/", VALUE)],
        "test_tracestate_all_allowed_characters_b",
    ),
    kept(
        ["foo=1 \t , \t bar=2, \t baz=3"],
        [("foo", "1"), ("bar", "2"), ("baz", "3")],
        "test_tracestate_ows_handling_a",
    ),
    kept(
        ["foo=1\t \t,\t \tbar=2,\t \tbaz=3"],
        [("foo", "1"), ("bar", "2"), ("baz", "3")],
        "test_tracestate_ows_handling_b",
    ),
    kept([" foo=1"], [("foo", "1")], "test_tracestate_ows_handling_c"),
    kept(["\tfoo=1"], [("foo", "1")], "test_tracestate_ows_handling_d"),
    kept(["foo=1 "], [("foo", "1")], "test_tracestate_ows_handling_e"),
    kept(["foo=1\t"], [("foo", "1")], "test_tracestate_ows_handling_f"),
    kept(["\t foo=1 \t"], [("foo", "1")], "test_tracestate_ows_handling_g"),
    kept(
        ["foo@=1,bar=2"],
        [("foo@", "1"), ("bar", "2")],
        "test_tracestate_key_illegal_vendor_format_a",
    ),
    kept(
        ["foo@@bar=1,bar=2"],
        [("foo@@bar", "1"), ("bar", "2")],
        "test_tracestate_key_illegal_vendor_format_c",
    ),
    kept(
        ["foo@bar@baz=1,bar=2"],
        [("foo@bar@baz", "1"), ("bar", "2")],
        "test_tracestate_key_illegal_vendor_format_d",
    ),
    kept(
        [
            ",".join(BAR[0:10]),
            ",".join(BAR[10:20]),
            ",".join(BAR[20:30]),
            ",".join(BAR[30:32]),
        ],
        BAR_32,
        "test_tracestate_member_count_limit_a",
    ),
    kept(
        ["foo=1", f"{Z256}=1"],
        [("foo", "1"), (Z256, "1")],
        "test_tracestate_key_length_limit_a",
    ),
    kept(
        ["foo=1", f"{T241_V14}=1"],
        [("foo", "1"), (T241_V14, "1")],
        "test_tracestate_key_length_limit_c",
    ),
    kept(
        ["foo=1", f"{T242_V}=1"],
        [("foo", "1"), (T242_V, "1")],
        "test_tracestate_key_length_limit_d",
    ),
    kept(
        ["foo=1", f"{T_V15}=1"],
        [("foo", "1"), (T_V15, "1")],
        "test_tracestate_key_length_limit_e",
    ),
    kept(["foo=1, ,bar=2"], [("foo", "1"), ("bar", "2")], "extra_whitespace_only_member"),
    kept(["1abc=1"], [("1abc", "1")], "extra_key_starting_with_digit"),
    kept(["foo= 1"], [("foo", " 1")], "extra_leading_space_is_part_of_value"),
    kept(["foo=" + "x" * 256], [("foo", "x" * 256)], "extra_longest_value"),
    kept([",".join(BAR[:32]) + ",,"], BAR_32, "extra_empty_members_not_counted"),
]


@pytest.mark.parametrize(("values", "items", "reason"), KEPT)
def test_valid_tracestate_is_kept(
    values: list[str], items: list[tuple[str, str]], reason: Reason | None
) -> None:
    """A valid tracestate is kept in order, a repeated key by its first entry."""
    span_context, reasons = extract(with_tracestate(*values))
    assert f"{span_context.trace_id:032x}" == TRACE_ID
    assert list(span_context.trace_state.items()) == items
    assert reasons == ([] if reason is None else [reason])
    assert parse_tracestate(values)[1] == reason


def dropped(values: Sequence[str], reason: Reason, case_id: str) -> object:
    return pytest.param(values, reason, id=case_id)


MEMBER = Reason.TRACESTATE_INVALID_MEMBER
DROPPED = [
    dropped(["foo =1"], MEMBER, "test_tracestate_key_illegal_characters_a"),
    dropped(["FOO=1"], MEMBER, "test_tracestate_key_illegal_characters_b"),
    dropped(["foo.bar=1"], MEMBER, "test_tracestate_key_illegal_characters_c"),
    dropped(["@foo=1,bar=2"], MEMBER, "test_tracestate_key_illegal_vendor_format_b"),
    dropped(
        [
            ",".join(BAR[0:10]),
            ",".join(BAR[10:20]),
            ",".join(BAR[20:30]),
            ",".join(BAR[30:33]),
        ],
        Reason.TRACESTATE_TOO_MANY_MEMBERS,
        "test_tracestate_member_count_limit_b",
    ),
    dropped(["foo=1", f"{Z257}=1"], MEMBER, "test_tracestate_key_length_limit_b"),
    dropped(["foo=bar=baz"], MEMBER, "test_tracestate_value_illegal_characters_a"),
    dropped(["foo=,bar=3"], MEMBER, "test_tracestate_value_illegal_characters_b"),
    dropped(["foo=1", "t" * 242 + "@" + "v" * 14 + "=1"], MEMBER, "extra_key_257_with_at"),
    dropped(["foo=" + "x" * 257], MEMBER, "extra_value_too_long"),
    dropped(["foo=a\tb"], MEMBER, "extra_tab_in_value"),
    dropped(["foo=a\x7fb"], MEMBER, "extra_del_in_value"),
    dropped(["foo=\u00e9"], MEMBER, "extra_non_ascii_value"),
    dropped(["_foo=1"], MEMBER, "extra_key_starting_with_underscore"),
    dropped(["=1"], MEMBER, "extra_empty_key"),
    dropped(["foo=1,bar"], MEMBER, "extra_member_without_equals"),
    dropped(["foo=1", "bar=1,foo=2,x"], MEMBER, "extra_invalid_after_duplicate"),
    dropped(
        ["foo=" + "x" * MAX_TRACESTATE_LENGTH],
        Reason.TRACESTATE_TOO_LONG,
        "extra_too_long",
    ),
    dropped(
        ["a=1"] * (MAX_TRACESTATE_LENGTH // 4 + 1),
        Reason.TRACESTATE_TOO_LONG,
        "extra_too_long_joined",
    ),
]


@pytest.mark.parametrize(("values", "reason"), DROPPED)
def test_invalid_tracestate_is_dropped_and_traceparent_kept(
    values: list[str], reason: Reason
) -> None:
    """An invalid tracestate is dropped whole while the traceparent is kept."""
    span_context, reasons = extract(with_tracestate(*values))
    assert f"{span_context.trace_id:032x}" == TRACE_ID
    assert len(span_context.trace_state) == 0
    assert reasons == [reason]
    assert parse_tracestate(values) == (None, reason)


@pytest.mark.parametrize(
    "name",
    ["trace-state", "trace.state"],
    ids=["test_tracestate_header_name_a", "test_tracestate_header_name_b"],
)
def test_tracestate_under_another_name_is_ignored(name: str) -> None:
    """Only a field named ``tracestate`` (any case) is read."""
    span_context, reasons = extract([("traceparent", TP_00), (name, "foo=1")])
    assert span_context.is_valid
    assert len(span_context.trace_state) == 0
    assert reasons == []


@pytest.mark.parametrize("name", ["TraceState", "TrAcEsTaTe", "TRACESTATE"])
def test_tracestate_name_in_any_case(name: str) -> None:
    """test_tracestate_header_name_valid_casing: the name's case is ignored."""
    span_context, _ = extract([("traceparent", TP_00), (name, "foo=1")])
    assert dict(span_context.trace_state) == {"foo": "1"}


@pytest.mark.parametrize(
    "headers",
    [[], [("tracestate", "foo=1,bar=2")]],
    ids=[
        "test_both_traceparent_and_tracestate_missing",
        "test_tracestate_included_traceparent_missing",
    ],
)
def test_tracestate_without_traceparent_is_not_parsed(headers: Headers) -> None:
    """test_tracestate_included_traceparent_missing: no span, nothing reported."""
    context, reasons = PROPAGATOR.extract_with_reasons(headers, getter=HTTP)
    assert context == Context()
    assert reasons == []


def test_invalid_traceparent_skips_tracestate() -> None:
    """A rejected traceparent stops there: the tracestate is never parsed."""
    headers = [("traceparent", "ff" + TP[2:]), ("tracestate", "FOO=1")]
    _, reasons = PROPAGATOR.extract_with_reasons(headers, getter=HTTP)
    assert reasons == [Reason.TRACEPARENT_VERSION_FF]


# OpenTelemetry's TraceContextTextMapPropagator (opentelemetry-api 1.45.2) fails
# these four suite tests: it keeps the first of two traceparent fields, drops
# the whole tracestate on a duplicated key, and checks keys with the Level 1
# tenant@vendor grammar (rejecting "foo@" and a 242-character tenant).
OTEL_DIVERGES = [
    pytest.param(
        [
            ("traceparent", TP.replace(TRACE_ID, TRACE_ID[:-1] + "1")),
            ("traceparent", TP),
        ],
        None,
        id="test_traceparent_duplicated",
    ),
    pytest.param(
        with_tracestate("foo=1,foo=2"),
        {"foo": "1"},
        id="test_tracestate_duplicated_keys",
    ),
    pytest.param(
        with_tracestate("foo@=1,bar=2"),
        {"foo@": "1", "bar": "2"},
        id="test_tracestate_key_illegal_vendor_format",
    ),
    pytest.param(
        with_tracestate("foo=1", f"{T242_V}=1"),
        {"foo": "1", T242_V: "1"},
        id="test_tracestate_key_length_limit",
    ),
]


@pytest.mark.parametrize(("headers", "state"), OTEL_DIVERGES)
def test_passes_where_opentelemetry_propagator_fails(
    headers: Headers, state: dict[str, str] | None
) -> None:
    """Ours meets the suite (None: restart) where OpenTelemetry's does not."""
    ours, _ = extract(headers)
    otel_context = TraceContextTextMapPropagator().extract(headers, getter=HTTP)
    otel = trace.get_current_span(otel_context).get_span_context()
    if state is None:
        assert not ours.is_valid
        assert otel.is_valid
    else:
        assert dict(ours.trace_state) == state
        assert dict(otel.trace_state) != state


def test_level2_keys_survive_opentelemetry_trace_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Keys OTel's own TraceState would drop are kept, and nothing is logged."""
    caplog.set_level(logging.DEBUG)
    state, reason = parse_tracestate(["foo@=1", f"{T_V15}=2,0x@y=3"])
    assert reason is None
    assert state is not None
    assert isinstance(state, TraceState)
    assert dict(state) == {"foo@": "1", T_V15: "2", "0x@y": "3"}
    assert format_tracestate(state) == f"foo@=1,{T_V15}=2,0x@y=3"
    assert caplog.records == []
    assert dict(parse_tracestate("a=1, b=2")[0] or {}) == {"a": "1", "b": "2"}  # a lone str


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.TRACEPARENT_INVALID_FORMAT),
        (TP.encode(), Reason.TRACEPARENT_INVALID_FORMAT),
        (123, Reason.TRACEPARENT_INVALID_FORMAT),
        (CC + "-" + "x" * (MAX_TRACEPARENT_LENGTH - 56), None),
        (CC + "-" + "x" * (MAX_TRACEPARENT_LENGTH - 55), Reason.TRACEPARENT_TOO_LONG),
    ],
    ids=["none", "bytes", "int", "at_length_limit", "over_length_limit"],
)
def test_parse_traceparent_reasons(value: object, reason: Reason | None) -> None:
    """parse_traceparent rejects non-strings and bounds the length it reads."""
    span_context, got = parse_traceparent(value)
    assert got == reason
    assert (span_context is None) == (reason is not None)


def test_dict_carrier_is_read_in_any_case_and_lists_are_fields() -> None:
    """With the default getter, names match in any case and a list is fields."""
    span_context, reasons = _dict_extract({"TraceParent": TP, "TRACESTATE": ["a=1", "b=2"]})
    assert span_context.is_valid
    assert dict(span_context.trace_state) == {"a": "1", "b": "2"}
    assert reasons == []
    _, reasons = _dict_extract({"traceparent": [TP, TP]})
    assert reasons == [Reason.TRACEPARENT_MULTIPLE]
    _, reasons = _dict_extract({"traceparent": TP.encode()})
    assert reasons == [Reason.TRACEPARENT_INVALID_FORMAT]
    _, reasons = _dict_extract({"traceparent": TP, "tracestate": [b"a=1"]})
    assert reasons == [Reason.TRACESTATE_INVALID_MEMBER]


def _dict_extract(carrier: dict[str, object]) -> tuple[SpanContext, list[Reason]]:
    context, reasons = PROPAGATOR.extract_with_reasons(carrier)
    return trace.get_current_span(context).get_span_context(), reasons


class BrokenGetter(Getter[dict[str, str]]):
    """Fail on one key, as a misbehaving carrier adapter might."""

    def __init__(self, broken: str) -> None:
        self.broken = broken

    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        if key == self.broken:
            raise RuntimeError(key)
        return [carrier[key]] if key in carrier else None

    def keys(self, carrier: dict[str, str]) -> list[str]:
        raise RuntimeError("keys")


def test_unreadable_carrier_is_reported_not_raised() -> None:
    """A carrier or getter that raises is reported as ``carrier.unreadable``."""
    context = Context({"k": 1})
    assert PROPAGATOR.extract_with_reasons(None, context) == (
        context,
        [Reason.CARRIER_UNREADABLE],
    )
    carrier = {"traceparent": TP}
    got, reasons = PROPAGATOR.extract_with_reasons(carrier, context, BrokenGetter("x"))
    assert reasons == [Reason.CARRIER_UNREADABLE]  # tracestate's keys() raised
    assert trace.get_current_span(got).get_span_context().is_valid
    got, reasons = PROPAGATOR.extract_with_reasons(carrier, context, BrokenGetter("traceparent"))
    assert (got, reasons) == (context, [Reason.CARRIER_UNREADABLE])


def test_extract_without_context_starts_from_an_empty_one() -> None:
    """``extract`` drops the reasons; with no context it starts from Context()."""
    assert PROPAGATOR.extract({"traceparent": "nope"}) == Context()
    context = PROPAGATOR.extract({"traceparent": TP})
    assert trace.get_current_span(context).get_span_context().trace_id == int(TRACE_ID, 16)


@pytest.mark.parametrize(
    "headers",
    [
        [("traceparent", TP)],
        [
            ("traceparent", TP_00),
            ("tracestate", "rojo=00f067aa0ba902b7, congo=t61rcWkgMzE"),
        ],
        [("traceparent", CC + FUTURE), ("tracestate", "foo@=1")],
    ],
    ids=["traceparent_only", "with_tracestate", "higher_version_downgraded"],
)
def test_inject_round_trips_extract(headers: Headers) -> None:
    """Injecting an extracted context writes version 00 and the same members."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, PROPAGATOR.extract(headers, getter=HTTP))
    assert carrier["traceparent"] == "00" + headers[0][1][2:55]
    if len(headers) > 1:
        members = [m.strip() for m in headers[1][1].split(",")]
        assert carrier["tracestate"] == ",".join(members)
    else:
        assert "tracestate" not in carrier
    assert PROPAGATOR.fields == {"traceparent", "tracestate"}


def test_inject_writes_nothing_without_a_valid_span() -> None:
    """No valid span context in the context means an untouched carrier."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, Context())
    assert carrier == {}


def test_inject_clears_reserved_flags() -> None:
    """Only sampled and random-trace-id are sent; reserved bits go out as 0."""
    span_context = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(0xFF))
    assert format_traceparent(span_context) == f"00-{1:032x}-{2:016x}-03"


@given(
    trace_id=st.integers(1, 2**128 - 1),
    span_id=st.integers(1, 2**64 - 1),
    flags=st.integers(0, 3),
)
def test_round_trip_property(trace_id: int, span_id: int, flags: int) -> None:
    """Any valid span context survives inject then extract unchanged."""
    span_context = SpanContext(trace_id, span_id, False, TraceFlags(flags))
    carrier: dict[str, str] = {}
    span = trace.NonRecordingSpan(span_context)
    PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    got, reasons = _dict_extract(dict(carrier))
    assert reasons == []
    assert (got.trace_id, got.span_id, got.trace_flags) == (trace_id, span_id, flags)


HEADERISH = st.from_regex(
    r"[ \t]?[0-9a-fA-F]{2}-[0-9a-f]{31,33}-[0-9a-f]{16}-[0-9a-f]{2}(-[ -~]{0,5})?",
    fullmatch=True,
)
MEMBERISH = st.from_regex(r"[ \ta-z0-9@_*/-]{0,6}=?[ -~]{0,6}", fullmatch=True)
SCALARS = st.one_of(
    st.none(),
    st.text(max_size=80),
    st.binary(max_size=80),
    st.integers(),
    st.floats(),
    HEADERISH,
    st.lists(MEMBERISH, max_size=5).map(",".join),
)
CARRIER_VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.tuples(SCALARS, SCALARS),
    st.dictionaries(st.text(max_size=4), SCALARS, max_size=2),
)
CARRIER_KEYS = st.one_of(
    st.sampled_from(["traceparent", "tracestate", "TraceParent", "TRACESTATE"]),
    st.text(max_size=12),
    st.integers(),
)


@given(st.dictionaries(CARRIER_KEYS, CARRIER_VALUES, max_size=6))
def test_arbitrary_carriers_never_raise(carrier: dict[object, object]) -> None:
    """No carrier content makes extract raise; reasons are known Reason values."""
    context = Context({"k": 1})
    got, reasons = PROPAGATOR.extract_with_reasons(carrier, context)
    assert set(reasons) <= set(Reason)
    assert got is context or got["k"] == 1
    assert isinstance(PROPAGATOR.extract(carrier), Context)


@given(st.one_of(st.none(), st.integers(), st.text(), st.lists(st.text()), st.binary()))
def test_non_mapping_carriers_never_raise(carrier: object) -> None:
    """Carriers that are not mappings are reported, not raised on."""
    context, reasons = PROPAGATOR.extract_with_reasons(carrier)
    assert context == Context()
    assert reasons == [Reason.CARRIER_UNREADABLE]
