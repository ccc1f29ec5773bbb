"""
README.md's Python examples run as written on a fresh machine, and print what they claim.

Fresh: each block runs in its own interpreter, in README order, in an empty
working directory, with a private ``XDG_DATA_HOME`` and no ``COREASON_BUDGET_*``
variable: no Redis anywhere, so the examples use the embedded store, as a new
user's would after the quick start's install. Nothing in a block is rewritten.
The HTTP client's block talks to the service run here (API key ``agent-key``,
as README's ``serve`` command), which the environment names as README says.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from coreason_budget import AsyncBudgetManager, BudgetConfig, BudgetManager, BudgetUnavailableError
from coreason_budget.server import ServerSettings, create_app

from .redis_server import free_port

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    """Every Python block of the README, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.S | re.M)


@pytest.fixture
def service() -> Iterator[str]:
    """README's service (``coreason-budget serve`` with key ``agent-key``), on its default store."""
    app = create_app(
        AsyncBudgetManager(BudgetConfig()), ServerSettings(api_keys=frozenset({"agent-key"}))
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive(), "the service did not start"
        assert time.monotonic() < deadline, "the service did not start"
        time.sleep(0.01)
    yield f"http://localhost:{port}"
    server.should_exit = True
    thread.join(20)  # the app closed its manager


class TestReadme:
    def test_every_python_block_runs(self) -> None:
        text = README.read_text(encoding="utf-8")
        assert "readme-test: skip" not in text
        assert len(python_blocks()) == text.count("```python") >= 5

    def test_no_block_needs_a_redis_it_did_not_start(self) -> None:
        for block in python_blocks():
            assert "localhost:6379" not in block, block

    def test_examples_run_as_written_and_print_what_they_say(
        self, tmp_path: Path, service: str
    ) -> None:
        cwd = tmp_path / "fresh"
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("COREASON_BUDGET_")}
        env["BUDGET_SERVICE_URL"] = service
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # as the library sets it: never the network
        for block in python_blocks():
            run = subprocess.run(
                [sys.executable, "-"],
                input=block,
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, f"{block}\n{run.stderr}"
            # Every "# -> expected" comment is a line the block printed, in order.
            claims = [c.strip() for c in re.findall(r"# -> (.+)", block)]
            printed = run.stdout.splitlines()
            assert printed[: len(claims)] == claims, block
        assert not list(cwd.iterdir())  # nothing left in the user's working directory


class TestFirstRun:
    def test_a_refused_connection_says_how_to_get_a_store(self) -> None:
        url = f"redis://127.0.0.1:{free_port()}"
        budget = BudgetManager(BudgetConfig(redis_url=url, spool_dir="off", retries=0))
        with budget, pytest.raises(BudgetUnavailableError) as e:
            budget.check_availability("user_123", 0.05)
        message = str(e.value)
        assert "Connection refused" in message
        assert "Start Redis there" in message
        assert "COREASON_BUDGET_REDIS_URL" in message
        assert "embedded://PATH" in message
        assert "leave the URL unset" in message
