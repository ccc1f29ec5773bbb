"""
The FinOps microservice: the budget guard over HTTP (``pip install coreason-budget[server]``).

Every handler is a thin ``async def`` awaiting one shared
:class:`~coreason_budget.AsyncBudgetManager` on the worker's event loop: no
thread hop per request, and nothing in a handler blocks the loop (opening the
store, spool writes, litellm's price table and a multiprocess metrics scrape
run in worker threads). Status codes are the
same everywhere: 429 over budget, 503 store unavailable (fail closed: a caller
must treat it as "no"), 422 bad input, 404 unknown reservation, 401/403 auth,
413 a body over :data:`MAX_BODY_BYTES`.

Authentication and the body bound are checked by a pure ASGI guard in front of
every route, from the headers alone: an unauthenticated request is refused
before any of its body is read, and an authenticated one never buffers more
than :data:`MAX_BODY_BYTES`.
"""

# No "from __future__ import annotations": FastAPI resolves the handlers' annotations at
# runtime, and some refer to names local to create_app().

import asyncio
import datetime
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import attrs
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    model_validator,
)
from starlette.convertors import Convertor, register_url_convertor
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from ._async_manager import AsyncBudgetManager
from ._budget import ScopeName
from ._config import ENV_PREFIX, BudgetConfig, env_values
from ._money import MAX_AMOUNT_USD, MAX_ID_LENGTH, MAX_LIMIT_NANO, MAX_LIMIT_USD, format_usd
from ._outage import StoreWatch, Watched
from ._receipt import Kind, Receipt, Status
from ._reservation import AsyncReservation
from ._usage import MAX_REPORT_TOP
from .exceptions import (
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    ConfigError,
    IdempotencyConflictError,
    InvalidInputError,
    UnknownModelError,
    UnknownReservationError,
)

__all__ = ["ServerSettings", "app_from_env", "configure_logging", "create_app"]

log = logging.getLogger("coreason_budget.server")

#: The largest request body the service reads. The largest valid body (four
#: 256-character ids, each character JSON-escaped as a 12-byte surrogate pair)
#: is about 12.5 KB; anything longer is refused unread with 413.
MAX_BODY_BYTES = 16 * 1024
#: Seconds a request body may take to arrive (16 KiB at the slowest sane link): a peer
#: trickling a body, with a key or on a route that needs none, must not hold a worker.
BODY_SECONDS = 10.0

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
# Strict: JSON numbers only, as the library requires (true is not $1, "5" is not $5).
# A JSON integer is still a valid amount.
Usd = Annotated[float, Field(strict=True, ge=0, le=MAX_AMOUNT_USD, allow_inf_nan=False)]
LimitUsd = Annotated[float, Field(strict=True, ge=0, le=MAX_LIMIT_USD, allow_inf_nan=False)]
LimitNano = Annotated[int, Field(strict=True, ge=0, le=MAX_LIMIT_NANO)]
Tokens = Annotated[int, Field(strict=True, ge=0, le=100_000_000)]


#: A budget window: its budget starts again at each calendar hour, day, week or month
#: (in the configured time zone). Only the kept ones answer (the day always is).
Window = Literal["hour", "day", "week", "month"]
_DAY_TEXT = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_DATETIME_SCHEMA = WithJsonSchema({"type": "string", "format": "date-time"})


def _aware(value: str, name: str) -> datetime.datetime:
    """*value* as an ISO 8601 datetime with its UTC offset, or ValueError naming *name*."""
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{name} must be an ISO 8601 datetime, got {value!r}") from None
    if moment.utcoffset() is None:
        raise ValueError(f"{name} needs its UTC offset (e.g. Z or +00:00), got {value!r}")
    return moment


def _held_at_text(value: object) -> object:
    # Only ISO 8601 text: lax pydantic would take a number (or numeric text) as a Unix
    # timestamp, and a naive time is no instant (which zone would it be in?).
    if not isinstance(value, str):
        raise ValueError("held_at is ISO 8601 text with a UTC offset, as a reserve answers it")
    return _aware(value, "held_at")


def _period_text(value: object) -> object:
    if not isinstance(value, str):
        raise ValueError("period is text: YYYY-MM-DD, or an ISO 8601 datetime with its offset")
    if _DAY_TEXT.fullmatch(value):
        try:
            return datetime.date.fromisoformat(value)
        except ValueError as e:
            raise ValueError(f"period {value!r} is no date: {e}") from None
    return _aware(value, "period")


#: When a hold was taken, as a settlement names it: an aware ISO 8601 datetime.
HeldAt = Annotated[AwareDatetime, BeforeValidator(_held_at_text)]
#: A report's period: a local date (YYYY-MM-DD), or an instant in it (aware datetime).
PeriodOf = Annotated[datetime.date | datetime.datetime, BeforeValidator(_period_text)]
#: An instant in an answer, as the library writes it (``datetime.isoformat()``, UTC).
Instant = Annotated[
    datetime.datetime, PlainSerializer(lambda d: d.isoformat(), return_type=str), _DATETIME_SCHEMA
]
#: When a hold was taken, to the millisecond (as the store keeps it): sent back as is,
#: it names the hold exactly.
HeldAtAnswer = Annotated[
    datetime.datetime,
    PlainSerializer(lambda d: d.isoformat(timespec="milliseconds"), return_type=str),
    _DATETIME_SCHEMA,
]

_INSECURE = ENV_PREFIX + "INSECURE_NO_AUTH"


class _IdConvertor(Convertor[str]):
    """
    A path segment that is any id the library takes: Starlette's ``:path`` also
    takes "/" (sent as %2F, decoded before routing), but not a newline.
    """

    regex = r"[\s\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


# Routes are compiled with it when they are declared; the name is ours alone.
register_url_convertor("budget_id", _IdConvertor())
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Who may call the service. Admin keys may also change limits."""

    api_keys: frozenset[str] = frozenset()
    admin_api_keys: frozenset[str] = frozenset()
    insecure_no_auth: bool = False

    def __attrs_post_init__(self) -> None:
        for name, keys in (("API_KEYS", self.api_keys), ("ADMIN_API_KEYS", self.admin_api_keys)):
            if any(not (k and k.isascii() and k.isprintable()) for k in keys):
                # Headers are bytes read as latin-1: any other key could never match, and
                # BudgetClient refuses to send one. Said at start-up, not as 401 on every call.
                raise ConfigError(
                    f"{ENV_PREFIX}{name}: every key must be non-empty printable ASCII text"
                )
        if not (self.api_keys or self.admin_api_keys or self.insecure_no_auth):
            raise ConfigError(
                f"No API keys configured: set {ENV_PREFIX}API_KEYS (and "
                f"{ENV_PREFIX}ADMIN_API_KEYS for limit changes), or run with "
                "--insecure-no-auth to serve without authentication"
            )
        if self.insecure_no_auth and (self.api_keys or self.admin_api_keys):
            # Never let a stray variable switch configured keys off.
            raise ConfigError(
                f"Insecure mode ({_INSECURE}=1 or --insecure-no-auth) was asked for, but "
                f"API keys are configured ({ENV_PREFIX}API_KEYS / {ENV_PREFIX}ADMIN_API_KEYS): "
                "unset one or the other; authentication is only turned off when no key is set"
            )

    @classmethod
    def from_env(
        cls,
        insecure_no_auth: bool | None = None,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> Self:
        """
        The settings from ``COREASON_BUDGET_*`` variables, read as
        :meth:`BudgetConfig.from_env` reads them: *env_file* (``.env``) fills
        in what the environment does not set. *insecure_no_auth* (the
        ``--insecure-no-auth`` flag) wins over ``COREASON_BUDGET_INSECURE_NO_AUTH``.
        """
        values = env_values(environ, env_file)

        def keys(name: str) -> frozenset[str]:
            raw = values.get(ENV_PREFIX + name, "")
            return frozenset(k.strip() for k in raw.split(",") if k.strip())

        if insecure_no_auth is None:
            raw = values.get(_INSECURE, "").lower()
            if raw not in _TRUE + _FALSE + ("",):
                raise ConfigError(f"{_INSECURE}={raw!r}: expected 1 or 0")
            insecure_no_auth = raw in _TRUE
        return cls(
            api_keys=keys("API_KEYS"),
            admin_api_keys=keys("ADMIN_API_KEYS"),
            insecure_no_auth=insecure_no_auth,
        )


class ErrorBody(BaseModel):
    """Every error answer: a readable ``detail`` and the library's error class."""

    detail: str
    error: str | None = None


class ExceededBody(BaseModel):
    """
    429: which scope refused in which window, the amounts (exact, in
    nano-dollars), and when that window's budget starts again.
    """

    detail: str
    scope: str
    entity_id: str | None
    limit_nano: int
    spent_nano: int
    requested_nano: int
    #: The window that refused: of the refusing scope's full windows, the one whose
    #: period ends last (waiting for an earlier reset would not be enough).
    window: Window
    #: When that period ends (ISO 8601, UTC), by the store's clock.
    resets_at: Instant
    #: Whole seconds until then (at least 1); the Retry-After header says the same.
    retry_after_seconds: int


# -- answers (the OpenAPI schema's success responses, so generated clients are typed) -------


class HealthAnswer(BaseModel):
    status: Literal["healthy", "unhealthy"]
    redis: Literal["connected", "disconnected"]


class CheckAnswer(BaseModel):
    status: Literal["allowed"]


class ReceiptAnswer(BaseModel):
    """
    What became of a write's money (200 recorded/duplicate/expired, 202 spooled).
    ``idempotency_key`` makes a retry safe: the spend's key, or the reservation id.
    """

    status: Status
    kind: Kind
    idempotency_key: str
    amount_usd: float
    amount_nano: int
    #: Commit and release only: the reservation's state after the call.
    state: str | None = None


class ReservationAnswer(BaseModel):
    """
    A new (or, retried with its id, the existing) hold. ``held_at`` (ISO 8601,
    UTC, milliseconds: the store's clock when the hold was taken) names the
    periods it holds in; a settlement that sends it back with ``user_id`` is
    one store round trip.
    """

    reservation_id: str
    state: str
    estimate_usd: float
    held_at: HeldAtAnswer


class ReservationInfo(ReservationAnswer):
    user_id: str
    project_id: str | None
    model: str | None


class ScopeUsageAnswer(BaseModel):
    """
    One scope's spend in the current period of one window (open holds count as
    spent); ``*_nano`` are exact, ``*_usd`` for display. The limit and what
    remains are null when the scope has no limit in that window.
    """

    entity_id: str | None
    spent_usd: float
    limit_usd: float | None
    remaining_usd: float | None
    spent_nano: int
    limit_nano: int | None
    remaining_nano: int | None
    window: Window
    #: When the period ends and the window's budget starts again (ISO 8601, UTC).
    resets_at: Instant


class ReportAnswer(BaseModel):
    """
    One period's spend: the organisation's total, then the biggest spenders
    first (users, projects, and models across the organisation).
    """

    window: Window
    #: The period's local name: 2026-11-29 (a day, or the week starting then),
    #: 2026-11 (a month), 2026-11-29T14 (an hour).
    period: str
    starts_at: Instant
    resets_at: Instant
    total: ScopeUsageAnswer
    users: list[ScopeUsageAnswer]
    projects: list[ScopeUsageAnswer]
    models: list[ScopeUsageAnswer]


class LimitAnswer(BaseModel):
    status: Literal["updated"]
    scope: ScopeName
    entity_id: str | None
    window: Window


#: ``GET /usage``: one entry per scope ("user", "project" when asked, "global").
UsageAnswer = dict[str, ScopeUsageAnswer]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for *statuses*, so the schema says what errors look like."""
    described = {
        401: "missing or unknown API key",
        403: "this API key may not do that (limits and reports need an admin key)",
        404: "no such reservation (never made, or expired)",
        409: "this idempotency key or reservation id was used for a different charge; "
        "nothing was written",
        413: f"the request body is over {MAX_BODY_BYTES} bytes; it was not read",
        422: "bad input; nothing was changed",
        429: "over budget; nothing was charged. The body names the refusing scope and "
        "window; Retry-After: seconds until that window's period ends",
        503: "the budget store is unavailable: fail closed, treat as refused",
    }
    answers: dict[int | str, dict[str, Any]] = {
        code: {"model": ExceededBody if code == 429 else ErrorBody, "description": described[code]}
        for code in statuses
    }
    if 429 in answers:
        answers[429]["headers"] = {
            "Retry-After": {
                "description": "seconds until the refusing window's period ends and its "
                "budget starts again (the body's retry_after_seconds)",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return answers


_GUARDED = _errors(401, 403, 422, 503)
#: Routes that take a body.
_BODY = _errors(413)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckBody(_Body):
    user_id: Id
    estimated_cost: Usd
    project_id: Id | None = None


class SpendBody(_Body):
    user_id: Id
    cost: Usd
    project_id: Id | None = None
    model: Id | None = None
    idempotency_key: Id | None = None


class ReserveBody(_Body):
    user_id: Id
    estimate: Usd
    project_id: Id | None = None
    model: Id | None = None
    #: Sent by clients so that a retried request finds the hold it already took.
    reservation_id: Id | None = None


class HoldBody(_Body):
    """
    The hold as the client knows it (from its reserve answer): optional.

    With ``user_id`` and ``held_at`` (and the ``project_id`` and ``model`` it
    was reserved with) the settlement is one store round trip, and is still
    recorded once, in the periods it was held in, if the store has lost the
    reservation's record (restarted empty). Without them the store's record
    alone says whose hold it is (unknown id: 404). Where they disagree with the
    record, the record's scopes and instant are settled (token usage is priced
    for the model named here).
    """

    user_id: Id | None = None
    project_id: Id | None = None
    model: Id | None = None
    #: The reserve answer's ``held_at``, sent back as it came.
    held_at: HeldAt | None = None


#: A settlement's body that describes no hold.
_NO_HOLD = HoldBody()


class CommitBody(HoldBody):
    """Either ``actual_cost``, or token counts priced with the reservation's model."""

    actual_cost: Usd | None = None
    input_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    cached_input_tokens: Tokens = 0
    cache_creation_input_tokens: Tokens = 0


class LimitBody(_Body):
    """A limit of one scope in one window; ``entity_id``: the user, project or model name."""

    scope: ScopeName
    entity_id: Id | None = None
    #: The window the limit is for; the manager must keep it (the day always is).
    window: Window = "day"
    limit_usd: LimitUsd | None = None
    #: The limit exact, instead of limit_usd (what the clients send: a float cannot
    #: hold every nano-precise limit above $1M). Exactly one of the two; null removes.
    limit_nano: LimitNano | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> Self:
        if len({"limit_usd", "limit_nano"} & self.model_fields_set) != 1:
            raise ValueError("send exactly one of limit_usd and limit_nano (null removes it)")
        return self

    def limit(self) -> Decimal | float | None:
        if "limit_usd" in self.model_fields_set or self.limit_nano is None:
            return self.limit_usd
        return Decimal(self.limit_nano).scaleb(-9)


class _Metrics:
    """
    Prometheus metrics of the app, and its store outages in the log.

    One process: the app's own registry. Several worker processes (``serve
    --workers N``, gunicorn) share ``PROMETHEUS_MULTIPROC_DIR``: each worker
    writes its values there and a scrape, whichever worker answers it, adds up
    every worker's (prometheus-client's multiprocess mode).
    """

    def __init__(self) -> None:
        self.multiprocess = _multiprocess()
        # In multiprocess mode the metrics go to their worker's files; the scrape reads
        # them all, so they are kept out of the registry the scrape uses.
        own = CollectorRegistry()
        self.registry = CollectorRegistry() if self.multiprocess else own
        if self.multiprocess:
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.watch = StoreWatch()
        self.decisions = Counter(
            "coreason_budget_decisions",
            "Budget decisions: allowed, blocked (by refusing scope) or recorded",
            ["decision", "scope"],
            registry=own,
        )
        self.dollars = Counter(
            "coreason_budget_dollars",
            "Dollars allowed (reserved or checked), blocked and recorded",
            ["decision", "scope"],
            registry=own,
        )
        self.store_seconds = Histogram(
            "coreason_budget_store_seconds",
            "Latency of budget store operations",
            ["operation"],
            registry=own,
        )
        self.store_errors = Counter(
            "coreason_budget_store_errors",
            "Budget store operations that failed (the request was refused: fail closed)",
            ["operation"],
            registry=own,
        )

    def scrape(self) -> bytes:
        """The exposition text: every worker's values in multiprocess mode."""
        return generate_latest(self.registry)

    def process_exit(self) -> None:
        """This worker stops: its live gauges (if any) stop counting; its counters stay."""
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    def decided(self, decision: str, scope: str, usd: float) -> None:
        self.decisions.labels(decision, scope).inc()
        self.dollars.labels(decision, scope).inc(usd)

    @contextmanager
    def store(self, operation: str) -> Iterator[Watched]:
        """
        One store operation: its latency, refusal or failure; outages and
        recoveries logged (a write sets ``spooled`` on what this yields).
        """
        start = time.perf_counter()
        try:
            with self.watch.watching(operation) as watched:
                yield watched
        except BudgetExceededError as e:
            self.decided("blocked", e.scope, e.requested_usd)
            log.info(
                "refused: scope %s%s: requested %s, spent %s of %s a %s (%s)",
                e.scope,
                "" if e.entity_id is None else f" {e.entity_id}",
                format_usd(e.requested_nano),
                format_usd(e.spent_nano),
                format_usd(e.limit_nano),
                e.window,
                operation,
                extra={
                    "event": "refused",
                    "operation": operation,
                    **{k: v for k, v in e.to_json().items() if k != "detail"},
                },
            )
            raise
        except BudgetUnavailableError:
            self.store_errors.labels(operation).inc()
            raise
        finally:
            self.store_seconds.labels(operation).observe(time.perf_counter() - start)


def create_app(manager: AsyncBudgetManager, settings: ServerSettings) -> FastAPI:
    """
    The HTTP API over *manager*; the app closes the manager when it shuts down.

    The manager is used on the event loop that serves the app (its store is
    opened there on the first request): give each app a manager of its own.
    """

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if settings.insecure_no_auth:
            log.warning(
                "!!! AUTHENTICATION IS DISABLED: anyone who can reach this port can spend !!!"
            )
        # Import litellm's table in the background: the first priced commit
        # would otherwise take seconds, longer than a client's timeout. A daemon
        # thread, not the loop's executor, so that shutting down never waits for it.
        threading.Thread(target=lambda: manager.pricing.preload(), daemon=True).start()
        log.info("Worker %d started", os.getpid())
        yield
        log.info("Worker %d stopping", os.getpid())
        await manager.aclose()
        metrics.process_exit()

    app = FastAPI(
        title="coreason-budget",
        summary="LLM budgets per user, project, model and organisation, by the hour, day, "
        "week or month; refuses before you spend.",
        version=__version__,
        lifespan=lifespan,
    )
    metrics = _Metrics()
    bearer = HTTPBearer(auto_error=False)
    user_keys = [k.encode() for k in settings.api_keys | settings.admin_api_keys]
    admin_keys = [k.encode() for k in settings.admin_api_keys]

    def _authorized(given: str, keys: list[bytes]) -> bool:
        # Compare with every key so the time taken says nothing about which matched.
        return sum(hmac.compare_digest(given.encode(), k) for k in keys) > 0

    def _refusal(token: str | None, keys: list[bytes]) -> _HTTPError | None:
        """Why a request with bearer *token* may not call a route open to *keys*, if it may not."""
        if settings.insecure_no_auth:
            return None
        if not token:
            return _HTTPError(401, "missing bearer API key", {"WWW-Authenticate": "Bearer"})
        if _authorized(token, keys):
            return None
        if _authorized(token, user_keys):
            return _HTTPError(403, "API key not allowed here")
        return _HTTPError(401, "bad API key")

    def _auth(keys: list[bytes]) -> Callable[..., Awaitable[None]]:
        # The guard has already checked the key; this checks it again where the route is
        # declared (defence in depth) and puts the bearer scheme in the OpenAPI schema.
        # async: FastAPI would run a sync dependency in its thread pool, a hop per request.
        async def check(
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> None:
            refused = _refusal(None if creds is None else creds.credentials, keys)
            if refused is not None:
                raise refused

        check.keys = keys  # type: ignore[attr-defined]
        return check

    user = [Depends(_auth(user_keys))]
    admin = [Depends(_auth(admin_keys))]

    def _keys_for(route: BaseRoute) -> list[bytes] | None:
        """The keys a route is open to (None: open to all), from its auth dependency."""
        for d in getattr(route, "dependencies", ()):
            keys = getattr(d.dependency, "keys", None)
            if keys is not None:
                return list(keys)
        return None

    def _guard(scope: Scope) -> _HTTPError | None:
        """The guard's verdict on a request, from its method, path and headers alone."""
        if settings.insecure_no_auth:
            return None
        keys: list[bytes] | None = user_keys  # an unknown path is a 404 for key holders only
        partial: BaseRoute | None = None
        for route in app.router.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                keys = _keys_for(route)
                break
            if match is Match.PARTIAL and partial is None:
                partial = route  # a 405 (wrong method) is answered to whoever may call it
        else:
            if partial is not None:
                keys = _keys_for(partial)
        if keys is None:
            return None
        return _refusal(_bearer_token(scope), keys)

    app.add_middleware(_Guard, refuse=_guard, limit=MAX_BODY_BYTES, seconds=BODY_SECONDS)

    # Handlers are async: Starlette runs sync ones in its thread pool.
    @app.exception_handler(_HTTPError)
    async def _http_error(_: Request, e: _HTTPError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # Not FastAPI's default, which echoes the input back and cannot echo a NaN.
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(BudgetError)
    async def _budget_error(_: Request, e: BudgetError) -> JSONResponse:
        if isinstance(e, BudgetExceededError):
            return _exceeded(e, manager)
        status, extra = 422, {}
        if isinstance(e, BudgetUnavailableError):
            # Nothing was saved to be charged later; the ids make the client's retry safe.
            status, extra = 503, e.to_json()
        elif isinstance(e, UnknownReservationError):
            status = 404
        elif isinstance(e, IdempotencyConflictError):
            status = 409
        elif not isinstance(e, InvalidInputError | UnknownModelError):
            status = 500
        detail = "\n".join([str(e), *getattr(e, "__notes__", [])])
        return JSONResponse(
            {"detail": detail, "error": type(e).__name__, **extra}, status_code=status
        )

    @app.get(
        "/health",
        response_model=HealthAnswer,
        responses={
            503: {
                "model": HealthAnswer,
                "description": '{"status": "unhealthy", "redis": "disconnected"}',
            }
        },
    )
    async def health() -> JSONResponse:
        """Unauthenticated, for load balancers: 503 when the store does not answer."""
        try:
            with metrics.store("ping"):
                await manager.ping()
        except BudgetUnavailableError:
            return JSONResponse({"status": "unhealthy", "redis": "disconnected"}, status_code=503)
        return JSONResponse({"status": "healthy", "redis": "connected"})

    @app.post("/check", dependencies=user, responses=_GUARDED | _BODY | _errors(429))
    async def check(body: CheckBody) -> CheckAnswer:
        """
        Would *estimated_cost* fit now, in every scope and window? 200 allowed,
        429 not. Writes nothing.
        """
        with metrics.store("check"):
            await manager.check_availability(body.user_id, body.estimated_cost, body.project_id)
        metrics.decided("allowed", "all", body.estimated_cost)
        return CheckAnswer(status="allowed")

    @app.post(
        "/spend",
        dependencies=user,
        response_model=ReceiptAnswer,
        responses=_GUARDED | _BODY | _errors(409) | _SPOOLED,
    )
    async def spend(body: SpendBody) -> JSONResponse:
        """
        Record money already spent; once per idempotency_key. 200 "recorded" or
        "duplicate"; 202 "spooled": the store is unreachable, the service saved
        the spend and records it exactly once when it is back.
        """
        with metrics.store("spend") as watched:
            receipt = await manager.record_spend(
                body.user_id, body.cost, body.project_id, body.model, body.idempotency_key
            )
            watched.spooled = receipt.spooled
        if receipt.status == "recorded":
            metrics.decided("recorded", "all", body.cost)
        return _receipt(receipt)

    @app.post("/reservations", dependencies=user, responses=_GUARDED | _BODY | _errors(409, 429))
    async def reserve(body: ReserveBody) -> ReservationAnswer:
        """Hold the estimate in every scope (429 if it does not fit)."""
        with metrics.store("reserve"):
            r = await manager.reserve(
                body.user_id,
                body.estimate,
                body.project_id,
                body.model,
                reservation_id=body.reservation_id,
            )
        metrics.decided("allowed", "all", r.estimate_usd)
        return ReservationAnswer(
            reservation_id=r.id, state=r.state, estimate_usd=r.estimate_usd, held_at=r.held_at
        )

    @app.get(
        "/reservations/{reservation_id:budget_id}",
        dependencies=user,
        responses=_GUARDED | _errors(404),
    )
    async def get_reservation(reservation_id: Id) -> ReservationInfo:
        with metrics.store("lookup"):
            r = await manager.reservation(reservation_id)
        return ReservationInfo(
            reservation_id=r.id,
            state=r.state,
            estimate_usd=r.estimate_usd,
            user_id=r.user_id,
            project_id=r.project_id,
            model=r.model,
            held_at=r.held_at,
        )

    async def _held(rid: str, body: HoldBody, *, lookup: bool) -> AsyncReservation:
        return await manager.reservation(
            rid,
            user_id=body.user_id,
            project_id=body.project_id,
            model=body.model,
            held_at=body.held_at,
            lookup=lookup,
        )

    async def _settled(
        rid: str,
        body: HoldBody,
        settle: Callable[[AsyncReservation], Awaitable[Receipt]],
        *,
        priced: bool = False,
    ) -> tuple[AsyncReservation, Receipt]:
        """
        Settle reservation *rid* as *settle* says: the handle and its receipt.

        One store round trip (the settlement) when the body describes the hold
        (``user_id`` and ``held_at``, as clients send it) or describes nothing (the
        store's record alone says whose it is; no record: 404). The
        reservation is looked up first only when that cannot do: half a
        description, or token usage without the model to price it for.
        """
        try:
            return await _settle_held(rid, body, settle, priced=priced)
        except ValueError as e:
            if body.held_at is None or isinstance(e, BudgetError):
                raise
            # The calendar cannot place the periods of an instant at the edge of years 1
            # to 9999 (a plain ValueError, before anything is sent): bad input, not a fault.
            raise InvalidInputError(f"held_at {body.held_at.isoformat()}: {e}") from e

    async def _settle_held(
        rid: str,
        body: HoldBody,
        settle: Callable[[AsyncReservation], Awaitable[Receipt]],
        *,
        priced: bool,
    ) -> tuple[AsyncReservation, Receipt]:
        described = body.user_id is not None and body.held_at is not None
        bare = all(v is None for v in (body.user_id, body.project_id, body.model, body.held_at))
        if (described or bare) and not (priced and body.model is None):
            r = await _held(rid, body, lookup=False)
            try:
                return r, await settle(r)
            except InvalidInputError as e:
                if not described or isinstance(e, IdempotencyConflictError):
                    raise
                # Nothing was written: the body named another instant than the record's
                # (or an amount its scopes cannot take). Settled as the record says, as a
                # looked-up handle is (the same error again if that is what it was).
        r = await _held(rid, body, lookup=True)
        return r, await settle(r)

    @app.post(
        "/reservations/{reservation_id:budget_id}/commit",
        dependencies=user,
        response_model=ReceiptAnswer,
        responses=_GUARDED | _BODY | _errors(404, 409) | _SPOOLED,
    )
    async def commit(reservation_id: Id, body: CommitBody) -> JSONResponse:
        """
        Settle to the actual cost (or priced token usage). Repeats are no-ops
        ("duplicate"); 202 "spooled" when the store is unreachable (recorded once
        it is back). ``state`` is the reservation's state after it.
        """
        tokens = body.input_tokens is not None or body.output_tokens is not None
        if (body.actual_cost is None) == (not tokens):
            raise InvalidInputError("send either actual_cost or input_tokens and output_tokens")

        async def settle(r: AsyncReservation) -> Receipt:
            if body.actual_cost is not None:
                return await r.commit(body.actual_cost)
            return await r.commit_usage(
                input_tokens=body.input_tokens or 0,
                output_tokens=body.output_tokens or 0,
                cached_input_tokens=body.cached_input_tokens,
                cache_creation_input_tokens=body.cache_creation_input_tokens,
            )

        with metrics.store("commit") as watched:
            r, receipt = await _settled(reservation_id, body, settle, priced=tokens)
            watched.spooled = receipt.spooled
        if receipt.status == "recorded":
            metrics.decided("recorded", "all", receipt.amount_usd)
        return _receipt(receipt, r.state)

    @app.post(
        "/reservations/{reservation_id:budget_id}/release",
        dependencies=user,
        response_model=ReceiptAnswer,
        responses=_GUARDED | _BODY | _errors(404, 409) | _SPOOLED,
    )
    async def release(reservation_id: Id, body: HoldBody | None = None) -> JSONResponse:
        """Give the hold back. Repeats (and release after commit) are no-ops."""
        with metrics.store("release") as watched:
            r, receipt = await _settled(reservation_id, body or _NO_HOLD, lambda r: r.release())
            watched.spooled = receipt.spooled
        return _receipt(receipt, r.state)

    @app.get("/usage/{user_id:budget_id}", dependencies=user, responses=_GUARDED)
    async def usage(
        user_id: Id, project_id: Id | None = None, window: Window = "day"
    ) -> UsageAnswer:
        """
        Spent, limit and remaining per scope in the current period of *window*
        (open holds count as spent). A window the service does not keep: 422.
        """
        with metrics.store("usage"):
            usage = await manager.usage(user_id, project_id, window=window)
        return {scope: ScopeUsageAnswer(**u.to_json()) for scope, u in usage.items()}

    @app.get("/report", dependencies=admin, responses=_GUARDED)
    async def report(
        top: Annotated[int, Query(ge=0, le=MAX_REPORT_TOP)] = 10,
        window: Window = "day",
        period: Annotated[
            PeriodOf | None,
            Query(
                description="the period holding this local date (YYYY-MM-DD) or instant (an "
                "ISO 8601 datetime with its offset); default: the current one"
            ),
        ] = None,
    ) -> ReportAnswer:
        """
        One period of *window* (the current one by default): the total, then
        the top users, projects and models (admin key).
        """
        with metrics.store("report"):
            try:
                r = await manager.report(top, window=window, period=period)
            except ValueError as e:
                if period is None or isinstance(e, BudgetError):
                    raise
                # A period the calendar cannot place (at the edge of years 1 to 9999): the
                # calendar says so as a plain ValueError; it is bad input, not a fault.
                raise InvalidInputError(f"period {period}: {e}") from e
        return ReportAnswer.model_validate(r.to_json())

    @app.put("/limits", dependencies=admin, responses=_GUARDED | _BODY)
    async def set_limit(body: LimitBody) -> LimitAnswer:
        """
        Override (or with ``limit_usd: null`` remove the override of) one
        scope's limit in one window (default: the day).
        """
        with metrics.store("set_limit"):
            await manager.set_limit(body.scope, body.entity_id, body.limit(), body.window)
        return LimitAnswer(
            status="updated", scope=body.scope, entity_id=body.entity_id, window=body.window
        )

    @app.get(
        "/metrics",
        dependencies=user,
        response_class=PlainTextResponse,
        responses=_TEXT | _errors(401, 403),
    )
    async def prometheus() -> PlainTextResponse:
        # In multiprocess mode a scrape reads every worker's files: off the loop.
        text = await asyncio.to_thread(metrics.scrape)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    return app


def _exceeded(e: BudgetExceededError, manager: AsyncBudgetManager) -> JSONResponse:
    """
    429: the refusal, and when the refusing window's budget starts again
    (``Retry-After`` and ``retry_after_seconds`` agree).
    """
    doc: dict[str, object] = {"detail": str(e), **e.to_json()}
    retry = e.retry_after_seconds
    if retry is None:  # an error the store did not time: the current day's end
        retry = manager.seconds_until_reset()
        doc["retry_after_seconds"] = retry
    if doc["resets_at"] is None:
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        doc["resets_at"] = (now + datetime.timedelta(seconds=retry)).isoformat()
    return JSONResponse(doc, status_code=429, headers={"Retry-After": str(retry)})


def _receipt(receipt: Receipt, state: str | None = None) -> JSONResponse:
    """A write's answer: 202 when it was only saved (spooled), 200 when the store has it."""
    doc = receipt.to_json()
    if state is not None:
        doc["state"] = state
    return JSONResponse(doc, status_code=202 if receipt.spooled else 200)


_TEXT: dict[int | str, dict[str, Any]] = {200: {"content": {CONTENT_TYPE_LATEST: {}}}}
_SPOOLED: dict[int | str, dict[str, Any]] = {
    202: {
        "model": ReceiptAnswer,
        "description": "the store is unreachable: saved by the service (status "
        '"spooled") and recorded exactly once when the store is back; a retry must '
        "reuse the idempotency key",
    }
}


class _HTTPError(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        headers: dict[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.headers = headers
        self.error = error

    def response(self) -> JSONResponse:
        body = (
            {"detail": self.detail}
            if self.error is None
            else {"detail": self.detail, "error": self.error}
        )
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _bearer_token(scope: Scope) -> str | None:
    """The bearer credentials of a request, read as FastAPI's HTTPBearer reads them."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token if scheme.lower() == "bearer" and token else None
    return None


class _Guard:
    """
    Pure ASGI, in front of every route: refuses a request its headers already
    condemn (no or a wrong API key) before reading any of its body, then reads
    the body with a bound, answering 413 once it is over *limit* bytes (at once
    when Content-Length says so), and 408 when it has not all arrived within
    *seconds*. The app gets the body as one message; at most *limit* bytes of a
    request are ever held.
    """

    def __init__(
        self,
        app: ASGIApp,
        refuse: Callable[[Scope], _HTTPError | None],
        limit: int,
        seconds: float,
    ):
        self.app = app
        self.refuse = refuse
        self.limit = limit
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self.refuse(scope)
        if refused is None:
            refused = self._too_long(_content_length(scope))
        if refused is not None:
            await refused.response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(self.seconds):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # the client went away
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    refused = self._too_long(size)
                    if refused is not None:
                        break
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            refused = _HTTPError(408, f"request body not received within {self.seconds:g} s")
        if refused is not None:
            await refused.response()(scope, receive, send)
            return
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)

    def _too_long(self, size: int | None) -> _HTTPError | None:
        if size is None or size <= self.limit:
            return None
        return _HTTPError(
            413,
            f"request body over {self.limit} bytes (no valid request is that long); not read",
            error="InvalidInputError",
        )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11/httptools refuse these before us; count the bytes instead
    return None


#: Turns the log file off (stderr only): an empty value would mean "unset", the default.
LOG_PATH_OFF = "off"
_LOG_TEXT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
# What every LogRecord has; anything else on a record came as ``extra=`` and goes into JSON.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's message again, with terminal colour codes
}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, pid, message, and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(path: str, fmt: str = "text") -> None:
    """
    Log the service at INFO to stderr (what containers collect) and to *path*.

    *path* ``"off"``: stderr only. *fmt* ``"json"``: one JSON object a line. Only
    the service and CLI call this; calling it again replaces what it set up
    before (each uvicorn worker calls it, and so does ``serve`` itself).
    """
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(_LOG_TEXT)
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if path != LOG_PATH_OFF:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(path))
        except OSError as e:
            # A configuration error (exit 2, one line), not a traceback at start-up.
            raise ConfigError(
                f"{ENV_PREFIX}LOG_PATH={path!r}: cannot write the log file there ({e}); "
                f"set it to a writable path, or to {LOG_PATH_OFF!r} to log to stderr only"
            ) from None
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _OURS, True)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


_OURS = "_coreason_budget_handler"


#: uvicorn's own loggers, through the service's handlers and format (uvicorn.run's
#: ``log_config``); no access log: the service does not log each request.
UVICORN_LOG_CONFIG: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "uvicorn": {"level": "INFO", "handlers": [], "propagate": True},
        "uvicorn.error": {"level": "INFO", "handlers": [], "propagate": True},
        "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
    },
}


@contextmanager
def multiprocess_metrics(workers: int) -> Iterator[str | None]:
    """
    For ``serve --workers N`` (N > 1): a PROMETHEUS_MULTIPROC_DIR shared by the workers.

    Set before the workers start (they import prometheus-client afresh), so a
    scrape answered by any worker adds up all of them. A directory the operator
    set is used, with any number of workers (prometheus-client writes there
    whenever the variable is set), made if missing and emptied of an earlier
    run's files first; otherwise a temporary one is made and removed afterwards.
    One worker and no variable: nothing to share (None).
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):
            stale.unlink()
        yield given
        return
    if workers <= 1:
        yield None
        return
    made = tempfile.mkdtemp(prefix="coreason-budget-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = made
    try:
        yield made
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(made, ignore_errors=True)


def _multiprocess() -> bool:
    """Whether prometheus-client writes this process's values to PROMETHEUS_MULTIPROC_DIR."""
    # Decided when prometheus_client was first imported: the variable set later changes nothing.
    return prometheus_values.ValueClass is not prometheus_values.MutexValue and bool(
        os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    )


def app_from_env() -> FastAPI:
    """The app as each uvicorn worker builds it: everything from ``COREASON_BUDGET_*``."""
    config = BudgetConfig.from_env()
    configure_logging(config.log_path, config.log_format)
    return create_app(AsyncBudgetManager(config), ServerSettings.from_env())
