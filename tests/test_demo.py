from __future__ import annotations

import re
import subprocess
import sys
from typing import TYPE_CHECKING

import ctxkit
from ctxkit.__main__ import main

if TYPE_CHECKING:
    import pytest


class TestDemo:
    def test_demo_tells_the_whole_story(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The demo shows each mode: carried vars, failure, link, survivor, fake id, summary."""
        assert main(["demo"]) == 0
        out = capsys.readouterr().out
        signup = re.search(r"trace=([0-9a-f]{32}) demo\.app +handling signup", out)
        assert signup is not None
        trace_id = signup.group(1)
        # the child task logs with the request's trace id, sees registered vars, not db_session
        assert re.search(
            rf"trace={trace_id} demo\.app +email sent to ada@example\.com "
            r"\(request_id=req-1, tenant=acme, db_session=<not carried>\)",
            out,
        )
        # span=False keeps the request's trace id; the failure is logged with it
        assert re.search(rf"trace={trace_id} demo\.app +audit: signup", out)
        assert re.search(rf"trace={trace_id} ctxkit +background task 'charge_card' failed", out)
        # the linked task logs under a different trace id, and its span links to the request
        linked = re.search(r"trace=([0-9a-f]{32}) demo\.app +search index rebuilt", out)
        assert linked is not None
        assert linked.group(1) != trace_id
        assert re.search(rf"link -> trace {trace_id} span [0-9a-f]{{16}}", out)
        # the report outlives its cancelled request
        assert "report q3 finished although its request was cancelled" in out
        assert "generate_report  [INTERNAL, outcome=ok]" in out
        # no trace active: a fake trace id correlates the log line
        assert re.search(r"trace=[0-9a-f]{32} demo\.app +exchange rates refreshed", out)
        # the shutdown summary names what it cancelled; statistics add up
        assert "cancelled 1 running and 0 pending tasks (warm_cache)" in out
        assert "warm_cache  [INTERNAL, outcome=cancelled]" in out
        assert "charge_card  [INTERNAL, outcome=error, status=ERROR(" in out
        stats = dict(
            re.findall(r"^  (spawned|ok|error|timeout|cancelled|rejected) +(\d+)$", out, re.M)
        )
        assert stats == {
            "spawned": "7",
            "ok": "5",
            "error": "1",
            "timeout": "0",
            "cancelled": "1",
            "rejected": "0",
        }

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
