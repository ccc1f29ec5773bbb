"""
The ``coreason-budget`` command line: every command in-process through ``main(argv)``
against the test redis, plus a few real subprocesses (``python -m coreason_budget``).
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from coreason_budget import BudgetExceededError, BudgetManager, UnknownModelError, _pricing
from coreason_budget._demo import DemoResult
from coreason_budget._windows import Calendar
from coreason_budget.cli import _duration, _ProgressBar, format_demo, main, refusal, table, usd

from .redis_server import RedisServer, free_port

NANO = 1_000_000_000
ManagerFactory = Callable[..., BudgetManager]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No COREASON_BUDGET_* from the outside and no .env: each test says what it configures."""
    for name in list(os.environ):
        if name.startswith("COREASON_BUDGET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, *argv, "--json")
    return code, json.loads(out)


class TestSpendAndUsage:
    """`spend` records money already spent; `usage` shows it per scope."""

    def test_spend_then_usage(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        """Text output: one aligned row per scope, amounts in dollars."""
        code, out, err = run(
            capsys, "--redis-url", redis_url, "spend", "alice", "0.05", "--project", "search",
            "--model", "gpt-4o",
        )  # fmt: skip
        assert (code, err) == (0, "")
        assert "recorded $0.05 for user alice, project search, model gpt-4o" in out
        code, out, _ = run(
            capsys, "--redis-url", redis_url, "usage", "alice", "--project", "search"
        )
        assert code == 0
        lines = out.splitlines()
        assert re.fullmatch(
            r"Spend in day \d{4}-\d{2}-\d{2} \(UTC\); resets at \d{4}-\d{2}-\d{2}"
            r"T00:00:00\+00:00 \(in [0-9dhms ]+\)",
            lines[0],
        ), lines[0]
        assert lines[1].split() == ["scope", "id", "spent", "limit", "remaining", "used"]
        assert lines[3].split() == ["user", "alice", "$0.05", "$10.00", "$9.95", "0.5%"]
        assert lines[4].split()[:3] == ["project", "search", "$0.05"]
        assert lines[5].split()[:3] == ["global", "-", "$0.05"]

    def test_usage_json_is_exact(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        """--json gives the HTTP API's shape with exact nano-dollars; '$' prefixes are accepted."""
        assert main(["spend", "bob", "$1.234567891", "--redis-url", redis_url]) == 0
        capsys.readouterr()
        code, doc = run_json(capsys, "usage", "bob", "--redis-url", redis_url)
        assert code == 0
        assert set(doc) == {"user", "global"}
        assert doc["user"]["spent_nano"] == 1_234_567_891
        assert doc["user"]["limit_nano"] == 10 * NANO
        assert doc["user"]["entity_id"] == "bob"
        assert doc["global"]["entity_id"] is None
        assert doc["user"]["window"] == doc["global"]["window"] == "day"
        resets_at = datetime.datetime.fromisoformat(doc["user"]["resets_at"])
        assert resets_at.utcoffset() == datetime.timedelta(0)
        assert resets_at.time() == datetime.time(0, 0)  # the next UTC midnight
        now = datetime.datetime.now(datetime.UTC)
        assert now < resets_at <= now + datetime.timedelta(days=1)

    def test_spend_json_and_idempotency_key(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        """A retried spend with the same key is recorded once."""
        argv = ("--redis-url", redis_url, "spend", "carol", "0.25", "--idempotency-key", "inv-7")
        for status in ("recorded", "duplicate", "duplicate"):
            code, doc = run_json(capsys, *argv)
            assert code == 0
            assert doc == {
                "status": status,
                "kind": "spend",
                "amount_usd": 0.25 if status == "recorded" else 0.0,
                "amount_nano": NANO // 4 if status == "recorded" else 0,
                "user_id": "carol",
                "project_id": None,
                "model": None,
                "cost_usd": 0.25,
                "idempotency_key": "inv-7",
            }
        _, doc = run_json(capsys, "--redis-url", redis_url, "usage", "carol")
        assert doc["user"]["spent_nano"] == NANO // 4

    def test_spend_is_recorded_past_the_limit(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        """Money already spent is never refused."""
        code, _, _ = run(capsys, "--redis-url", redis_url, "spend", "dave", "25")
        assert code == 0
        _, doc = run_json(capsys, "--redis-url", redis_url, "usage", "dave")
        assert doc["user"]["spent_nano"] == 25 * NANO
        assert doc["user"]["remaining_usd"] == 0.0

    def test_json_flag_before_or_after_the_command(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        """--json and --redis-url are global options, accepted on either side of the command."""
        code, out, _ = run(capsys, "--json", "usage", "erin", "--redis-url", redis_url)
        assert code == 0
        assert json.loads(out)["user"]["entity_id"] == "erin"

    def test_redis_url_overrides_the_environment(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The environment's store is used without --redis-url, and loses to it."""
        monkeypatch.setenv("COREASON_BUDGET_REDIS_URL", redis_url)
        monkeypatch.setenv("COREASON_BUDGET_DAILY_USER_LIMIT_USD", "3")
        code, doc = run_json(capsys, "usage", "frank")
        assert code == 0
        assert doc["user"]["limit_nano"] == 3 * NANO
        monkeypatch.setenv("COREASON_BUDGET_REDIS_URL", f"redis://127.0.0.1:{free_port()}")
        code, doc = run_json(capsys, "usage", "frank", "--redis-url", redis_url)
        assert code == 0


class TestReport:
    """`report` lists today's biggest spenders as aligned text, or JSON."""

    def test_text_report(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        """Total, users, projects and models, biggest first."""
        url = ("--redis-url", redis_url)
        assert (
            main(["spend", "alice", "1.5", "--project", "search", "--model", "gpt-4o", *url]) == 0
        )
        assert main(["spend", "bob", "2", "--project", "ads", "--model", "gpt-4o-mini", *url]) == 0
        capsys.readouterr()
        code, out, err = run(capsys, "report", *url)
        assert (code, err) == (0, "")
        first, second = out.splitlines()[:2]
        assert re.fullmatch(
            r"Spend in day \d{4}-\d{2}-\d{2} \(UTC\): \$3\.50 of \$5,000\.00 global daily "
            r"limit \(0\.0% used\)",
            first,
        ), first
        assert re.fullmatch(
            r"From \S+T00:00:00\+00:00 to \S+T00:00:00\+00:00 \(resets in [0-9dhms ]+\)", second
        ), second
        users = out.split("Top users:")[1].split("Top projects:")[0]
        assert users.index("bob") < users.index("alice")
        assert "search" in out.split("Top projects:")[1]
        models = out.split("Top models:")[1].splitlines()
        assert models[1].split() == ["id", "spent", "limit", "remaining", "used"]
        # No model limit is configured: none to show.
        assert models[3].split() == ["gpt-4o-mini", "$2.00", "no", "limit", "-", "-"]
        assert models[4].split() == ["gpt-4o", "$1.50", "no", "limit", "-", "-"]

    def test_empty_report(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        code, out, _ = run(capsys, "report", "--redis-url", redis_url)
        assert code == 0
        assert "$0.00 of $5,000.00" in out
        assert out.count("(none in this period)") == 3

    def test_json_top(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        """--top N cuts each list; the total still counts everyone."""
        for user, cost in (("a", "1"), ("b", "3"), ("c", "2")):
            assert main(["spend", user, cost, "--model", "m1", "--redis-url", redis_url]) == 0
        capsys.readouterr()
        code, doc = run_json(capsys, "report", "--top", "2", "--redis-url", redis_url)
        assert code == 0
        assert [u["entity_id"] for u in doc["users"]] == ["b", "c"]
        assert doc["total"]["spent_nano"] == 6 * NANO
        [model] = doc["models"]
        assert (model["entity_id"], model["spent_nano"], model["spent_usd"]) == (
            "m1",
            6 * NANO,
            6.0,
        )
        assert (model["limit_nano"], model["remaining_nano"]) == (None, None)
        assert doc["projects"] == []
        assert doc["window"] == "day"
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", doc["period"])
        assert doc["starts_at"] == f"{doc['period']}T00:00:00+00:00"

    def test_top_must_be_positive(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, _, err = run(capsys, "report", "--top", "0")
        assert code == 2
        assert "must be at least 1" in err


class TestSetLimit:
    """`set-limit SCOPE ID USD` overrides a limit in the store; USD 'none' removes it."""

    def limit(self, capsys: pytest.CaptureFixture[str], url: str, *scope: str) -> int:
        user, *project = scope
        args = ["usage", user, "--redis-url", url] + (["--project", project[0]] if project else [])
        _, doc = run_json(capsys, *args)
        return int(doc["project" if project else "user"]["limit_nano"])

    def test_user_override_and_removal(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        code, out, _ = run(capsys, "set-limit", "user", "alice", "25", "--redis-url", redis_url)
        assert code == 0
        assert out.strip() == "user alice: daily limit set to $25.00"
        assert self.limit(capsys, redis_url, "alice") == 25 * NANO
        code, out, _ = run(capsys, "set-limit", "user", "alice", "none", "--redis-url", redis_url)
        assert code == 0
        assert out.strip() == (
            "user alice: daily override removed; the configured default daily limit ($10.00) "
            "applies"
        )
        assert self.limit(capsys, redis_url, "alice") == 10 * NANO

    def test_project_override_json(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        code, doc = run_json(
            capsys, "set-limit", "project", "search", "0.5", "--redis-url", redis_url
        )
        assert code == 0
        assert doc == {
            "status": "updated",
            "scope": "project",
            "entity_id": "search",
            "window": "day",
            "limit_usd": 0.5,
        }
        assert self.limit(capsys, redis_url, "x", "search") == NANO // 2

    @pytest.mark.parametrize("argv", [["global", "-", "100"], ["global", "100"]])
    def test_global_with_dash_or_without_id(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, argv: list[str]
    ) -> None:
        code, doc = run_json(capsys, "set-limit", *argv, "--redis-url", redis_url)
        assert code == 0
        assert doc["entity_id"] is None
        _, usage = run_json(capsys, "usage", "x", "--redis-url", redis_url)
        assert usage["global"]["limit_nano"] == 100 * NANO

    def test_a_zero_limit_blocks_everything(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        assert main(["set-limit", "user", "mallory", "0", "--redis-url", redis_url]) == 0
        code, _, _ = run(capsys, "check", "mallory", "0", "--redis-url", redis_url)
        assert code == 1

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["user", "-", "5"], "'-' is not a user id"),
            (["global", "all", "5"], "the global scope takes '-'"),
            (["user", "alice"], "needs an ID and a USD amount"),
            (["user", "alice", "ten"], "USD must be a number of USD, got 'ten'"),
            (["user", "alice", "-3"], "must not be negative"),
            (["user", "alice", "nan"], "must be finite"),
            (["user", "alice", "1e30"], "above the maximum"),
        ],
    )
    def test_bad_arguments_exit_2(
        self,
        capsys: pytest.CaptureFixture[str],
        redis_url: str,
        redis_client: redis.Redis,
        argv: list[str],
        message: str,
    ) -> None:
        """Refused before anything is written, with one line on stderr."""
        code, out, err = run(capsys, "set-limit", *argv, "--redis-url", redis_url)
        assert code == 2
        assert out == ""
        assert message in err
        assert "Traceback" not in err
        assert redis_client.keys("*") == []

    def test_unknown_scope_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, _, err = run(capsys, "set-limit", "team", "a", "5")
        assert code == 2
        assert "invalid choice: 'team'" in err


class TestCheck:
    """`check USER COST`: exit 0 allowed, exit 1 refused with the reason; writes nothing."""

    def test_allowed(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: redis.Redis
    ) -> None:
        code, out, _ = run(capsys, "check", "alice", "0.05", "--redis-url", redis_url)
        assert code == 0
        assert out.strip() == "allowed: $0.05 fits the current budgets (user alice; day window)"
        assert redis_client.keys("*") == []

    def test_refused_names_the_scope(
        self, capsys: pytest.CaptureFixture[str], redis_url: str
    ) -> None:
        """The narrowest refusing scope is reported, as the library reports it."""
        url = ("--redis-url", redis_url)
        assert main(["set-limit", "project", "search", "1", *url]) == 0
        assert main(["spend", "alice", "0.9", "--project", "search", *url]) == 0
        capsys.readouterr()
        code, out, _ = run(capsys, "check", "bob", "0.2", "--project", "search", *url)
        assert code == 1
        assert re.fullmatch(
            r"refused: project search would exceed its daily limit: spent \$0\.90 of \$1\.00, "
            r"requested \$0\.20; resets at \S+T00:00:00\+00:00 \(in [0-9dhms ]+\)",
            out.strip(),
        ), out
        code, doc = run_json(capsys, "check", "bob", "0.2", "--project", "search", *url)
        assert code == 1
        assert doc["allowed"] is False
        assert (doc["scope"], doc["entity_id"]) == ("project", "search")
        assert doc["window"] == "day"
        resets_at = datetime.datetime.fromisoformat(doc["resets_at"])
        left = (resets_at - datetime.datetime.now(datetime.UTC)).total_seconds()
        assert 1 <= doc["retry_after_seconds"] <= 86400
        assert abs(doc["retry_after_seconds"] - left) < 5
        assert (doc["limit_nano"], doc["spent_nano"], doc["requested_nano"]) == (
            NANO,
            9 * NANO // 10,
            2 * NANO // 10,
        )
        assert "Budget exceeded" in doc["detail"]

    def test_allowed_json(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        code, doc = run_json(
            capsys, "check", "alice", "0.1", "--project", "p", "--redis-url", redis_url
        )
        assert code == 0
        assert doc == {
            "allowed": True,
            "user_id": "alice",
            "project_id": "p",
            "estimated_cost_usd": 0.1,
        }

    @pytest.mark.parametrize(
        ("cost", "message"), [("abc", "COST must be a number"), ("-1", "must not be negative")]
    )
    def test_bad_cost_exits_2(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, cost: str, message: str
    ) -> None:
        code, _, err = run(capsys, "check", "alice", cost, "--redis-url", redis_url)
        assert code == 2
        assert message in err

    def test_bad_id_exits_2(self, capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
        code, _, err = run(capsys, "check", "x" * 300, "1", "--redis-url", redis_url)
        assert code == 2
        assert "the maximum is 256" in err


class TestWindows:
    """--window for usage, report and set-limit; --period for report; refusals say when they end."""

    ZONE = "America/New_York"

    @pytest.fixture(autouse=True)
    def windows_env(self, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
        """A zone that is not UTC, a monthly user limit and a kept week with no default limit."""
        monkeypatch.setenv("COREASON_BUDGET_REDIS_URL", redis_url)
        monkeypatch.setenv("COREASON_BUDGET_TIMEZONE", self.ZONE)
        monkeypatch.setenv("COREASON_BUDGET_MONTHLY_USER_LIMIT_USD", "100")
        monkeypatch.setenv("COREASON_BUDGET_WINDOWS", "week")

    def local(self, iso: str) -> datetime.datetime:
        """An ISO instant of the output as the configured zone's wall time."""
        moment = datetime.datetime.fromisoformat(iso)
        assert moment.utcoffset() == datetime.timedelta(0)  # answers are in UTC
        return moment.astimezone(zoneinfo.ZoneInfo(self.ZONE))

    def test_usage_month_text_and_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The month's period and zone, its reset, and "no limit" where the month has none."""
        assert main(["spend", "alice", "2.5", "--project", "search"]) == 0
        capsys.readouterr()
        code, out, err = run(capsys, "usage", "alice", "--project", "search", "--window", "month")
        assert (code, err) == (0, "")
        lines = out.splitlines()
        header = re.fullmatch(
            r"Spend in month (\d{4}-\d{2}) \(America/New_York\); resets at (\S+) "
            r"\(in [0-9dhms ]+\)",
            lines[0],
        )
        assert header, lines[0]
        resets = self.local(header[2])
        assert (resets.day, resets.hour, resets.minute) == (1, 0, 0)  # local midnight, the 1st
        label = header[1]
        assert Calendar(self.ZONE).labelled("month", label).end_ms == resets.timestamp() * 1000
        assert lines[1].split() == ["scope", "id", "spent", "limit", "remaining", "used"]
        assert lines[3].split() == ["user", "alice", "$2.50", "$100.00", "$97.50", "2.5%"]
        assert lines[4].split() == ["project", "search", "$2.50", "no", "limit", "-", "-"]
        assert lines[5].split() == ["global", "-", "$2.50", "no", "limit", "-", "-"]

        code, doc = run_json(capsys, "usage", "alice", "--window", "month")
        assert code == 0
        assert set(doc) == {"user", "global"}
        assert doc["user"]["window"] == doc["global"]["window"] == "month"
        assert doc["user"]["resets_at"] == header[2]
        assert (doc["user"]["limit_nano"], doc["user"]["remaining_nano"]) == (
            100 * NANO,
            97_500_000_000,
        )
        assert doc["global"]["limit_nano"] is None
        assert doc["global"]["remaining_usd"] is None
        # The kept week, with no default limit anywhere; the day keeps its defaults.
        _, week = run_json(capsys, "usage", "alice", "--window", "week")
        assert week["user"]["window"] == "week"
        assert week["user"]["limit_nano"] is None
        _, day = run_json(capsys, "usage", "alice")
        assert day["user"]["limit_nano"] == 10 * NANO

    def test_report_month(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The month's total has no global monthly limit; users have the monthly one."""
        assert main(["spend", "alice", "4", "--model", "gpt-4o"]) == 0
        assert main(["spend", "bob", "6", "--model", "gpt-4o"]) == 0
        capsys.readouterr()
        code, out, err = run(capsys, "report", "--window", "month")
        assert (code, err) == (0, "")
        first, second = out.splitlines()[:2]
        header = re.fullmatch(
            r"Spend in month (\d{4}-\d{2}) \(America/New_York\): \$10\.00 "
            r"\(no global monthly limit\)",
            first,
        )
        assert header, first
        dates = re.fullmatch(r"From (\S+) to (\S+) \(resets in [0-9dhms ]+\)", second)
        assert dates, second
        starts, resets = self.local(dates[1]), self.local(dates[2])
        assert f"{starts:%Y-%m}" == header[1]
        assert (starts.day, starts.hour, resets.day, resets.hour) == (1, 0, 1, 0)
        users = out.split("Top users:")[1].split("Top projects:")[0].splitlines()
        assert users[3].split() == ["bob", "$6.00", "$100.00", "$94.00", "6.0%"]
        assert users[4].split() == ["alice", "$4.00", "$100.00", "$96.00", "4.0%"]
        assert "(none in this period)" in out.split("Top projects:")[1]
        models = out.split("Top models:")[1].splitlines()
        assert models[3].split() == ["gpt-4o", "$10.00", "no", "limit", "-", "-"]

        code, doc = run_json(capsys, "report", "--window", "month")
        assert code == 0
        assert (doc["window"], doc["period"]) == ("month", header[1])
        assert (doc["starts_at"], doc["resets_at"]) == (dates[1], dates[2])
        assert doc["total"]["spent_nano"] == 10 * NANO
        assert doc["total"]["limit_nano"] is None
        assert [u["entity_id"] for u in doc["users"]] == ["bob", "alice"]
        assert doc["users"][0]["limit_nano"] == 100 * NANO
        assert [(m["entity_id"], m["spent_nano"]) for m in doc["models"]] == [("gpt-4o", 10 * NANO)]

    def test_report_a_past_day(
        self, capsys: pytest.CaptureFixture[str], make_manager: ManagerFactory
    ) -> None:
        """--period names yesterday (by date or by an instant in it); today's report lacks it."""
        _, today = run_json(capsys, "report")
        calendar = Calendar(self.ZONE)
        yesterday = datetime.date.fromisoformat(today["period"]) - datetime.timedelta(days=1)
        period = calendar.labelled("day", yesterday.isoformat())
        noon = (period.start_ms + period.end_ms) // 2
        # A worker whose clock says yesterday noon (the store keeps the past day for a week).
        past = make_manager(
            clock=lambda: noon / 1000,
            timezone=self.ZONE,
            windows="week",
            monthly_user_limit_usd=100,
        )
        past.record_spend("carol", 3, "research", "gpt-4o")
        code, out, err = run(capsys, "report", "--period", yesterday.isoformat())
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0] == (
            f"Spend in day {yesterday} (America/New_York): $3.00 of $5,000.00 global daily limit "
            "(0.0% used)"
        )
        start = datetime.datetime.fromtimestamp(period.start_ms / 1000, datetime.UTC)
        end = datetime.datetime.fromtimestamp(period.end_ms / 1000, datetime.UTC)
        assert re.fullmatch(
            rf"From {re.escape(start.isoformat())} to {re.escape(end.isoformat())} "
            r"\(ended [0-9dhms ]+ ago\)",
            lines[1],
        ), lines[1]
        assert out.split("Top users:")[1].splitlines()[3].split()[:2] == ["carol", "$3.00"]
        assert out.split("Top projects:")[1].splitlines()[3].split()[:2] == ["research", "$3.00"]
        # An instant in that day, with any offset, names the same day.
        instant = datetime.datetime.fromtimestamp(noon / 1000, datetime.UTC)
        for when in (instant.isoformat(), instant.isoformat().replace("+00:00", "Z")):
            code, doc = run_json(capsys, "report", "--period", when)
            assert code == 0
            assert (doc["window"], doc["period"]) == ("day", yesterday.isoformat())
            assert doc["total"]["spent_nano"] == 3 * NANO
            assert [u["entity_id"] for u in doc["users"]] == ["carol"]
        # Today's report does not count it.
        _, today = run_json(capsys, "report")
        assert today["total"]["spent_nano"] == 0
        assert today["users"] == []

    def test_month_limit_then_a_refusal_naming_the_month(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A monthly override refuses with the month's window and when the month ends."""
        code, out, _ = run(capsys, "set-limit", "user", "alice", "1", "--window", "month")
        assert code == 0
        assert out.strip() == "user alice: monthly limit set to $1.00"
        _, usage = run_json(capsys, "usage", "alice", "--window", "month")
        assert usage["user"]["limit_nano"] == NANO
        _, day = run_json(capsys, "usage", "alice")
        assert day["user"]["limit_nano"] == 10 * NANO  # the daily limit is untouched
        assert main(["spend", "alice", "0.9"]) == 0
        capsys.readouterr()
        assert run(capsys, "check", "alice", "0.1")[0] == 0  # exactly fits
        code, out, _ = run(capsys, "check", "alice", "0.2")
        assert code == 1
        refused = re.fullmatch(
            r"refused: user alice would exceed its monthly limit: spent \$0\.90 of \$1\.00, "
            r"requested \$0\.20; resets at (\S+) \(in [0-9dhms ]+\)",
            out.strip(),
        )
        assert refused, out
        resets = self.local(refused[1])
        assert (resets.day, resets.hour, resets.minute) == (1, 0, 0)
        code, doc = run_json(capsys, "check", "alice", "0.2")
        assert code == 1
        assert doc["allowed"] is False
        assert (doc["scope"], doc["entity_id"], doc["window"]) == ("user", "alice", "month")
        assert doc["resets_at"] == refused[1]
        left = (self.local(doc["resets_at"]) - datetime.datetime.now(datetime.UTC)).total_seconds()
        assert abs(doc["retry_after_seconds"] - left) < 5
        assert "monthly limit" in doc["detail"]
        # Removed, the configured monthly default applies again.
        code, out, _ = run(capsys, "set-limit", "user", "alice", "none", "--window", "month")
        assert code == 0
        assert out.strip() == (
            "user alice: monthly override removed; the configured default monthly limit "
            "($100.00) applies"
        )
        assert run(capsys, "check", "alice", "0.2")[0] == 0

    def test_week_and_model_limits(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A kept window without defaults takes overrides, models too; 'none' leaves no limit."""
        code, doc = run_json(capsys, "set-limit", "model", "gpt-4o", "2", "--window", "week")
        assert code == 0
        assert doc == {
            "status": "updated",
            "scope": "model",
            "entity_id": "gpt-4o",
            "window": "week",
            "limit_usd": 2.0,
        }
        assert main(["spend", "alice", "1.5", "--model", "gpt-4o"]) == 0
        capsys.readouterr()
        _, report = run_json(capsys, "report", "--window", "week")
        [model] = report["models"]
        assert (model["entity_id"], model["limit_nano"]) == ("gpt-4o", 2 * NANO)
        assert model["remaining_nano"] == NANO // 2
        code, out, _ = run(capsys, "report", "--window", "week")
        assert code == 0
        models = out.split("Top models:")[1].splitlines()
        assert models[3].split() == ["gpt-4o", "$1.50", "$2.00", "$0.50", "75.0%"]
        code, out, _ = run(capsys, "set-limit", "model", "gpt-4o", "none", "--window", "week")
        assert code == 0
        assert out.strip() == (
            "model gpt-4o: weekly override removed; no weekly limit applies (none is configured)"
        )
        _, report = run_json(capsys, "report", "--window", "week")
        assert report["models"][0]["limit_nano"] is None

    @pytest.mark.parametrize(
        "command", [["usage", "alice"], ["report"], ["set-limit", "user", "a", "1"]]
    )
    def test_unknown_window_exits_2(
        self, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        code, out, err = run(capsys, *command, "--window", "year")
        assert code == 2
        assert out == ""
        assert "argument --window: invalid choice: 'year'" in err

    @pytest.mark.parametrize(
        "command", [["usage", "alice"], ["report"], ["set-limit", "user", "a", "1"]]
    )
    def test_window_not_kept_exits_2(
        self, capsys: pytest.CaptureFixture[str], command: list[str], redis_client: redis.Redis
    ) -> None:
        """The hour is neither limited nor listed in COREASON_BUDGET_WINDOWS: not kept."""
        code, out, err = run(capsys, *command, "--window", "hour")
        assert code == 2
        assert out == ""
        assert err.startswith("coreason-budget: the hour window is not kept")
        assert "Traceback" not in err
        code, doc = run_json(capsys, *command, "--window", "hour")
        assert code == 2
        assert doc["error"] == "invalid"
        assert redis_client.keys("*") == []

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--period", "yesterday"], "--period must be a date (YYYY-MM-DD), a month"),
            (["--period", "2026-02-30"], "got '2026-02-30' (day is out of range for month)"),
            (["--period", "2026-1-5"], "got '2026-1-5'"),
            (["--period", "2026-11-29T10:00"], "a datetime needs a UTC offset"),
            (["--period", "2026-11-29T25:00+00:00"], "got '2026-11-29T25:00+00:00'"),
            (["--period", "2026-11"], "a month names a period with --window month only"),
            (["--period", "2026-13", "--window", "month"], "got '2026-13' (month must be in"),
            (["--period", "9999-12-31", "--window", "month"], "too close to year 1 or 9999"),
            (["--period", "0001-01-01T00:00:00+05:00"], "outside years 1 to 9999"),
        ],
    )
    def test_bad_period_exits_2(
        self,
        capsys: pytest.CaptureFixture[str],
        redis_client: redis.Redis,
        argv: list[str],
        message: str,
    ) -> None:
        code, out, err = run(capsys, "report", *argv)
        assert code == 2
        assert out == ""
        assert message in err, err
        assert err.count("\n") == 1
        assert "Traceback" not in err
        code, doc = run_json(capsys, "report", *argv)
        assert code == 2
        assert doc["error"] == "invalid"
        assert message in doc["detail"]
        assert redis_client.keys("*") == []

    def test_month_period(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A month (YYYY-MM) or any date in it names a month."""
        _, doc = run_json(capsys, "report", "--window", "month", "--period", "2026-02")
        assert (doc["period"], doc["starts_at"]) == ("2026-02", "2026-02-01T05:00:00+00:00")
        assert doc["resets_at"] == "2026-03-01T05:00:00+00:00"
        _, doc = run_json(capsys, "report", "--window", "month", "--period", "2026-02-17")
        assert doc["period"] == "2026-02"
        code, out, _ = run(capsys, "report", "--window", "week", "--period", "2026-02-18")
        assert code == 0
        assert out.splitlines()[0] == (
            "Spend in week 2026-02-16 (America/New_York): $0.00 (no global weekly limit)"
        )


class TestErrors:
    """Known errors: one line on stderr, the documented exit code, and JSON when asked."""

    def test_store_down_exits_3(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Fail closed: an unreachable store is exit 3, promptly, without a traceback."""
        dead = f"redis://127.0.0.1:{free_port()}"
        for argv in (["usage", "a"], ["check", "a", "1"], ["report"]):
            start = time.monotonic()
            code, out, err = run(capsys, *argv, "--redis-url", dead)
            assert code == 3, argv
            assert out == ""
            assert err.startswith("coreason-budget: budget store unavailable")
            assert "Traceback" not in err
            assert time.monotonic() - start < 5

    def test_spend_with_the_store_down_is_spooled_and_charged_once(
        self, capsys: pytest.CaptureFixture[str], own_redis: RedisServer
    ) -> None:
        """
        "Saved" is exit 0 and names the key; the natural retry with it, and the
        replay, charge the spend once (it was exit 3 and charged twice).
        """
        url = own_redis.url
        own_redis.kill()
        code, doc = run_json(capsys, "--redis-url", url, "spend", "alice", "0.05")
        assert code == 0
        assert doc["status"] == "spooled"
        key = doc["idempotency_key"]
        code, out, _ = run(
            capsys, "--redis-url", url, "spend", "alice", "0.05", "--idempotency-key", key
        )
        assert code == 0
        assert out.startswith("spooled $0.05 for user alice")
        assert key in out
        own_redis.start()
        assert run(capsys, "--redis-url", url, "replay-spool")[0] == 0
        _, doc = run_json(capsys, "--redis-url", url, "usage", "alice")
        assert doc["user"]["spent_nano"] == 50_000_000

    def test_spend_without_a_spool_exits_3_naming_the_key(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Nothing saved: exit 3, and the key that makes a retry safe."""
        monkeypatch.setenv("COREASON_BUDGET_SPOOL_DIR", "off")
        dead = f"redis://127.0.0.1:{free_port()}"
        code, out, err = run(capsys, "--json", "spend", "a", "1", "--redis-url", dead)
        assert code == 3
        assert json.loads(out)["error"] == "budget_unavailable"
        assert json.loads(out)["idempotency_key"]
        assert err.startswith("coreason-budget: budget store unavailable")

    def test_store_down_json(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = run(
            capsys, "--json", "check", "a", "1", "--redis-url", f"redis://127.0.0.1:{free_port()}"
        )
        assert code == 3
        assert json.loads(out)["error"] == "budget_unavailable"
        assert "unavailable" in err

    def test_bad_store_url_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = run(capsys, "--json", "usage", "a", "--redis-url", "http://nope")
        assert code == 2
        assert err.startswith("coreason-budget: --redis-url must start with one of redis://")
        assert json.loads(out)["error"] == "invalid"

    def test_bad_environment_exits_2(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        """A ConfigError names the variable."""
        monkeypatch.setenv("COREASON_BUDGET_DAILY_USER_LIMIT_USD", "ten")
        code, _, err = run(capsys, "usage", "a", "--redis-url", redis_url)
        assert code == 2
        assert "COREASON_BUDGET_DAILY_USER_LIMIT_USD='ten': expected a number" in err

    def test_usage_errors_exit_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert run(capsys, "bogus")[0] == 2
        assert run(capsys)[0] == 2
        assert run(capsys, "usage")[0] == 2

    def test_help_exits_0(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, _ = run(capsys, "--help")
        assert code == 0
        for command in ("serve", "usage", "report", "set-limit", "check", "spend", "demo"):
            assert command in out
        assert "Exit codes" in out


class TestDemo:
    """`demo`: a simulated multi-threaded workload that ends by proving no limit was exceeded."""

    def test_quick_on_the_embedded_store(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """No setup: an embedded store in a temporary folder, removed afterwards."""
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        start = time.monotonic()
        code, out, err = run(capsys, "demo", "--quick")
        elapsed = time.monotonic() - start
        assert code == 0, out + err
        assert elapsed < 30  # ~3-10 s; generous for loaded CI machines
        assert "300 calls on 8 threads (seed 7)" in out
        assert "OK: no limit was exceeded: in all 17 scopes" in out
        assert "OK: the ledger's total equals the sum of the" in out
        assert "Simulating 300 LLM calls" in err
        assert "\r[" not in err  # no progress bar when stderr is not a terminal
        table_rows = [
            line.split()
            for line in out.splitlines()
            if line.startswith(("user", "project", "global"))
        ]
        assert len(table_rows) == 17
        assert sum(int(row[-1]) for row in table_rows) > 0, "small limits must refuse some calls"
        assert not list(tmp_path.glob("coreason-budget-demo-*")), "temporary store not removed"

    def test_json_on_a_given_store(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, redis_client: redis.Redis
    ) -> None:
        """Every scope's spend is within its limit, checked here again from the JSON."""
        code, doc = run_json(
            capsys, "demo", "--quick", "--calls", "120", "--threads", "6", "--seed", "3",
            "--redis-url", redis_url,
        )  # fmt: skip
        assert code == 0
        assert (doc["calls"], doc["threads"], doc["seed"]) == (120, 6, 3)
        assert doc["no_limit_exceeded"] is True
        assert doc["ledger_matches"] is True
        assert doc["allowed"] + doc["blocked"] == 120
        assert doc["blocked"] > 0
        assert sum(s["blocked"] for s in doc["scopes"]) == doc["blocked"]
        for scope in doc["scopes"]:
            assert scope["spent_nano"] <= scope["limit_nano"], scope
        assert doc["committed_nano"] == doc["ledger_nano"] > 0
        assert {m["model"] for m in doc["models"]} <= {
            "gpt-4o-mini",
            "gpt-4o",
            "claude-sonnet-4-5",
            "claude-haiku-4-5",
        }
        # Under its own fresh prefix: nothing of the default prefix was touched.
        keys = redis_client.keys("*")
        assert keys
        assert all(k.startswith("{demo-") for k in keys)

    def test_without_litellm_list_prices_are_used(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The demo needs no pricing extra: models litellm cannot price get list prices."""

        def no_litellm() -> None:
            raise UnknownModelError("litellm is not installed")

        monkeypatch.setattr(_pricing, "_import_litellm", no_litellm)
        code, doc = run_json(capsys, "demo", "--quick", "--calls", "60", "--redis-url", redis_url)
        assert code == 0
        assert doc["prices_from"] == "built-in list prices (litellm is not installed)"
        assert doc["no_limit_exceeded"] is True
        assert doc["ledger_matches"] is True

    def test_thread_count_is_bounded(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, _, err = run(capsys, "demo", "--threads", "100000")
        assert code == 2
        assert "at most 512 threads" in err

    def test_failed_proof_is_reported_and_exits_1(self) -> None:
        """The summary says FAILED when a scope is over its limit (never seen; shown here)."""
        from coreason_budget._demo import ScopeResult

        result = DemoResult(
            calls=2, threads=1, seed=0, allowed=2, blocked=0, failed=0, seconds=0.1,
            prices_from="test", scopes=(ScopeResult("user", "a", 10, 11, 2, 0),),
            models=(), committed_nano=11, ledger_nano=12,
        )  # fmt: skip
        text = format_demo(result)
        assert "FAILED: over their daily limit: user a" in text
        assert "FAILED: the ledger holds 12 nano-dollars but the threads committed 11" in text
        assert not result.ok

    def test_progress_bar(self) -> None:
        """Redrawn in place, once per percent, ending with a newline."""
        stream = io.StringIO()
        bar = _ProgressBar(stream, width=10)
        for done in range(1, 401):
            bar(done, 400)
        text = stream.getvalue()
        assert text.count("\r") == 101  # 0% to 100%
        assert text.endswith("\r[##########] 100% 400/400\n")
        assert "\r[#####.....]  50% 200/400" in text


class TestFormatting:
    """Display helpers: dollars never rounded up, columns aligned."""

    @pytest.mark.parametrize(
        ("nano", "text"),
        [
            (0, "$0.00"),
            (50_000_000, "$0.05"),
            (1_234_567_891, "$1.2345"),
            (99_999_999, "$0.0999"),
            (5_000 * NANO, "$5,000.00"),
        ],
    )
    def test_usd(self, nano: int, text: str) -> None:
        assert usd(nano) == text

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"),
            (59, "59s"),
            (60, "1m"),
            (125, "2m 5s"),
            (3600, "1h"),
            (3 * 3600 + 7 * 60 + 9, "3h 7m"),
            (86400, "1d"),
            (3 * 86400 + 12 * 3600 + 59, "3d 12h"),
            (-5, "0s"),
        ],
    )
    def test_duration(self, seconds: int, text: str) -> None:
        assert _duration(seconds) == text

    def test_refusal(self) -> None:
        """Who refused, in which window, the exact amounts, and when it resets."""
        resets_at = datetime.datetime(2026, 12, 1, 5, tzinfo=datetime.UTC)
        e = BudgetExceededError(
            scope="user", entity_id="alice", limit_nano=10 * NANO, spent_nano=9_500_000_000,
            requested_nano=NANO, window="month", resets_at=resets_at,
            retry_after_seconds=3 * 86400 + 12 * 3600,
        )  # fmt: skip
        assert refusal(e) == (
            "user alice would exceed its monthly limit: spent $9.50 of $10.00, requested $1.00; "
            "resets at 2026-12-01T05:00:00+00:00 (in 3d 12h)"
        )
        g = BudgetExceededError(
            scope="global", entity_id=None, limit_nano=NANO, spent_nano=NANO, requested_nano=1
        )
        assert refusal(g) == (
            "the global budget would exceed its daily limit: spent $1.00 of $1.00, "
            "requested $0.000000001"
        )

    def test_table(self) -> None:
        assert table(("a", "n"), [("xyz", "1"), ("b", "100")], right=(1,)) == [
            "a      n",
            "---  ---",
            "xyz    1",
            "b    100",
        ]


class TestServe:
    """`serve` checks everything it can before starting uvicorn."""

    @pytest.fixture(autouse=True)
    def private_environ(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # serve exports settings for its workers; keep them out of the other tests.
        monkeypatch.setattr(os, "environ", dict(os.environ))

    def test_refuses_without_api_keys(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, _, err = run(capsys, "serve", "--port", str(free_port()))
        assert code == 2
        assert "No API keys configured: set COREASON_BUDGET_API_KEYS" in err
        assert "--insecure-no-auth" in err
        assert "Traceback" not in err

    def test_missing_server_extra(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setitem(sys.modules, "uvicorn", None)
        code, _, err = run(capsys, "serve", "--insecure-no-auth")
        assert code == 2
        assert "pip install 'coreason-budget[server]'" in err

    def test_bad_store_exits_2_before_starting(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, _, err = run(capsys, "serve", "--insecure-no-auth", "--redis-url", "http://x")
        assert code == 2
        assert "COREASON_BUDGET_REDIS_URL='http://x': must start with one of" in err

    def test_bad_port(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert run(capsys, "serve", "--port", "70000")[0] == 2

    @pytest.mark.slow
    def test_starts_and_answers_health(
        self, capsys: pytest.CaptureFixture[str], redis_url: str, tmp_path: Path
    ) -> None:
        """A real process: --redis-url reaches the worker, /health answers, SIGTERM stops it."""
        assert main(["spend", "alice", "0.75", "--redis-url", redis_url]) == 0
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("COREASON_BUDGET_")}
        env["COREASON_BUDGET_LOG_PATH"] = str(tmp_path / "logs" / "app.log")
        proc = subprocess.Popen(
            [sys.executable, "-m", "coreason_budget", "serve", "--port", str(port),
             "--insecure-no-auth", "--redis-url", redis_url],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            health = poll(f"http://127.0.0.1:{port}/health", proc)
            assert health == {"status": "healthy", "redis": "connected"}
            usage = poll(f"http://127.0.0.1:{port}/usage/alice", proc)
            assert usage["user"]["spent_nano"] == 750_000_000
        finally:
            proc.terminate()
            output, _ = proc.communicate(timeout=20)
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert proc.returncode in (0, -signal.SIGTERM), output
        assert "Application shutdown complete" in output
        log = (tmp_path / "logs" / "app.log").read_text()
        assert "AUTHENTICATION IS DISABLED" in log


def poll(url: str, proc: subprocess.Popen[str], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read() if proc.stdout else ""
                raise AssertionError(f"server did not answer {url}:\n{out}") from None
            time.sleep(0.1)


class TestEntryPoint:
    """`python -m coreason_budget` works, and importing the library does not load the CLI."""

    def test_module_help(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "coreason_budget", "--help"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage: coreason-budget")

    def test_exit_code_from_a_subprocess(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "coreason_budget", "check", "a", "1",
             "--redis-url", f"redis://127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 3
        assert "Traceback" not in done.stderr

    def test_import_is_light(self) -> None:
        code = (
            "import sys, coreason_budget\n"
            "assert 'coreason_budget.cli' not in sys.modules\n"
            "import coreason_budget.cli\n"
            "heavy = {'fastapi', 'uvicorn', 'litellm', 'coreason_budget.server'}\n"
            "assert not heavy & set(sys.modules), heavy & set(sys.modules)\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
