"""
The FinOps microservice: the budget guard over HTTP (``pip install coreason-budget[server]``).

Every handler is a thin, synchronous call into one shared
:class:`~coreason_budget.BudgetManager` (FastAPI runs sync handlers in its
thread pool, which is what the manager is built for). Status codes are the
same everywhere: 429 over budget, 503 store unavailable (fail closed: a caller
must treat it as "no"), 422 bad input, 404 unknown reservation, 401/403 auth.
"""

# No "from __future__ import annotations": FastAPI resolves the handlers' annotations at
# runtime, and some refer to names local to create_app().

import datetime
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import attrs
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ._config import ENV_PREFIX, BudgetConfig
from ._manager import BudgetManager
from ._money import MAX_AMOUNT_USD, MAX_ID_LENGTH, MAX_LIMIT_USD
from ._receipt import Receipt
from ._reservation import Reservation
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

Id = Annotated[str, StringConstraints(min_length=1, max_length=MAX_ID_LENGTH)]
Usd = Annotated[float, Field(ge=0, le=MAX_AMOUNT_USD, allow_inf_nan=False)]
Tokens = Annotated[int, Field(ge=0, le=100_000_000)]


@attrs.frozen(kw_only=True)
class ServerSettings:
    """Who may call the service. Admin keys may also change limits."""

    api_keys: frozenset[str] = frozenset()
    admin_api_keys: frozenset[str] = frozenset()
    insecure_no_auth: bool = False

    def __attrs_post_init__(self) -> None:
        if not (self.api_keys or self.admin_api_keys or self.insecure_no_auth):
            raise ConfigError(
                f"No API keys configured: set {ENV_PREFIX}API_KEYS (and "
                f"{ENV_PREFIX}ADMIN_API_KEYS for limit changes), or run with "
                "--insecure-no-auth to serve without authentication"
            )

    @classmethod
    def from_env(cls, insecure_no_auth: bool | None = None) -> Self:
        def keys(name: str) -> frozenset[str]:
            raw = os.environ.get(ENV_PREFIX + name, "")
            return frozenset(k.strip() for k in raw.split(",") if k.strip())

        if insecure_no_auth is None:
            insecure_no_auth = os.environ.get(ENV_PREFIX + "INSECURE_NO_AUTH", "") == "1"
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
    """429: which scope refused, and the amounts (exact, in nano-dollars)."""

    detail: str
    scope: str
    entity_id: str | None
    limit_nano: int
    spent_nano: int
    requested_nano: int


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for *statuses*, so the schema says what errors look like."""
    described = {
        401: "missing or unknown API key",
        403: "this API key may not do that (limits need an admin key)",
        404: "no such reservation (never made, or expired)",
        409: "this idempotency key or reservation id was used for a different charge; "
        "nothing was written",
        422: "bad input; nothing was changed",
        429: "over budget; nothing was charged",
        503: "the budget store is unavailable: fail closed, treat as refused",
    }
    return {
        code: {"model": ExceededBody if code == 429 else ErrorBody, "description": described[code]}
        for code in statuses
    }


_GUARDED = _errors(401, 403, 422, 503)


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
    The hold as the client knows it (from its reserve answer): optional, and
    only read when the store has lost the reservation's record (restarted
    empty), so that its settlement is still recorded once, on its day.
    """

    user_id: Id | None = None
    project_id: Id | None = None
    model: Id | None = None
    day: datetime.date | None = None


class CommitBody(HoldBody):
    """Either ``actual_cost``, or token counts priced with the reservation's model."""

    actual_cost: Usd | None = None
    input_tokens: Tokens | None = None
    output_tokens: Tokens | None = None
    cached_input_tokens: Tokens = 0
    cache_creation_input_tokens: Tokens = 0


class LimitBody(_Body):
    scope: Literal["user", "project", "global"]
    entity_id: Id | None = None
    limit_usd: Annotated[float, Field(ge=0, le=MAX_LIMIT_USD, allow_inf_nan=False)] | None


class _Metrics:
    """Prometheus metrics, one registry per app (per worker process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "coreason_budget_decisions",
            "Budget decisions: allowed, blocked (by refusing scope) or recorded",
            ["decision", "scope"],
            registry=self.registry,
        )
        self.dollars = Counter(
            "coreason_budget_dollars",
            "Dollars allowed (reserved or checked), blocked and recorded",
            ["decision", "scope"],
            registry=self.registry,
        )
        self.store_seconds = Histogram(
            "coreason_budget_store_seconds",
            "Latency of budget store operations",
            ["operation"],
            registry=self.registry,
        )
        self.store_errors = Counter(
            "coreason_budget_store_errors",
            "Budget store operations that failed (the request was refused: fail closed)",
            ["operation"],
            registry=self.registry,
        )

    def decided(self, decision: str, scope: str, usd: float) -> None:
        self.decisions.labels(decision, scope).inc()
        self.dollars.labels(decision, scope).inc(usd)

    @contextmanager
    def store(self, operation: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BudgetExceededError as e:
            self.decided("blocked", e.scope, e.requested_usd)
            raise
        except BudgetUnavailableError:
            self.store_errors.labels(operation).inc()
            raise
        finally:
            self.store_seconds.labels(operation).observe(time.perf_counter() - start)


def create_app(manager: BudgetManager, settings: ServerSettings) -> FastAPI:
    """The HTTP API over *manager*; the app closes the manager when it shuts down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if settings.insecure_no_auth:
            log.warning(
                "!!! AUTHENTICATION IS DISABLED: anyone who can reach this port can spend !!!"
            )
        # Import litellm's table in the background: the first priced commit
        # would otherwise take seconds, longer than a client's timeout.
        threading.Thread(target=manager.pricing.preload, daemon=True).start()
        yield
        manager.close()

    app = FastAPI(
        title="coreason-budget",
        summary="Daily LLM budgets per user, project and organisation; refuses before you spend.",
        version="0.1.0",
        lifespan=lifespan,
    )
    metrics = _Metrics()
    bearer = HTTPBearer(auto_error=False)
    user_keys = [k.encode() for k in settings.api_keys | settings.admin_api_keys]
    admin_keys = [k.encode() for k in settings.admin_api_keys]

    def _authorized(creds: HTTPAuthorizationCredentials | None, keys: list[bytes]) -> bool:
        if creds is None:
            return False
        given = creds.credentials.encode()
        # Compare with every key so the time taken says nothing about which matched.
        return sum(hmac.compare_digest(given, k) for k in keys) > 0

    def _auth(keys: list[bytes]) -> Callable[..., None]:
        def check(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
            if settings.insecure_no_auth:
                return
            if creds is None:
                raise _HTTPError(401, "missing bearer API key", {"WWW-Authenticate": "Bearer"})
            if not _authorized(creds, keys):
                status = 403 if _authorized(creds, user_keys) else 401
                raise _HTTPError(
                    status, "API key not allowed here" if status == 403 else "bad API key"
                )

        return check

    user = [Depends(_auth(user_keys))]
    admin = [Depends(_auth(admin_keys))]

    @app.exception_handler(_HTTPError)
    def _http_error(_: Request, e: _HTTPError) -> JSONResponse:
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        # Not FastAPI's default, which echoes the input back and cannot echo a NaN.
        problems = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(BudgetError)
    def _budget_error(_: Request, e: BudgetError) -> JSONResponse:
        if isinstance(e, BudgetExceededError):
            return JSONResponse({"detail": str(e), **e.to_json()}, status_code=429)
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
        responses={503: {"description": '{"status": "unhealthy", "redis": "disconnected"}'}},
    )
    def health() -> JSONResponse:
        """Unauthenticated, for load balancers: 503 when the store does not answer."""
        try:
            with metrics.store("ping"):
                manager.ping()
        except BudgetUnavailableError:
            return JSONResponse({"status": "unhealthy", "redis": "disconnected"}, status_code=503)
        return JSONResponse({"status": "healthy", "redis": "connected"})

    @app.post("/check", dependencies=user, responses=_GUARDED | _errors(429))
    def check(body: CheckBody) -> dict[str, str]:
        """Would *estimated_cost* fit today? 200 allowed, 429 not. Writes nothing."""
        with metrics.store("check"):
            manager.check_availability(body.user_id, body.estimated_cost, body.project_id)
        metrics.decided("allowed", "all", body.estimated_cost)
        return {"status": "allowed"}

    @app.post("/spend", dependencies=user, responses=_GUARDED | _errors(409) | _SPOOLED)
    def spend(body: SpendBody) -> JSONResponse:
        """
        Record money already spent; once per idempotency_key. 200 "recorded" or
        "duplicate"; 202 "spooled": the store is unreachable, the service saved
        the spend and records it exactly once when it is back.
        """
        with metrics.store("spend"):
            receipt = manager.record_spend(
                body.user_id, body.cost, body.project_id, body.model, body.idempotency_key
            )
        if receipt.status == "recorded":
            metrics.decided("recorded", "all", body.cost)
        return _receipt(receipt)

    @app.post("/reservations", dependencies=user, responses=_GUARDED | _errors(409, 429))
    def reserve(body: ReserveBody) -> dict[str, Any]:
        """Hold the estimate in every scope (429 if it does not fit)."""
        with metrics.store("reserve"):
            r = manager.reserve(
                body.user_id,
                body.estimate,
                body.project_id,
                body.model,
                reservation_id=body.reservation_id,
            )
        metrics.decided("allowed", "all", r.estimate_usd)
        return {
            "reservation_id": r.id,
            "state": r.state,
            "estimate_usd": r.estimate_usd,
            "day": r.date.isoformat(),
        }

    @app.get(
        "/reservations/{reservation_id:path}",
        dependencies=user,
        responses=_GUARDED | _errors(404),
    )
    def get_reservation(reservation_id: Id) -> dict[str, Any]:
        with metrics.store("lookup"):
            r = manager.reservation(reservation_id)
        return {
            "reservation_id": r.id,
            "state": r.state,
            "estimate_usd": r.estimate_usd,
            "user_id": r.user_id,
            "project_id": r.project_id,
            "model": r.model,
            "day": r.date.isoformat(),
        }

    def _held(reservation_id: str, body: HoldBody) -> Reservation:
        """The reservation, or (its record lost) the hold as the client describes it."""
        return manager.reservation(
            reservation_id,
            user_id=body.user_id,
            project_id=body.project_id,
            model=body.model,
            date=body.day,
        )

    @app.post(
        "/reservations/{reservation_id:path}/commit",
        dependencies=user,
        responses=_GUARDED | _errors(404) | _SPOOLED,
    )
    def commit(reservation_id: Id, body: CommitBody) -> JSONResponse:
        """
        Settle to the actual cost (or priced token usage). Repeats are no-ops
        ("duplicate"); 202 "spooled" when the store is unreachable (recorded once
        it is back). ``state`` is the reservation's state after it.
        """
        tokens = body.input_tokens is not None or body.output_tokens is not None
        if (body.actual_cost is None) == (not tokens):
            raise InvalidInputError("send either actual_cost or input_tokens and output_tokens")
        with metrics.store("commit"):
            r = _held(reservation_id, body)
            if body.actual_cost is not None:
                receipt = r.commit(body.actual_cost)
            else:
                receipt = r.commit_usage(
                    input_tokens=body.input_tokens or 0,
                    output_tokens=body.output_tokens or 0,
                    cached_input_tokens=body.cached_input_tokens,
                    cache_creation_input_tokens=body.cache_creation_input_tokens,
                )
        if receipt.status == "recorded":
            metrics.decided("recorded", "all", receipt.amount_usd)
        return _receipt(receipt, r.state)

    @app.post(
        "/reservations/{reservation_id:path}/release",
        dependencies=user,
        responses=_GUARDED | _errors(404) | _SPOOLED,
    )
    def release(reservation_id: Id, body: HoldBody | None = None) -> JSONResponse:
        """Give the hold back. Repeats (and release after commit) are no-ops."""
        with metrics.store("release"):
            r = _held(reservation_id, body or HoldBody())
            receipt = r.release()
        return _receipt(receipt, r.state)

    @app.get("/usage/{user_id}", dependencies=user, responses=_GUARDED)
    def usage(user_id: Id, project_id: Id | None = None) -> dict[str, Any]:
        """Spent, limit and remaining per scope today (open holds count as spent)."""
        with metrics.store("usage"):
            usage = manager.usage(user_id, project_id)
        return {scope: u.to_json() for scope, u in usage.items()}

    @app.get("/report", dependencies=user, responses=_GUARDED)
    def report(top: Annotated[int, Query(ge=1, le=1000)] = 10) -> dict[str, Any]:
        """Today's spend: the total, then the top users, projects and models."""
        with metrics.store("report"):
            r = manager.report(top)
        return r.to_json()

    @app.put("/limits", dependencies=admin, responses=_GUARDED)
    def set_limit(body: LimitBody) -> dict[str, Any]:
        """Override (or with ``limit_usd: null`` remove the override of) a daily limit."""
        with metrics.store("set_limit"):
            manager.set_limit(body.scope, body.entity_id, body.limit_usd)
        return {"status": "updated", "scope": body.scope, "entity_id": body.entity_id}

    @app.get("/metrics", dependencies=user, responses=_errors(401, 403))
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _receipt(receipt: Receipt, state: str | None = None) -> JSONResponse:
    """A write's answer: 202 when it was only saved (spooled), 200 when the store has it."""
    doc = receipt.to_json()
    if state is not None:
        doc["state"] = state
    return JSONResponse(doc, status_code=202 if receipt.spooled else 200)


_SPOOLED: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "the store is unreachable: saved by the service (status "
        '"spooled") and recorded exactly once when the store is back; a retry must '
        "reuse the idempotency key"
    }
}


class _HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.headers = headers


def configure_logging(path: str) -> None:
    """Log the service to *path* (and stderr); only the service and CLI call this."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
        handlers=[logging.FileHandler(path), logging.StreamHandler()],
    )


def app_from_env() -> FastAPI:
    """The app as each uvicorn worker builds it: everything from ``COREASON_BUDGET_*``."""
    config = BudgetConfig.from_env()
    configure_logging(config.log_path)
    return create_app(BudgetManager(config), ServerSettings.from_env())
