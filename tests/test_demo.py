from __future__ import annotations

import re
import subprocess
import sys
from typing import TYPE_CHECKING

import ctxkit
from ctxkit.__main__ import main

if TYPE_CHECKING:
    import pytest

HEX32 = "[0-9a-f]{32}"
HEX16 = "[0-9a-f]{16}"


class TestDemo:
    def test_demo_tells_the_whole_story(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The demo shows each mode: carried vars, failure, link, survivor, fake id, summary."""
        assert main(["demo"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^trace id +span id +task +logger +message$", out, re.M)
        signup = re.search(rf"^({HEX32}) ({HEX16}) +- +demo\.app +handling signup$", out, re.M)
        assert signup is not None
        trace_id, request_span = signup.groups()
        # the child task logs with the request's trace id, the span id current in it (its
        # smtp.send span) and its name; it sees registered vars, not db_session
        email = re.search(
            rf"^{trace_id} ({HEX16}) send_welcome_email +demo\.app +email sent to ada@example\.com "
            r"\(request_id=req-1, tenant=acme, db_session=<not carried>\)$",
            out,
            re.M,
        )
        assert email is not None
        assert re.search(rf"^ +smtp\.send +\[INTERNAL\] +span {email.group(1)} ", out, re.M)
        # span=False keeps the request's trace id and span; the failure is logged with its own
        # task's span id and name
        assert re.search(
            rf"^{trace_id} {request_span} write_audit_record +demo\.app +audit: signup", out, re.M
        )
        failed = re.search(
            rf"^{trace_id} ({HEX16}) charge_card +ctxkit +background task 'charge_card' failed",
            out,
            re.M,
        )
        assert failed is not None
        assert re.search(rf"charge_card +\[INTERNAL, outcome=error.*span {failed.group(1)}", out)
        # the linked task logs under a different trace id, and its span links to the request
        linked = re.search(
            rf"^({HEX32}) {HEX16} rebuild_search_index +demo\.app +search", out, re.M
        )
        assert linked is not None
        assert linked.group(1) != trace_id
        assert re.search(rf"link -> trace {trace_id} span {request_span}", out)
        # the report outlives its cancelled request
        assert "report q3 finished although its request was cancelled" in out
        assert re.search(r"generate_report  \[INTERNAL, outcome=ok\]  span [0-9a-f]{16}", out)
        # the shutdown summary names what it cancelled; statistics add up
        assert "cancelled 1 running and 0 pending tasks (warm_cache)" in out
        assert "warm_cache  [INTERNAL, outcome=cancelled]" in out
        assert "charge_card  [INTERNAL, outcome=error, status=ERROR(" in out
        stats = dict(
            re.findall(r"^  (spawned|ok|error|timeout|cancelled|rejected) +(\d+)$", out, re.M)
        )
        assert stats == {
            "spawned": "8",
            "ok": "6",
            "error": "1",
            "timeout": "0",
            "cancelled": "1",
            "rejected": "0",
        }

    def test_span_false_tasks_are_shown(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The tasks without a span appear in the trees, under the span current in them."""
        main(["demo"])
        out = capsys.readouterr().out
        trees = out[out.index("== Traces") : out.index("== Runner statistics")]
        signup = re.search(r"^trace [0-9a-f]{32}\n  POST /signup .*?(?=\n\n)", trees, re.M | re.S)
        assert signup is not None
        assert re.search(
            r"^    write_audit_record  \[span=False: no span of its own, outcome=ok\]$",
            signup.group(0),
            re.M,
        )
        for name in ("refresh_exchange_rates", "notify_accounting"):
            assert re.search(
                rf"^  {name}  \[span=False: no span of its own, outcome=ok\]$", trees, re.M
            )

    def test_a_fake_trace_id_joins_a_request_and_its_tasks(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The untraced webhook's lines and both its tasks' lines share one fake id, which is
        no exported span's trace id and is listed as a fake trace with its two tasks."""
        main(["demo"])
        out = capsys.readouterr().out
        received = re.search(rf"^({HEX32}) - +- +demo\.app +payment webhook received", out, re.M)
        assert received is not None
        fake = received.group(1)
        lines = re.findall(rf"^{fake} - +(\w+|-) +demo\.app +(.*)$", out, re.M)
        assert sorted(task for task, _ in lines) == [
            "-",
            "-",
            "notify_accounting",
            "refresh_exchange_rates",
        ]
        assert f"trace {fake}  (a fake trace id: no spans, it only joins log lines)" in out
        span_traces = re.findall(r"^trace ([0-9a-f]{32})$", out, re.M)
        assert len(span_traces) == 4
        assert fake not in span_traces

    def test_demo_leaves_global_state_alone(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Running the demo registers no var for good and sets no global tracer provider."""
        from opentelemetry import trace

        before = trace.get_tracer_provider()
        main(["demo"])
        capsys.readouterr()
        assert trace.get_tracer_provider() is before
        assert ctxkit._clone.registered() == ()

    def test_unknown_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Anything but `demo` prints the usage and exits with status 2."""
        assert main(["nope"]) == 2
        assert "usage: python -m ctxkit demo" in capsys.readouterr().err

    def test_module_entry_point(self) -> None:
        """`python -m ctxkit demo` runs as a command and exits 0."""
        result = subprocess.run(
            [sys.executable, "-m", "ctxkit", "demo"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "Runner statistics" in result.stdout
