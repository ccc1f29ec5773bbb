"""
BudgetClient: the budget guard of a coreason-budget service, called over HTTP.

``pip install coreason-budget[client]`` (httpx only). The client has the calls,
the with-block semantics and the exceptions of
:class:`~coreason_budget.BudgetManager`, so code written against the manager
works against a shared service unchanged:

* input is validated here, with the manager's own checks, so bad input raises
  :class:`InvalidInputError` before anything is sent;
* 429 is :class:`BudgetExceededError` (with the service's scope and amounts),
  404 on a reservation :class:`UnknownReservationError`, 422 :class:`InvalidInputError`
  (or :class:`UnknownModelError`), and everything that means "the service could
  not say yes" -- 503, 5xx, a timeout, a refused connection, an answer that is not
  the service's -- :class:`BudgetUnavailableError`: fail closed;
* 401/403 (a missing, wrong or non-admin API key) are plain :class:`BudgetError`,
  so ``except BudgetError`` still refuses the call, with a message that names
  the key as the cause.

Every request is safe to repeat, so transport failures are retried a few times:
reservation ids and idempotency keys are generated here, before the first
attempt, so a retry finds the hold (or the recorded spend) the lost attempt made.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal, NoReturn, cast, get_args
from urllib.parse import quote, urlsplit

import httpx

from ._http_deadline import DeadlineTransport, attempt_deadline
from ._ledger import STATES
from ._manager import ScopeName
from ._money import MAX_LIMIT_NANO, check_id, nano_to_usd, new_id, to_nano
from ._pricing import _check_tokens
from ._receipt import Kind, Receipt, Status
from ._reservation import OnError, SettlesOnExit
from ._usage import ModelSpend, Report, ScopeUsage
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

__all__ = ["BudgetClient", "RemoteReservation"]

log = logging.getLogger("coreason_budget")


#: The service's bound on token counts (a larger count is a bug, not usage).
MAX_TOKENS = 100_000_000
#: The service's bound on report lengths; ``report(top=None)`` asks for this many.
MAX_REPORT_TOP = 1000

# A 422 names its error class when the service sends one ("error"); these may be
# rebuilt from a name alone. Any other name falls back to the status code.
_NAMED_ERRORS: dict[str, type[BudgetError]] = {
    cls.__name__: cls
    for cls in (InvalidInputError, UnknownModelError, UnknownReservationError, ConfigError)
}


class BudgetClient:
    """
    A :class:`~coreason_budget.BudgetManager` lookalike backed by the HTTP service.

    Thread-safe: one client (one pooled ``httpx.Client``) per process is enough.
    Timeouts are short on purpose, as the manager's are: a guard that hangs
    stalls every LLM call behind it. A dead service fails a call within about
    ``(retries + 1) * timeout`` seconds, and sooner when the connection is refused.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        timeout: float = 2.0,
        retries: int = 2,
        pool_size: int = 32,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        """
        *api_key* is sent as a bearer token; None only for a service run with
        ``--insecure-no-auth``. *transport* replaces httpx's network transport
        (for tests, or a custom TLS setup); each attempt's *timeout* then bounds
        only its individual reads and writes, as in httpx.
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not (isinstance(timeout, int | float) and 0 < timeout <= 3600):
            raise ConfigError(f"timeout must be a number of seconds above 0, got {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 10:
            raise ConfigError(f"retries must be a whole number from 0 to 10, got {retries!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"pool_size must be a whole number above 0, got {pool_size!r}")
        if api_key is not None and not (
            isinstance(api_key, str) and api_key and api_key.isascii() and api_key.isprintable()
        ):
            # Checked here: a key that cannot go in a header would fail every call instead.
            raise ConfigError(
                "api_key must be non-empty printable ASCII text, or None for an insecure server"
            )
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.timeout = float(timeout)
        headers = {"Accept": "application/json"}
        if api_key is not None:
            headers["Authorization"] = f"Bearer {api_key}"
        limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        if transport is None:
            # httpx's timeouts bound each read, not a request: a peer trickling a byte at a
            # time would hold the call for ever. This transport ends each attempt by its
            # deadline (see _send), however slowly the peer answers.
            transport = DeadlineTransport(self.base_url, limits)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=limits,
            transport=transport,
            # A redirect would be somebody else's answer; never follow one with our key.
            follow_redirects=False,
        )

    # -- the guard ------------------------------------------------------------

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None:
        """Raise :class:`BudgetExceededError` if *estimated_cost* does not fit today (read-only)."""
        amount = to_nano(estimated_cost, "estimated_cost")
        body = _scope_body(user_id, project_id, None)
        body["estimated_cost"] = nano_to_usd(amount)
        self._call("POST", "/check", body, expect="allowed")

    def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        idempotency_key: str | None = None,
    ) -> Receipt:
        """
        Record money already spent, in every scope, even past a limit.

        Without an *idempotency_key* one is generated per call, so the retry
        of a request whose answer was lost records the spend once. The receipt
        says what the service did, as :meth:`BudgetManager.record_spend`'s does
        ("spooled": the service saved it and records it once its store is back).
        """
        amount = to_nano(cost, "cost")
        body = _scope_body(user_id, project_id, model)
        body["cost"] = nano_to_usd(amount)
        key = new_id() if idempotency_key is None else check_id(idempotency_key, "idempotency_key")
        body["idempotency_key"] = key
        answer = self._call("POST", "/spend", body, ids={"idempotency_key": key})
        return _answer_receipt("POST /spend", answer, "spend", key)

    def reserve(
        self,
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        *,
        on_error: OnError = "charge",
        reservation_id: str | None = None,
    ) -> RemoteReservation:
        """
        Hold *estimate* in every applicable scope, atomically, or raise.

        The id is chosen here (unless given) before the first attempt, so a
        retry after a lost answer returns the hold that attempt took instead of
        taking a second one.
        """
        if on_error not in ("charge", "release"):
            raise InvalidInputError(f"on_error must be 'charge' or 'release', got {on_error!r}")
        amount = to_nano(estimate, "estimate")
        body = _scope_body(user_id, project_id, model)
        body["estimate"] = nano_to_usd(amount)
        rid = new_id() if reservation_id is None else check_id(reservation_id, "reservation_id")
        body["reservation_id"] = rid
        try:
            answer = self._call("POST", "/reservations", body, ids={"reservation_id": rid})
            return self._handle(
                "POST /reservations", answer, rid, user_id, project_id, model, on_error
            )
        except BudgetUnavailableError as e:
            self._undo_reserve(e, rid, _scope_body(user_id, project_id, model))
            raise

    def _undo_reserve(self, error: BudgetUnavailableError, rid: str, hold: dict[str, Any]) -> None:
        """
        A reserve whose answer was lost may have taken its hold, which nobody
        would ever settle: release it by id, in the background (the caller's
        error is not delayed), unless the request provably never left (a
        refused connection). The release names the hold (with a day), as a
        commit does, so that it also settles a reserve still on its way.
        """
        if isinstance(error.__cause__, httpx.ConnectError):
            return
        path = f"{_reservation_path(rid)}/release"
        # With a day, the service settles the id even when the store has no such hold
        # yet (the reserve still on its way) or cannot be asked now: it leaves a
        # tombstone, or spools the release, so that a reserve landing later holds nothing.
        # The record's own day wins when it exists; this one only dates a tombstone.
        hold = {**hold, "day": datetime.datetime.now(datetime.UTC).date().isoformat()}

        def release() -> None:
            try:
                self._call("POST", path, hold)
            except UnknownReservationError:
                pass  # it never took a hold
            except BudgetError as e:
                log.warning("Could not release reservation %s (its reserve failed): %s", rid, e)

        threading.Thread(target=release, name="coreason-budget-undo", daemon=True).start()
        error.add_note(
            f"Reservation {rid!r} is being released in case the service took it before failing; "
            "reserving again needs a new reservation_id."
        )

    def reservation(self, reservation_id: str) -> RemoteReservation:
        """
        The handle of an existing reservation, by id (taken by any client or worker).

        Raises :class:`UnknownReservationError` when the service has no such reservation.
        """
        rid = check_id(reservation_id, "reservation_id")
        answer = self._call("GET", _reservation_path(rid), ids={"reservation_id": rid})
        return self._handle(
            "GET /reservations/{id}",
            answer,
            rid,
            _answer_str(answer, "user_id"),
            _answer_opt_str(answer, "project_id"),
            _answer_opt_str(answer, "model"),
            "charge",
        )

    def _handle(
        self,
        what: str,
        answer: dict[str, Any],
        rid: str,
        user_id: str,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
    ) -> RemoteReservation:
        """The handle the service's answer about *rid* describes; any other answer fails closed."""
        if answer.get("reservation_id") != rid:
            _unexpected(what, answer)
        return RemoteReservation(
            self,
            rid,
            estimate_nano=_answer_nano(answer, "estimate_usd"),
            state=_answer_state(answer),
            user_id=user_id,
            project_id=project_id,
            model=model,
            on_error=on_error,
            day=_answer_day(answer),
        )

    # -- reporting and administration -------------------------------------------

    def usage(self, user_id: str, project_id: str | None = None) -> dict[str, ScopeUsage]:
        """Today's spent, limit and remaining per scope: "user", "project" (if given), "global"."""
        uid = check_id(user_id, "user_id")
        params = {} if project_id is None else {"project_id": check_id(project_id, "project_id")}
        answer = self._call("GET", "/usage/" + _path_part(uid), params=params)
        try:
            return {scope: _scope_usage(scope, u) for scope, u in answer.items()}
        except (KeyError, TypeError, ValueError):
            _unexpected("GET /usage", answer)

    def report(self, top: int | None = None) -> Report:
        """
        Today's spend: the organisation's total, then users, projects and models.

        The service lists at most 1000 of each, so ``top=None`` means 1000.
        """
        if top is not None and (
            isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_REPORT_TOP
        ):
            raise InvalidInputError(f"top must be a whole number from 1 to 1000, got {top!r}")
        answer = self._call("GET", "/report", params={"top": top or MAX_REPORT_TOP})
        try:
            return Report(
                day=datetime.date.fromisoformat(answer["day"]),
                total=_scope_usage("global", answer["total"]),
                users=tuple(_scope_usage("user", u) for u in answer["users"]),
                projects=tuple(_scope_usage("project", p) for p in answer["projects"]),
                models=tuple(
                    ModelSpend(
                        m["model"],
                        # Older services send only the float; its nearest nano is exact here.
                        _int(m["spent_nano"])
                        if "spent_nano" in m
                        else to_nano(float(m["spent_usd"])),
                    )
                    for m in answer["models"]
                ),
            )
        except (KeyError, TypeError, ValueError, InvalidInputError):
            _unexpected("GET /report", answer)

    def set_limit(
        self, scope: ScopeName, entity_id: str | None, limit_usd: float | Decimal | None
    ) -> None:
        """
        Override the daily limit of one user or project (or the global one, with
        entity_id None); ``None`` removes the override. Needs an admin API key.
        """
        if scope == "global":
            if entity_id is not None:
                raise InvalidInputError("the global scope takes no entity id (pass None)")
        elif scope == "user":
            entity_id = check_id(entity_id, "user_id")
        elif scope == "project":
            entity_id = check_id(entity_id, "project_id")
        else:
            raise InvalidInputError(f"scope must be 'user', 'project' or 'global', got {scope!r}")
        limit = None if limit_usd is None else to_nano(limit_usd, "limit_usd", MAX_LIMIT_NANO)
        body = {
            "scope": scope,
            "entity_id": entity_id,
            "limit_usd": None if limit is None else nano_to_usd(limit),
        }
        self._call("PUT", "/limits", body, expect="updated")

    def ping(self) -> None:
        """Raise :class:`BudgetUnavailableError` unless the service and its store answer."""
        self._call("GET", "/health", expect="healthy")

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> BudgetClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<BudgetClient {self.base_url}>"

    # -- transport ---------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        expect: str | None = None,
        ids: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """
        One request, retried on transport failures, as the decoded JSON object.

        *ids*: the idempotency key or reservation id the request carries; a
        BudgetUnavailableError names them, as the manager's does, so that the
        caller's retry is safe.

        Every request the client sends may be repeated (reads, PUTs, and writes
        carrying an id), so retrying a request whose answer was lost is safe.
        With *expect*, the answer must carry that ``status``: a 200 that is not
        the service's answer (a proxy's page, say) is no "yes".
        """
        what = f"{method} {path}"
        try:
            response = self._send(method, path, body, params, what)
            try:
                answer = response.json()
            except ValueError:
                answer = None
            if not response.is_success:
                _raise_for(response.status_code, answer, response.text, what, self.base_url)
            if not isinstance(answer, dict) or (
                expect is not None and answer.get("status") != expect
            ):
                _unexpected(what, answer if answer is not None else response.text)
            return answer
        except BudgetUnavailableError as e:
            for name, value in (ids or {}).items():
                setattr(e, name, value)
            raise

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        params: dict[str, Any] | None,
        what: str,
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                # The whole attempt, body included (httpx reads it inside request()).
                with attempt_deadline(self.timeout):
                    return self._http.request(method, path, json=body, params=params)
            except httpx.TransportError as e:
                if attempt >= self.retries:
                    raise BudgetUnavailableError(
                        f"budget service at {self.base_url} did not answer {what} "
                        f"({type(e).__name__}: {e}); refusing, as if over budget"
                    ) from e
                # Short: the point is to ride out a dropped keep-alive connection
                # or a restarting worker, not to wait for an outage to end.
                time.sleep(0.05 * 2**attempt)
                attempt += 1
            except httpx.HTTPError as e:
                # An answer that cannot even be read (say, a bad content encoding): not retried.
                raise BudgetUnavailableError(
                    f"budget service at {self.base_url} gave an unreadable answer to {what} "
                    f"({type(e).__name__}: {e}); refusing, as if over budget"
                ) from e


class RemoteReservation(SettlesOnExit):
    """
    A hold taken through a :class:`BudgetClient`; behaves as :class:`~coreason_budget.Reservation`.

    Settle it once with :meth:`commit`, :meth:`commit_usage` or :meth:`release`.
    Leaving a ``with`` block unsettled charges the estimate, and so does an
    exception unless ``on_error="release"``: a failed call may still have been
    billed. When settling fails (the service is down) the hold stays in the
    store, which charges the estimate just the same, and the handle stays
    "held" so that settling can be tried again.
    """

    def __init__(
        self,
        client: BudgetClient,
        reservation_id: str,
        *,
        estimate_nano: int,
        state: str,
        user_id: str,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
        day: datetime.date,
    ) -> None:
        self._client = client
        self._lock = threading.Lock()
        self.id = reservation_id
        self.user_id = user_id
        self.project_id = project_id
        self.model = model
        self.on_error: OnError = on_error
        self.estimate_nano = estimate_nano
        #: The (UTC) day the hold was taken on, which it settles on.
        self.date = day
        #: "held", then "committed" or "released".
        self.state = state
        #: What became of the settlement's money, once settled through this handle.
        self.receipt: Receipt | None = None

    @property
    def estimate_usd(self) -> float:
        return nano_to_usd(self.estimate_nano)

    def commit(self, actual_cost: float | Decimal) -> Receipt:
        """Settle the hold to *actual_cost* (recorded in full even past a limit). Once."""
        actual = to_nano(actual_cost, "actual_cost")
        return self._settle("commit", {"actual_cost": nano_to_usd(actual)})

    def release(self) -> Receipt:
        """Give the whole hold back (the call was not made). A no-op once settled."""
        return self._settle("release", {})

    def commit_usage(
        self,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        cache_creation_input_tokens: int = 0,
    ) -> Receipt:
        """
        Commit the price of the tokens used, as the service prices the reservation's model.

        Cache reads and writes are counted within *input_tokens*, as in ``BudgetManager``.
        """
        if self.model is None:
            raise InvalidInputError("commit_usage() needs a reservation made with model=...")
        # The pricing engine's own checks (importing it does not import litellm),
        # plus the service's bound on a count.
        inp, out, cached, creation = _check_tokens(
            input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens
        )
        for what, value in (("input_tokens", inp), ("output_tokens", out)):
            if value > MAX_TOKENS:
                raise InvalidInputError(f"{what} of {value} is above the maximum of {MAX_TOKENS:,}")
        body = {"input_tokens": inp, "output_tokens": out, "cached_input_tokens": cached}
        if creation:
            # Only when used: an older service refuses a field it does not know.
            body["cache_creation_input_tokens"] = creation
        return self._settle("commit", body)

    def _settle(self, action: Literal["commit", "release"], body: dict[str, Any]) -> Receipt:
        with self._lock:
            if (settled := self._already_settled(action)) is not None:
                return settled
            # The hold as this handle knows it: should the store have lost the
            # record, the service still records the settlement once, on its day.
            body = {**body, **_scope_body(self.user_id, self.project_id, self.model)}
            body["day"] = self.date.isoformat()
            path = f"{_reservation_path(self.id)}/{action}"
            answer = self._client._call("POST", path, body, ids={"reservation_id": self.id})
            receipt = _answer_receipt(f"POST {path}", answer, action, self.id)
            self.state = _answer_state(answer)
            self.receipt = receipt
            return receipt

    def _settle_on_exit(self, release: bool) -> None:
        if release:
            self.release()
        else:
            self._settle("commit", {"actual_cost": self.estimate_usd})

    def __repr__(self) -> str:
        return (
            f"<RemoteReservation {self.id} user={self.user_id!r} project={self.project_id!r} "
            f"estimate=${self.estimate_usd} state={self.state}>"
        )


# -- request building ----------------------------------------------------------------


def _scope_body(user_id: str, project_id: str | None, model: str | None) -> dict[str, Any]:
    """The ids of a request, checked in the manager's order so the same bad input fails alike."""
    body: dict[str, Any] = {"user_id": check_id(user_id, "user_id")}
    if project_id is not None:
        body["project_id"] = check_id(project_id, "project_id")
    if model is not None:
        body["model"] = check_id(model, "model")
    return body


def _path_part(value: str) -> str:
    # quote() leaves "." alone, and a "." or ".." segment would be folded away
    # by URL normalisation, addressing another resource.
    return quote(value, safe="").replace(".", "%2E")


def _reservation_path(rid: str) -> str:
    return "/reservations/" + _path_part(rid)


# -- answer parsing ----------------------------------------------------------------


def _unexpected(what: str, answer: object) -> NoReturn:
    raise BudgetUnavailableError(
        f"budget service gave an unexpected answer to {what}: {str(answer)[:200]!r}; "
        "refusing, as if over budget"
    )


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _answer_str(answer: dict[str, Any], key: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str):
        _unexpected(key, answer)
    return value


def _answer_state(answer: dict[str, Any]) -> str:
    state = _answer_str(answer, "state")
    if state not in STATES:
        _unexpected("state", answer)
    return state


def _answer_day(answer: dict[str, Any]) -> datetime.date:
    try:
        return datetime.date.fromisoformat(_answer_str(answer, "day"))
    except ValueError:
        _unexpected("day", answer)


def _answer_receipt(what: str, answer: dict[str, Any], kind: Kind, key: str) -> Receipt:
    """The service's receipt for the write this client sent, or fail closed."""
    status = cast(Status, answer.get("status"))  # checked next
    if (
        status not in get_args(Status)
        or answer.get("kind") != kind
        or answer.get("idempotency_key") != key
    ):
        _unexpected(what, answer)
    try:
        amount = _int(answer.get("amount_nano"))
    except TypeError:
        _unexpected(what, answer)
    return Receipt(status, kind, key, amount)


def _answer_opt_str(answer: dict[str, Any], key: str) -> str | None:
    value = answer.get(key)
    if value is not None and not isinstance(value, str):
        _unexpected(key, answer)
    return value


def _answer_nano(answer: dict[str, Any], key: str) -> int:
    """
    A USD float of the service's as exact nano-dollars.

    The service sends the float nearest ``nano / 1e9``; for any amount the
    service accepts its shortest form has at most 15 significant digits, so
    converting it back is exact.
    """
    value = answer.get(key)
    try:
        return to_nano(value if isinstance(value, float | int) else None, key)
    except InvalidInputError:
        _unexpected(key, answer)


def _scope_usage(scope: str, u: dict[str, Any]) -> ScopeUsage:
    entity = u["entity_id"]
    if entity is not None and not isinstance(entity, str):
        raise TypeError(f"entity_id must be a str, got {entity!r}")
    return ScopeUsage(scope, entity, _int(u["spent_nano"]), _int(u["limit_nano"]))


def _raise_for(status: int, answer: object, text: str, what: str, base_url: str) -> NoReturn:
    body = answer if isinstance(answer, dict) else {}
    detail = body.get("detail")
    if not isinstance(detail, str):
        detail = text[:200]
    if status == 429:
        try:
            raise BudgetExceededError(
                scope=str(body["scope"]),
                entity_id=None if body["entity_id"] is None else str(body["entity_id"]),
                limit_nano=_int(body["limit_nano"]),
                spent_nano=_int(body["spent_nano"]),
                requested_nano=_int(body["requested_nano"]),
            )
        except (KeyError, TypeError):
            # A 429 without the amounts is a rate limiter in front of the service,
            # not a budget decision: still no.
            raise BudgetUnavailableError(
                f"{what} was refused with 429 but no budget details: {detail!r}"
            ) from None
    if status == 422:
        named = _NAMED_ERRORS.get(str(body.get("error")), InvalidInputError)
        raise named(detail)
    if status == 404 and what.split(" ", 1)[1].startswith("/reservations/"):
        raise UnknownReservationError(detail)
    if status == 409:
        raise IdempotencyConflictError(detail)
    if status == 413:  # the service's bound on a request: bad input, never "unavailable"
        raise InvalidInputError(detail)
    if status in (401, 403):
        raise BudgetError(
            f"budget service at {base_url} refused the API key for {what} ({status}: {detail})"
        )
    raise BudgetUnavailableError(
        f"budget service at {base_url} answered {what} with {status}: {detail!r}; "
        "refusing, as if over budget"
    )
