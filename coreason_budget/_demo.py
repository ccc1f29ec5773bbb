"""
The ``coreason-budget demo`` workload: many threads making priced "LLM calls" on small budgets.

It exists to show, with no setup, what the library promises: calls are priced
from real model prices, reserved before they are "made", refused when a user,
project or the organisation would go over its daily limit, and at the end no
limit has been exceeded and the ledger matches, to the nano-dollar, the sum of
what the threads committed.

The proof is exact only because the simulated actual cost of a call never
exceeds its estimate (it is capped there). In real life a provider can bill
more than was estimated; the library then records the real cost in full, which
can take a scope past its limit. That is the honest trade: money already spent
is never hidden.
"""

from __future__ import annotations

import contextlib
import random
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import attrs

from ._config import BudgetConfig
from ._manager import BudgetManager
from ._money import nano_to_usd, to_nano
from .exceptions import BudgetExceededError, UnknownModelError

#: Model -> (share of calls, fallback list price in USD per million tokens: input, output,
#: cached input). The fallback is used only when litellm's table cannot price the model.
MODELS: dict[str, tuple[float, tuple[str, str, str]]] = {
    "gpt-4o-mini": (0.50, ("0.15", "0.60", "0.075")),
    "claude-haiku-4-5": (0.20, ("1", "5", "0.10")),
    "gpt-4o": (0.15, ("2.50", "10", "1.25")),
    "claude-sonnet-4-5": (0.15, ("3", "15", "0.30")),
}
#: User -> project; the first users are the heavy ones (activity falls off like Zipf's law).
TEAM: dict[str, str] = {
    "alice": "search",
    "bob": "support-bot",
    "carol": "research",
    "dave": "search",
    "erin": "marketing",
    "frank": "support-bot",
    "grace": "research",
    "heidi": "search",
    "ivan": "marketing",
    "judy": "support-bot",
    "mallory": "research",
    "oscar": "marketing",
}
#: Users whose limit an operator raised with set_limit (shows that overrides count too).
RAISED: dict[str, int] = {"bob": 3}
_SYSTEM = "You are a careful assistant for an engineering organisation. Answer concisely."
_TASKS = (
    "Summarise this incident report for the on-call channel",
    "Draft a polite reply to this customer complaint",
    "Extract every date and amount from this invoice",
    "Explain this stack trace and suggest a fix",
    "Translate this release note into French",
    "Classify these support tickets by urgency",
    "Write unit tests for this function",
)
_TEXT = (
    "the quarterly numbers show steady growth in every region while costs stayed flat and "
    "the team shipped the migration ahead of schedule despite two outages in March"
)
_FILLER = tuple(_TEXT.split())


#: A scope as the demo counts it: ("user", "ana"), ("project", "search"), ("global", None).
Scope = tuple[str, str | None]
GLOBAL: Scope = ("global", None)


@attrs.frozen
class Call:
    """One simulated LLM call, decided up front so that a seed reproduces the workload."""

    user: str
    project: str | None
    model: str
    messages: tuple[dict[str, str], ...]
    max_output_tokens: int
    #: What the "provider" reports afterwards.
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    fails: bool
    latency: float

    @property
    def scopes(self) -> tuple[Scope, ...]:
        """The scopes the call is charged in."""
        project: tuple[Scope, ...] = () if self.project is None else (("project", self.project),)
        return (("user", self.user), *project, GLOBAL)


@attrs.frozen
class ScopeResult:
    """One row of the summary: a scope's limit, spend and decisions."""

    scope: str
    entity_id: str | None
    #: None: the scope has no daily limit (never the case with the demo's own limits).
    limit_nano: int | None
    spent_nano: int
    allowed: int
    blocked: int

    @property
    def within_limit(self) -> bool:
        return self.limit_nano is None or self.spent_nano <= self.limit_nano


@attrs.frozen
class DemoResult:
    """Everything the demo measured, and the two checks it makes at the end."""

    calls: int
    threads: int
    seed: int
    allowed: int
    blocked: int
    failed: int
    seconds: float
    prices_from: str
    scopes: tuple[ScopeResult, ...]
    models: tuple[tuple[str, int], ...]
    #: Sum of the actual costs the threads committed, and what the ledger holds in total.
    committed_nano: int
    ledger_nano: int

    @property
    def no_limit_exceeded(self) -> bool:
        return all(s.within_limit for s in self.scopes)

    @property
    def ledger_matches(self) -> bool:
        return self.committed_nano == self.ledger_nano

    @property
    def ok(self) -> bool:
        return self.no_limit_exceeded and self.ledger_matches

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "threads": self.threads,
            "seed": self.seed,
            "allowed": self.allowed,
            "blocked": self.blocked,
            "failed_and_released": self.failed,
            "seconds": round(self.seconds, 3),
            "prices_from": self.prices_from,
            "scopes": [
                {
                    "scope": s.scope,
                    "entity_id": s.entity_id,
                    "limit_usd": None if s.limit_nano is None else nano_to_usd(s.limit_nano),
                    "spent_usd": nano_to_usd(s.spent_nano),
                    "limit_nano": s.limit_nano,
                    "spent_nano": s.spent_nano,
                    "allowed": s.allowed,
                    "blocked": s.blocked,
                }
                for s in self.scopes
            ],
            "models": [
                {"model": m, "spent_usd": nano_to_usd(n), "spent_nano": n} for m, n in self.models
            ],
            "committed_nano": self.committed_nano,
            "ledger_nano": self.ledger_nano,
            "no_limit_exceeded": self.no_limit_exceeded,
            "ledger_matches": self.ledger_matches,
        }


Progress = Callable[[int, int], None]


def run(
    *,
    calls: int = 2000,
    threads: int = 16,
    seed: int = 7,
    redis_url: str | None = None,
    latency: bool = True,
    progress: Progress | None = None,
) -> DemoResult:
    """
    Run the workload and check the ledger afterwards.

    Without *redis_url* the ledger lives in an embedded store in a temporary
    folder that is deleted afterwards. With one, the demo writes under a fresh
    random key prefix (so it never touches real budgets) whose keys expire at
    the end of the UTC day.
    """
    rng = random.Random(seed)
    workload = _workload(rng, calls, latency)
    with _store(redis_url) as url:
        config = BudgetConfig(
            redis_url=url,
            key_prefix="demo-" + secrets.token_hex(4),
            retention_seconds=0,
            # Threads are many and the embedded server shares a machine with them.
            pool_size=max(threads, 1) + 2,
            socket_timeout=2.0,
            pool_timeout=5.0,
        )
        with BudgetManager(config) as budget:
            prices_from = _prepare_prices(budget)
            _set_limits(budget, workload)
            return _Runner(budget, workload, threads, progress).run(seed, prices_from)


@contextlib.contextmanager
def _store(redis_url: str | None) -> Iterator[str]:
    if redis_url is not None:
        yield redis_url
        return
    with tempfile.TemporaryDirectory(prefix="coreason-budget-demo-") as tmp:
        yield f"embedded://{tmp}/ledger.rdb"


def _workload(rng: random.Random, calls: int, latency: bool) -> list[Call]:
    users = list(TEAM)
    activity = [1 / (rank + 1) ** 0.8 for rank in range(len(users))]
    models = list(MODELS)
    shares = [MODELS[m][0] for m in models]
    out = []
    for _ in range(calls):
        user = rng.choices(users, activity)[0]
        model = rng.choices(models, shares)[0]
        document = " ".join(rng.choices(_FILLER, k=rng.randint(20, 400)))
        messages = (
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": f"{rng.choice(_TASKS)}:\n\n{document}"},
        )
        max_out = rng.choice((256, 512, 1024, 2048))
        # Roughly what a tokenizer would say; the real count only matters up to the cap below.
        input_tokens = 20 + len(messages[1]["content"]) // 4
        out.append(
            Call(
                user=user,
                # Most work is billed to the user's project; some is personal.
                project=TEAM[user] if rng.random() < 0.9 else None,
                model=model,
                messages=messages,
                max_output_tokens=max_out,
                input_tokens=input_tokens,
                cached_input_tokens=rng.choice((0, 16)),
                output_tokens=rng.randint(max_out // 8, max_out),
                fails=rng.random() < 0.03,
                latency=rng.uniform(0.002, 0.02) if latency else 0.0,
            )
        )
    return out


def _prepare_prices(budget: BudgetManager) -> str:
    """Price from litellm's table; models it cannot price get their public list price."""
    fallback = []
    for model, (_, (inp, outp, cached)) in MODELS.items():
        try:
            budget.pricing.calculate(model, 1, 1)
        except UnknownModelError:
            budget.pricing.set_price(
                model,
                input_per_mtok=Decimal(inp),
                output_per_mtok=Decimal(outp),
                cached_input_per_mtok=Decimal(cached),
            )
            fallback.append(model)
    if not fallback:
        return "litellm's model price table"
    if len(fallback) == len(MODELS):
        return "built-in list prices (litellm is not installed)"
    return f"litellm's table; built-in list prices for {', '.join(fallback)}"


def _set_limits(budget: BudgetManager, workload: Sequence[Call]) -> None:
    """
    Limits well below what the workload would spend, so that every kind of scope refuses.

    Set through ``set_limit`` (stored overrides), the way an operator would,
    and derived from the workload itself so that ``--calls`` scales them.
    """
    demand: Counter[Scope] = Counter()
    for call in workload:
        cost = budget.pricing.calculate_nano(
            call.model, call.input_tokens, call.output_tokens, call.cached_input_tokens
        )
        for scope in call.scopes:
            demand[scope] += cost
    heaviest_user = max((v for k, v in demand.items() if k[0] == "user"), default=0)
    heaviest_project = max((v for k, v in demand.items() if k[0] == "project"), default=0)
    user_limit = _round_usd(heaviest_user // 2)
    for user in TEAM:
        budget.set_limit("user", user, user_limit * RAISED.get(user, 1))
    for project in sorted(set(TEAM.values())):
        budget.set_limit("project", project, _round_usd(heaviest_project // 2))
    budget.set_limit("global", None, _round_usd(demand[GLOBAL] * 3 // 5))


def _round_usd(nano: int) -> Decimal:
    """Two significant figures, at least a tenth of a cent: limits a person would pick."""
    usd = Decimal(max(nano, 1_000_000)) / Decimal(10**9)
    return Decimal(f"{usd:.2g}")


class _Runner:
    """Runs the calls on a thread pool and counts the decisions per scope."""

    def __init__(
        self,
        budget: BudgetManager,
        workload: Sequence[Call],
        threads: int,
        progress: Progress | None,
    ) -> None:
        self.budget = budget
        self.workload = workload
        self.threads = max(threads, 1)
        self.progress = progress
        self.lock = threading.Lock()
        self.done = 0
        self.allowed: Counter[Scope] = Counter()
        self.blocked: Counter[Scope] = Counter()
        self.failed = 0
        self.committed_nano = 0

    def run(self, seed: int, prices_from: str) -> DemoResult:
        start = time.perf_counter()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="demo") as pool:
            # list(): re-raise the first unexpected error (store down, ...) here.
            list(pool.map(self.one_call, self.workload))
        seconds = time.perf_counter() - start
        return self.result(seed, prices_from, seconds)

    def one_call(self, call: Call) -> None:
        pricing = self.budget.pricing
        estimate = pricing.estimate(call.model, call.messages, call.max_output_tokens)
        key = None
        spent_nano = 0
        try:
            with self.budget.reserve(call.user, estimate, call.project, call.model) as r:
                time.sleep(call.latency)  # the "LLM call"
                if call.fails:
                    r.release()  # the provider refused it before billing anything
                else:
                    actual = pricing.calculate(
                        call.model, call.input_tokens, call.output_tokens, call.cached_input_tokens
                    )
                    # Capped at the estimate so that the end-of-run proof is exact (see above).
                    actual = min(actual, estimate)
                    r.commit(actual)
                    spent_nano = to_nano(actual)
        except BudgetExceededError as e:
            key = (e.scope, e.entity_id)
        with self.lock:
            self.done += 1
            if key is not None:
                self.blocked[key] += 1
            else:
                self.failed += call.fails
                self.committed_nano += spent_nano
                for scope in call.scopes:
                    self.allowed[scope] += 1
            if self.progress is not None:
                self.progress(self.done, len(self.workload))

    def result(self, seed: int, prices_from: str, seconds: float) -> DemoResult:
        report = self.budget.report()
        scopes = [report.total, *report.projects, *report.users]
        rows = tuple(
            ScopeResult(
                scope=s.scope,
                entity_id=s.entity_id,
                limit_nano=s.limit_nano,
                spent_nano=s.spent_nano,
                allowed=self.allowed[s.scope, s.entity_id],
                blocked=self.blocked[s.scope, s.entity_id],
            )
            for s in scopes
        )
        blocked = sum(self.blocked.values())
        return DemoResult(
            calls=len(self.workload),
            threads=self.threads,
            seed=seed,
            allowed=len(self.workload) - blocked,
            blocked=blocked,
            failed=self.failed,
            seconds=seconds,
            prices_from=prices_from,
            scopes=rows,
            models=tuple(
                (m.entity_id, m.spent_nano) for m in report.models if m.entity_id is not None
            ),
            committed_nano=self.committed_nano,
            ledger_nano=report.total.spent_nano,
        )
