"""
The HTTP client's logic, once, for BudgetClient and AsyncBudgetClient.

:class:`ClientCore` validates input with the manager's own checks, makes ids
and idempotency keys before the first attempt, builds each request, decides
what is retried and what is undone, and reads the service's answers into the
manager's values and exceptions. Every method returns the steps of one
operation (see :mod:`._steps`): a :class:`Request` is sent back the service's
:class:`Answer` (a transport failure is thrown in instead), a :class:`Wait`
is a pause between attempts. The drivers in :mod:`.client` only send one
attempt (bounded by its deadline) and wait, with blocking calls or awaits.

It is also the :class:`~._reservation.HoldOps` of a client's handles: their
commits and releases are requests to the service, naming the hold as the
handle knows it.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NamedTuple, NoReturn, cast, get_args
from urllib.parse import quote, urlsplit

import httpx

from ._budget import H, ScopeName
from ._ledger import MAX_AT, STATES, Held, at_ms
from ._money import MAX_LIMIT_NANO, check_id, nano_to_usd, new_id, to_nano
from ._receipt import Kind, Receipt, Status
from ._reservation import Hold, OnError
from ._steps import Detach, Steps
from ._usage import MAX_REPORT_TOP, Report, ScopeUsage, check_period, check_top, check_window
from ._windows import WINDOWS
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

log = logging.getLogger("coreason_budget")

#: The service's bound on token counts (a larger count is a bug, not usage).
MAX_TOKENS = 100_000_000

# A 422 names its error class when the service sends one ("error"); these may be
# rebuilt from a name alone. Any other name falls back to the status code.
_NAMED_ERRORS: dict[str, type[BudgetError]] = {
    cls.__name__: cls
    for cls in (InvalidInputError, UnknownModelError, UnknownReservationError, ConfigError)
}


class Request(NamedTuple):
    """One attempt of a request: sent back its :class:`Answer`, or its transport error thrown in."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    params: dict[str, Any] | None = None


class Answer(NamedTuple):
    """What the service answered: the status, the body's JSON (None if it is none) and text."""

    status: int
    data: object
    text: str

    @classmethod
    def of(cls, response: httpx.Response) -> Answer:
        """The answer in a read *response* (as both drivers' requests return it)."""
        try:
            data = response.json()
        except ValueError:
            data = None
        return cls(response.status_code, data, response.text)


class Wait(NamedTuple):
    """A pause before the next attempt (a blocking sleep, or an awaited one)."""

    seconds: float


class ClientCore:
    """Everything a client decides, as steps; one per client."""

    def __init__(
        self, base_url: str, api_key: str | None, timeout: float, retries: int, pool_size: int
    ) -> None:
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
        self.limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
        self._headers = {"Accept": "application/json"}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def http_options(self) -> dict[str, Any]:
        """The arguments of the ``httpx.Client`` (or ``AsyncClient``), but its transport."""
        return {
            "base_url": self.base_url,
            "headers": self._headers,
            "timeout": httpx.Timeout(self.timeout),
            "limits": self.limits,
            # A redirect would be somebody else's answer; never follow one with our key.
            "follow_redirects": False,
        }

    def call_bound(self) -> float:
        """About the longest one call can take: every attempt's timeout and the pauses."""
        pauses = 0.05 * (2.0**self.retries - 1)  # 0.05 * 2**n before retry n + 1
        return (self.retries + 1) * self.timeout + pauses + 1.0

    # -- the guard ------------------------------------------------------------

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None
    ) -> Steps[None]:
        amount = to_nano(estimated_cost, "estimated_cost")
        body = _scope_body(user_id, project_id, None)
        body["estimated_cost"] = nano_to_usd(amount)
        yield from self.call(Request("POST", "/check", body), expect="allowed")

    def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None,
        model: str | None,
        idempotency_key: str | None,
    ) -> Steps[Receipt]:
        amount = to_nano(cost, "cost")
        body = _scope_body(user_id, project_id, model)
        body["cost"] = nano_to_usd(amount)
        key = new_id() if idempotency_key is None else check_id(idempotency_key, "idempotency_key")
        body["idempotency_key"] = key
        answer = yield from self.call(Request("POST", "/spend", body), ids={"idempotency_key": key})
        return _answer_receipt("POST /spend", answer, "spend", key)

    def reserve(
        self,
        make: Callable[..., H],
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
        reservation_id: str | None,
    ) -> Steps[H]:
        """
        The id is chosen here (unless given) before the first attempt, so a
        retry after a lost answer returns the hold that attempt took instead of
        taking a second one.
        """
        if on_error not in ("charge", "release"):
            raise InvalidInputError(f"on_error must be 'charge' or 'release', got {on_error!r}")
        amount = to_nano(estimate, "estimate")
        ids = _scope_body(user_id, project_id, model)
        rid = new_id() if reservation_id is None else check_id(reservation_id, "reservation_id")
        # Should the hold need undoing: with a held_at, the service settles the id even
        # when the store has no such hold yet (the reserve still on its way) or cannot be
        # asked now. The record's own moment wins when it exists; this one only dates a
        # tombstone that keeps a reserve landing later from holding anything.
        hold = {**ids, "held_at": _iso(datetime.datetime.now(datetime.UTC))}
        body = {**ids, "estimate": nano_to_usd(amount), "reservation_id": rid}
        request = Request("POST", "/reservations", body)
        failures: list[Exception] = []
        try:
            answer = yield from self.call(request, ids={"reservation_id": rid}, failures=failures)
        except BudgetUnavailableError as e:
            # Unless every attempt was refused at connect (nothing ever left), the
            # service may hold it: nobody would ever settle that hold.
            if len(failures) <= self.retries or not all(
                isinstance(f, httpx.ConnectError) for f in failures
            ):
                yield from self._undo_reserve(e, rid, hold)
            raise
        except (Exception, GeneratorExit):  # the service's answers: nothing is held
            raise
        except BaseException as e:
            # Interrupted (KeyboardInterrupt; the loop cancelling a task) with the
            # request maybe sent: as unknown as a lost answer, so undone the same way.
            lost = BudgetUnavailableError(f"reserve interrupted ({type(e).__name__})")
            yield from self._undo_reserve(lost, rid, hold)
            e.add_note("".join(getattr(lost, "__notes__", [])))
            raise
        return self._handle(
            make, "POST /reservations", answer, rid, user_id, project_id, model, on_error
        )

    def _undo_reserve(
        self, error: BudgetUnavailableError, rid: str, hold: dict[str, Any]
    ) -> Steps[None]:
        """Release *rid* in the background: the caller's error is not delayed."""
        error.reservation_id = rid
        error.add_note(
            f"Reservation {rid!r} is being released in case the service took it before failing; "
            "reserving again needs a new reservation_id."
        )
        yield Detach(self.release_quietly(rid, hold), "coreason-budget-undo")

    def release_quietly(self, rid: str, hold: dict[str, Any]) -> Steps[None]:
        """Release a hold nobody will settle (its reserve's answer was lost, or its taker left)."""
        try:
            yield from self.call(Request("POST", f"{_reservation_path(rid)}/release", hold))
        except UnknownReservationError:
            pass  # it never took a hold
        except BudgetError as e:
            log.warning("Could not release reservation %s (nobody will settle it): %s", rid, e)

    def reservation(self, make: Callable[..., H], reservation_id: str) -> Steps[H]:
        rid = check_id(reservation_id, "reservation_id")
        answer = yield from self.call(
            Request("GET", _reservation_path(rid)), ids={"reservation_id": rid}
        )
        return self._handle(
            make,
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
        make: Callable[..., H],
        what: str,
        answer: dict[str, Any],
        rid: str,
        user_id: str,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
    ) -> H:
        """The handle the service's answer about *rid* describes; any other answer fails closed."""
        if answer.get("reservation_id") != rid:
            _unexpected(what, answer)
        held = Held(
            state=_answer_state(answer),
            at=_answer_held_at(answer),
            held_nano=_answer_nano(answer, "estimate_usd"),
        )
        return make(
            rid, held, user_id=user_id, project_id=project_id, model=model, on_error=on_error
        )

    # -- settling a hold (HoldOps) ----------------------------------------------

    def settle(self, hold: Hold[Any], actual: int, state: str) -> Steps[Receipt]:
        """Commit *hold* to *actual* nano-dollars, or release it; once."""
        if state == "committed":
            return self._settle(hold, "commit", {"actual_cost": nano_to_usd(actual)})
        return self._settle(hold, "release", {})

    def settle_usage(self, hold: Hold[Any], tokens: tuple[int, int, int, int]) -> Steps[Receipt]:
        """Commit the tokens used (checked by the handle), as the service prices its model."""
        inp, out, cached, creation = tokens
        for what, value in (("input_tokens", inp), ("output_tokens", out)):
            if value > MAX_TOKENS:
                raise InvalidInputError(f"{what} of {value} is above the maximum of {MAX_TOKENS:,}")
        body = {"input_tokens": inp, "output_tokens": out, "cached_input_tokens": cached}
        if creation:
            # Only when used: an older service refuses a field it does not know.
            body["cache_creation_input_tokens"] = creation
        return self._settle(hold, "commit", body)

    def _settle(self, hold: Hold[Any], kind: Kind, body: dict[str, Any]) -> Steps[Receipt]:
        if (settled := hold.already_settled(kind)) is not None:
            return settled
        # The hold as this handle knows it: should the store have lost the
        # record, the service still records the settlement once, in the periods
        # of the moment it was taken.
        path = f"{_reservation_path(hold.id)}/{kind}"
        answer = yield from self.call(
            Request("POST", path, {**body, **_hold_body(hold)}), ids={"reservation_id": hold.id}
        )
        receipt = _answer_receipt(f"POST {path}", answer, kind, hold.id)
        hold.state = _answer_state(answer)
        hold.receipt = receipt
        return receipt

    # -- reporting and administration -------------------------------------------

    def usage(
        self, user_id: str, project_id: str | None, window: str = "day"
    ) -> Steps[dict[str, ScopeUsage]]:
        window = check_window(window)  # first, as the manager checks it
        uid = check_id(user_id, "user_id")
        params = {} if project_id is None else {"project_id": check_id(project_id, "project_id")}
        params["window"] = window
        answer = yield from self.call(Request("GET", "/usage/" + _path_part(uid), params=params))
        # Exactly the scopes asked about, each in the window asked about.
        scopes = ["user", *([] if project_id is None else ["project"]), "global"]
        if sorted(answer) != sorted(scopes):
            _unexpected("GET /usage", answer)
        try:
            return {scope: _scope_usage(scope, answer[scope], window) for scope in scopes}
        except (KeyError, TypeError, ValueError):
            _unexpected("GET /usage", answer)

    def report(
        self,
        top: int | None,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Steps[Report]:
        top = check_top(top)
        params: dict[str, Any] = {"top": MAX_REPORT_TOP if top is None else top}
        params["window"] = window = check_window(window)
        if period is not None:
            params["period"] = _period_param(period)
        answer = yield from self.call(Request("GET", "/report", params=params))
        try:
            if answer["window"] != window or not isinstance(answer["period"], str):
                raise ValueError("not a report of the window asked about")
            rows = {
                scope: tuple(_scope_usage(scope, u, window) for u in _list(answer[key]))
                for scope, key in (("user", "users"), ("project", "projects"), ("model", "models"))
            }
            return Report(
                window=window,
                period=answer["period"],
                starts_at=_moment(answer["starts_at"]),
                resets_at=_moment(answer["resets_at"]),
                total=_scope_usage("global", answer["total"], window),
                users=rows["user"],
                projects=rows["project"],
                models=rows["model"],
            )
        except (KeyError, TypeError, ValueError):
            _unexpected("GET /report", answer)

    def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> Steps[None]:
        # In the manager's order, with its messages: the scope, the window, the limit.
        if scope == "global":
            if entity_id is not None:
                raise InvalidInputError("the global scope takes no entity id (pass None)")
        elif scope in ("user", "project"):
            entity_id = check_id(entity_id, f"{scope}_id")
        elif scope == "model":
            entity_id = check_id(entity_id, "model")
        else:
            raise InvalidInputError(
                f"scope must be 'user', 'project', 'model' or 'global', got {scope!r}"
            )
        window = check_window(window)
        limit = None if limit_usd is None else to_nano(limit_usd, "limit_usd", MAX_LIMIT_NANO)
        # Exact: a float cannot hold every nano-precise limit above $1M.
        body: dict[str, Any] = {"scope": scope, "entity_id": entity_id, "limit_nano": limit}
        if window != "day":
            # Only when not the default: an older service refuses a field it does not know
            # (and so refuses, rather than misapplies, a limit of another window).
            body["window"] = window
        yield from self.call(Request("PUT", "/limits", body), expect="updated")

    def ping(self) -> Steps[None]:
        yield from self.call(Request("GET", "/health"), expect="healthy")

    # -- one request ---------------------------------------------------------------

    def call(
        self,
        request: Request,
        *,
        expect: str | None = None,
        ids: dict[str, str] | None = None,
        failures: list[Exception] | None = None,
    ) -> Steps[dict[str, Any]]:
        """
        One request, retried on transport failures, as the decoded JSON object.

        *ids*: the idempotency key or reservation id the request carries; a
        BudgetUnavailableError names them, as the manager's does, so that the
        caller's retry is safe. *failures* collects each failed attempt's error.

        With *expect*, the answer must carry that ``status``: a 200 that is not
        the service's answer (a proxy's page, say) is no "yes".
        """
        what = f"{request.method} {request.path}"
        try:
            answer = yield from self._attempts(request, what, [] if failures is None else failures)
            if not 200 <= answer.status < 300:
                _raise_for(answer.status, answer.data, answer.text, what, self.base_url)
            data = answer.data
            if not isinstance(data, dict) or (expect is not None and data.get("status") != expect):
                _unexpected(what, data if data is not None else answer.text)
            return data
        except BudgetUnavailableError as e:
            for name, value in (ids or {}).items():
                setattr(e, name, value)
            raise

    def _attempts(self, request: Request, what: str, failures: list[Exception]) -> Steps[Answer]:
        """
        Send *request* until it is answered, at most ``retries + 1`` times.

        Every request the client sends may be repeated (reads, PUTs, and writes
        carrying an id), so retrying one whose answer was lost is safe.
        """
        while True:
            try:
                answer: Answer = yield request
                return answer
            except httpx.TransportError as e:
                failures.append(e)
                if len(failures) > self.retries:
                    raise BudgetUnavailableError(
                        f"budget service at {self.base_url} did not answer {what} "
                        f"({type(e).__name__}: {e}); refusing, as if over budget"
                    ) from e
            except httpx.HTTPError as e:
                # An answer that cannot even be read (say, a bad content encoding): not retried.
                failures.append(e)
                raise BudgetUnavailableError(
                    f"budget service at {self.base_url} gave an unreadable answer to {what} "
                    f"({type(e).__name__}: {e}); refusing, as if over budget"
                ) from e
            except Exception as e:
                # The HTTP library itself failing (its own bugs, a closed event loop): the
                # service could not say yes. Not retried: it may fail the same way again.
                failures.append(e)
                raise BudgetUnavailableError(
                    f"budget service at {self.base_url} could not be asked {what}: its HTTP "
                    f"client failed ({type(e).__name__}: {e}); refusing, as if over budget"
                ) from e
            # Short: the point is to ride out a dropped keep-alive connection or a
            # restarting worker, not to wait for an outage to end.
            yield Wait(0.05 * 2 ** (len(failures) - 1))


# -- request building ----------------------------------------------------------------


def _scope_body(user_id: str, project_id: str | None, model: str | None) -> dict[str, Any]:
    """The ids of a request, checked in the manager's order so the same bad input fails alike."""
    body: dict[str, Any] = {"user_id": check_id(user_id, "user_id")}
    if project_id is not None:
        body["project_id"] = check_id(project_id, "project_id")
    if model is not None:
        body["model"] = check_id(model, "model")
    return body


def _hold_body(hold: Hold[Any]) -> dict[str, Any]:
    """A hold as its handle knows it: whose, and when it was taken (its periods)."""
    ids = _scope_body(hold.user_id, hold.project_id, hold.model)
    return {**ids, "held_at": _iso(hold.held_at)}


def _iso(moment: datetime.datetime) -> str:
    """An instant as the service reads one: ISO 8601 in UTC, to the millisecond."""
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds")


def _period_param(period: object) -> str:
    """A report's *period*, checked as the manager checks it: a date, or an aware datetime."""
    return check_period(period).isoformat()


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


def _answer_held_at(answer: dict[str, Any]) -> int:
    """When the hold was taken, as ms since the epoch (what a handle keeps)."""
    try:
        at = at_ms(_moment(answer.get("held_at")))
    except (TypeError, ValueError):  # InvalidInputError is a ValueError too
        _unexpected("held_at", answer)
    if not 0 <= at <= MAX_AT:
        _unexpected("held_at", answer)
    return at


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


def _moment(value: object) -> datetime.datetime:
    """An instant the service sent (ISO 8601, with its offset), as an aware UTC datetime."""
    if not isinstance(value, str):
        raise TypeError(f"expected an ISO 8601 datetime, got {value!r}")
    moment = datetime.datetime.fromisoformat(value)
    if moment.utcoffset() is None:
        raise ValueError(f"expected a datetime with its UTC offset, got {value!r}")
    try:
        return moment.astimezone(datetime.UTC)
    except OverflowError as e:  # "9999-12-31T23:00-05:00": past the last UTC datetime
        raise ValueError(f"not a datetime in range: {value!r}") from e


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {value!r}")
    return value


def _scope_usage(scope: str, u: dict[str, Any], window: str) -> ScopeUsage:
    """One scope's usage in *window* (the one asked about: any other is not the answer)."""
    entity = u["entity_id"]
    if (entity is None) != (scope == "global") or not (entity is None or isinstance(entity, str)):
        raise TypeError(f"not an entity_id of a {scope}: {entity!r}")
    if u["window"] != window:
        raise ValueError(f"usage of the {u['window']!r} window, not of {window!r}")
    limit = u["limit_nano"]
    return ScopeUsage(
        scope,
        entity,
        _int(u["spent_nano"]),
        None if limit is None else _int(limit),
        window,
        _moment(u["resets_at"]),
    )


def _exceeded(body: dict[str, Any]) -> BudgetExceededError:
    """
    A 429's refusal: exactly what :meth:`BudgetExceededError.to_json` gives
    (which scope, the amounts, the window, and when it resets), else TypeError,
    KeyError or ValueError.
    """
    scope, entity, window = body["scope"], body["entity_id"], body["window"]
    if not isinstance(scope, str) or not (entity is None or isinstance(entity, str)):
        raise TypeError(f"not a scope: {scope!r} {entity!r}")
    if window not in WINDOWS:
        raise ValueError(f"not a window: {window!r}")
    resets_at, retry_after = body["resets_at"], body["retry_after_seconds"]
    if retry_after is not None and _int(retry_after) < 1:
        raise ValueError(f"retry_after_seconds must be at least 1, got {retry_after!r}")
    return BudgetExceededError(
        scope=scope,
        entity_id=entity,
        limit_nano=_int(body["limit_nano"]),
        spent_nano=_int(body["spent_nano"]),
        requested_nano=_int(body["requested_nano"]),
        window=window,
        resets_at=None if resets_at is None else _moment(resets_at),
        retry_after_seconds=retry_after,
    )


def _raise_for(status: int, answer: object, text: str, what: str, base_url: str) -> NoReturn:
    body = answer if isinstance(answer, dict) else {}
    detail = body.get("detail")
    if not isinstance(detail, str):
        detail = text[:200]
    if status == 429:
        try:
            exceeded = _exceeded(body)
        except (KeyError, TypeError, ValueError):
            # A 429 without the budget's details (all of them, well formed) is a rate
            # limiter in front of the service, or a service gone wrong; not a budget
            # decision to report, but still no.
            raise BudgetUnavailableError(
                f"{what} was refused with 429 but no budget details: {detail!r}; "
                "refusing, as if over budget"
            ) from None
        raise exceeded
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
