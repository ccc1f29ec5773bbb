"""
A Flask endpoint guarded by coreason-budget, meant to run under Gunicorn with many workers.

    COREASON_BUDGET_REDIS_URL=redis://localhost:6379 \\
        gunicorn -w 4 -k sync --preload --pythonpath examples/flask_app app:app

``POST /v1/complete`` with ``{"user_id", "project_id"?, "prompt", "max_tokens"}`` calls a fake
LLM after reserving its worst-case price, and answers:

* **200** ``{"text", "cost_nano", "cost_usd", "estimate_nano", "reservation_id", "pid"}``:
  ``cost_nano`` is the exact amount committed to the ledger, as a string of nano-dollars;
* **429** ``{"error": "Budget exceeded for User alice: ...", "scope", "entity_id"}``: nothing
  was held and the model was not called;
* **503** ``{"error": ...}``: the budget store could not be asked, so the model was not called
  (fail closed);
* **400** for a malformed request.

One ``BudgetManager`` per process, created at import: the simplest thing a user writes (a
module global, like a database engine), and a bad configuration or an unreachable store stops
the deployment at start-up (the ``ping`` below) instead of failing the first request. It is
safe with ``--preload`` too, where Gunicorn imports this module once in the master and then
forks the workers: the manager's redis-py pool notices the new process id on first use in each
worker and opens its own connections instead of sharing the master's sockets.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from decimal import Decimal
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from coreason_budget import (
    BudgetExceededError,
    BudgetManager,
    BudgetUnavailableError,
    InvalidInputError,
)

MODEL = "fake-llm"
#: Fake provider prices, USD per million tokens (an override: no litellm table is needed).
INPUT_PER_MTOK = Decimal(3)
OUTPUT_PER_MTOK = Decimal(15)
MAX_TOKENS_LIMIT = 4096
#: Share of calls that cost more than their estimate: the provider bills more input tokens than
#: we counted (a tokenizer mismatch) and the answer uses every allowed output token. The real
#: cost is committed in full anyway: the money is spent. Otherwise the cost is at most the estimate.
OVERRUN_RATE = float(os.environ.get("FAKE_LLM_OVERRUN_RATE", "0.1"))
#: Longest simulated model latency, seconds.
MAX_DELAY_S = float(os.environ.get("FAKE_LLM_MAX_DELAY_S", "0.01"))

log = logging.getLogger("flask_app")

budget = BudgetManager.from_env()
budget.pricing.set_price(MODEL, input_per_mtok=INPUT_PER_MTOK, output_per_mtok=OUTPUT_PER_MTOK)
budget.ping()  # fail the deployment now, not the first request, when the store is unreachable

app = Flask(__name__)


def count_tokens(prompt: str) -> int:
    """Our (fake) tokenizer: about 4 characters a token."""
    return math.ceil(len(prompt) / 4)


def fake_llm(prompt: str, max_tokens: int) -> tuple[str, int, int]:
    """Pretend to call a model; return its answer and the (input, output) tokens it billed."""
    time.sleep(random.uniform(0, MAX_DELAY_S))
    input_tokens, output_tokens = count_tokens(prompt), random.randint(0, max_tokens)
    if random.random() < OVERRUN_RATE:
        input_tokens += random.randint(1, input_tokens + 100)
        output_tokens = max_tokens
    return "lorem ipsum " * (output_tokens // 2), input_tokens, output_tokens


def error(status: int, message: str, **extra: Any) -> ResponseReturnValue:
    return jsonify(error=message, **extra), status


@app.post("/v1/complete")
def complete() -> ResponseReturnValue:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        return error(400, "the body must be a JSON object")
    user_id, project_id = body.get("user_id"), body.get("project_id")
    prompt, max_tokens = body.get("prompt"), body.get("max_tokens")
    if not isinstance(prompt, str):
        return error(400, "prompt must be a string")
    if type(max_tokens) is not int or not 0 < max_tokens <= MAX_TOKENS_LIMIT:
        return error(400, f"max_tokens must be a whole number from 1 to {MAX_TOKENS_LIMIT}")

    try:
        # The worst case: every counted prompt token plus every allowed output token.
        estimate = budget.pricing.calculate(MODEL, count_tokens(prompt), max_tokens)
        # Held in the user's, the project's and the global budget at once, or refused. Should
        # anything below fail, leaving the block charges the estimate: the model may have run.
        with budget.reserve(user_id, estimate, project_id=project_id, model=MODEL) as reservation:
            text, input_tokens, output_tokens = fake_llm(prompt, max_tokens)
            # Settle to what the provider billed: a refund when below the estimate, an extra
            # charge (recorded even past a limit: the money is spent) when above it.
            reservation.commit_usage(input_tokens=input_tokens, output_tokens=output_tokens)
    except BudgetExceededError as e:
        return error(429, str(e), scope=e.scope, entity_id=e.entity_id)
    except BudgetUnavailableError as e:
        # Fail closed: the hold could not be taken. (Should the store fail after the model
        # answered, the commit is spooled and recorded once it is back; its receipt says so.)
        log.warning("budget store unavailable: %s", e)
        return error(503, "budget store unavailable; the call was not made")
    except InvalidInputError as e:
        return error(400, str(e))

    cost_nano = budget.pricing.calculate_nano(MODEL, input_tokens, output_tokens)
    return jsonify(
        text=text,
        cost_nano=str(cost_nano),
        cost_usd=str(Decimal(cost_nano).scaleb(-9)),
        estimate_nano=str(reservation.estimate_nano),
        reservation_id=reservation.id,
        pid=os.getpid(),
    )


@app.get("/healthz")
def healthz() -> ResponseReturnValue:
    try:
        budget.ping()
    except BudgetUnavailableError:
        return error(503, "budget store unavailable")
    return jsonify(status="ok", pid=os.getpid())
