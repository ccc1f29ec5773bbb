"""
README.md's Python examples run, against the test redis, and print what they claim.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import redis

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    """The README's Python blocks, less those marked ``<!-- readme-test: skip ... -->``."""
    text = README.read_text(encoding="utf-8")
    return re.findall(r"(?<!-->\n)```python\n(.*?)```", text, re.S)


class TestReadme:
    """Each example is executed in order; each starts from an empty store."""

    def test_there_are_examples(self) -> None:
        assert len(python_blocks()) >= 3

    def test_examples_run_and_print_what_they_say(
        self, redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(os, "environ", dict(os.environ))
        namespace: dict[str, object] = {"call_llm": lambda prompt: "a summary"}
        for block in python_blocks():
            redis_client.flushall()
            code = block.replace("redis://localhost:6379", redis_url)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(README), "exec"), namespace)
            # Every "# -> expected" comment in the block is a line it printed, in order.
            claims = re.findall(r"# -> (.+)", block)
            printed = out.getvalue().splitlines()
            assert printed[: len(claims)] == [c.strip() for c in claims], block
        budget = namespace["budget"]
        budget.close()  # type: ignore[attr-defined]
