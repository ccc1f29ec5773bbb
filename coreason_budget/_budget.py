"""
The budget's logic, once, for the sync and the async manager.

:class:`BudgetCore` validates input, turns it into scopes and nano-dollars,
calls the ledger, decides what is spooled and what is undone, and builds the
answers; every method returns the steps of one operation (see
:mod:`._steps`), which the manager's driver runs with blocking calls or with
awaits. The faces (:class:`BudgetManager`, :class:`AsyncBudgetManager`) are
thin: a signature, a docstring, and the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from ._config import SCOPE_KINDS, BudgetConfig
from ._ledger import (
    MAX_AT,
    NO_SCOPES,
    UNLIMITED,
    Held,
    Ledger,
    Scopes,
    at_ms,
    describe,
    field,
    instant,
)
from ._money import MAX_LIMIT_NANO, check_id, new_id, to_nano
from ._receipt import Kind, Receipt, Status
from ._replay import SpoolKeeper
from ._reservation import Hold, OnError
from ._steps import Blocking, Detach, Steps
from ._usage import Report, ScopeUsage, check_period, check_top, check_window
from ._windows import Period
from .exceptions import (
    BudgetError,
    BudgetUnavailableError,
    InvalidInputError,
    UnknownReservationError,
)

if TYPE_CHECKING:
    from ._pricing import PricingEngine

log = logging.getLogger("coreason_budget")

ScopeName = Literal["user", "project", "model", "global"]
H = TypeVar("H", bound=Hold[Any])
#: Makes a face's reservation handle: (reservation id, what is held, ids, on_error).
MakeHandle = Callable[..., H]


class BudgetCore:
    """Everything a manager decides, as steps; one per manager."""

    def __init__(self, config: BudgetConfig, clock: Callable[[], float] | None) -> None:
        self.config = config
        self.ledger = Ledger(
            prefix=config.key_prefix,
            retention_seconds=config.retention_seconds,
            idempotency_ttl_seconds=config.idempotency_ttl_seconds,
            calendar=config.calendar(),
            windows=config.kept_windows(),
            record_buckets=config.record_buckets,
            clock=clock,
        )
        #: Default limits: scope kind -> one per kept window (UNLIMITED: none).
        self._limits = {
            kind: tuple(
                UNLIMITED if (limit := config.limit_nano(kind, w)) is None else limit
                for w in self.ledger.windows
            )
            for kind in SCOPE_KINDS
        }
        self._scopes_seen: dict[tuple[str, str | None, str | None], Scopes] = {}
        self._pricing: PricingEngine | None = None
        self._pricing_lock = threading.Lock()
        if config.pricing_file is not None:
            # A malformed price file must stop start-up, not the first priced call;
            # reading it is cheap and does not import litellm.
            self._pricing = self._new_pricing()
        self.keeper = SpoolKeeper(config, self.ledger)
        # After any call the store answers, the spool (if it holds anything) replays.
        self.ledger.on_reached = self.keeper.replay_if_due

    # -- pricing ---------------------------------------------------------------

    def pricing(self) -> PricingEngine:
        """Model prices (litellm's table plus overrides); made on first use."""
        if self._pricing is None:
            with self._pricing_lock:
                if self._pricing is None:
                    self._pricing = self._new_pricing()
        return self._pricing

    def _new_pricing(self) -> PricingEngine:
        from ._pricing import PricingEngine

        return PricingEngine(self.config.pricing_file)

    def _price(self, model: str, tokens: tuple[int, int, int, int]) -> Steps[Decimal]:
        """
        A price. Until litellm's table is loaded, priced as a Blocking step (in a
        worker thread, for async): it may import litellm, for seconds, unless
        the model has a price of its own.
        """
        engine = self.pricing()
        if engine.loaded():
            return engine.calculate(model, *tokens)
        cost: Decimal = yield Blocking(functools.partial(engine.calculate, model, *tokens))
        return cost

    # -- the guard ---------------------------------------------------------------

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None
    ) -> Steps[None]:
        amount = to_nano(estimated_cost, "estimated_cost")
        yield from self.ledger.check(self.scopes(user_id, project_id, None), amount)

    def record_spend(
        self,
        user_id: str,
        cost: float | Decimal,
        project_id: str | None,
        model: str | None,
        idempotency_key: str | None,
    ) -> Steps[Receipt]:
        amount = to_nano(cost, "cost")
        scopes = self.scopes(user_id, project_id, model)
        op = new_id() if idempotency_key is None else check_id(idempotency_key, "idempotency_key")
        at = self.ledger.now()  # when this spend is made, should it be spooled
        status: Status
        try:
            status = yield from self.ledger.spend(scopes, amount, op)
        except BudgetUnavailableError as e:
            e.idempotency_key = op
            yield Blocking(functools.partial(self.keeper.keep, e, "spend", op, at, scopes, amount))
            return Receipt("spooled", "spend", op, amount)
        return Receipt(status, "spend", op, 0 if status == "duplicate" else amount)

    def reserve(
        self,
        make: MakeHandle[H],
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None,
        model: str | None,
        on_error: OnError,
        reservation_id: str | None,
    ) -> Steps[H]:
        if on_error not in ("charge", "release"):
            raise InvalidInputError(f"on_error must be 'charge' or 'release', got {on_error!r}")
        amount = to_nano(estimate, "estimate")
        scopes = self.scopes(user_id, project_id, model)
        rid = new_id() if reservation_id is None else check_id(reservation_id, "reservation_id")
        try:
            held = yield from self.ledger.reserve(scopes, amount, rid)
        except BudgetUnavailableError as e:
            yield from self._undo_reserve(e, scopes, rid)
            raise
        except (Exception, GeneratorExit):  # the ledger's answers (nothing written); closed
            raise
        except BaseException as e:
            # Interrupted (KeyboardInterrupt, a gevent-style timeout, a cancelled
            # task) after the script may have run: as unknown as a lost reply, so
            # undone the same way, except that a cancelled task's store is well:
            # released at once, in the background, not through the spool.
            lost = BudgetUnavailableError(f"reserve interrupted ({type(e).__name__})")
            with contextlib.suppress(BudgetError):
                yield from self._undo_reserve(
                    lost, scopes, rid, spool=not isinstance(e, asyncio.CancelledError)
                )
            e.add_note("".join(getattr(lost, "__notes__", [])))
            raise
        return make(
            rid, held, user_id=user_id, project_id=project_id, model=model, on_error=on_error
        )

    def _undo_reserve(
        self,
        error: BudgetUnavailableError,
        scopes: Scopes,
        rid: str,
        *,
        spool: bool = True,
    ) -> Steps[None]:
        """
        A reserve that failed may still have taken its hold (only the reply was
        lost); nobody would ever settle it. Release it by id: through the spool
        if *spool* (the store just failed us; the release lands with the next
        call that reaches it), else directly, once, in the background (the
        caller's error must not wait for a store that just failed it). A release that
        finds no hold leaves a tombstone, so a reserve of this id arriving late
        takes nothing either. (When the hold was taken is not known: it is
        released by its record, found whenever it was taken.)
        """
        error.reservation_id = rid
        error.add_note(
            f"Reservation {rid!r} is being released in case the store took it before failing; "
            "reserving again needs a new reservation_id."
        )
        if spool:
            keep = functools.partial(
                self.keeper.keep, error, "settle", rid, None, scopes, 0, "released"
            )
            try:
                yield Blocking(keep)
                return
            except BudgetUnavailableError:  # no spool
                pass
        yield Detach(self.release_quietly(scopes, rid), "coreason-budget-undo")

    def release_quietly(self, scopes: Scopes, rid: str) -> Steps[None]:
        """Release a hold nobody will settle (its reserve failed, or its caller went away)."""
        try:
            yield from self.ledger.settle(scopes, rid, None, 0, "released")
        except BudgetError as e:
            log.warning(
                "Could not release reservation %s (nobody will settle it); if the store "
                "took it, it stays held until its day ends: %s",
                rid,
                e,
            )

    # -- settling a hold -----------------------------------------------------------

    def settle(self, hold: Hold[Any], actual: int, state: str) -> Steps[Receipt]:
        """Settle *hold* to *actual* (0 for a release), once; spooled if the store is away."""
        kind: Kind = "commit" if state == "committed" else "release"
        if (settled := hold.already_settled(kind)) is not None:
            return settled
        if hold.user_id:
            scopes, at = self.scopes(hold.user_id, hold.project_id, hold.model), hold.held_at_ms
        else:  # a handle made without asking: settled by its record alone
            scopes, at = NO_SCOPES, None
        try:
            reply = yield from self.ledger.settle(scopes, hold.id, at, actual, state)
        except BudgetUnavailableError as e:
            e.reservation_id = hold.id
            if at is None:  # nothing to spool it by: the store alone knows whose it is
                raise
            yield Blocking(
                functools.partial(self.keeper.keep, e, "settle", hold.id, at, scopes, actual, state)
            )
            hold.state = state
            hold.receipt = Receipt("spooled", kind, hold.id, actual)
            return hold.receipt
        if reply == ("GONE", "expired"):
            log.warning(
                "Reservation %s settled after its day's ledger expired; not recorded", hold.id
            )
        status = "duplicate" if reply[0] == "DONE" else _SETTLED[reply[1]]
        hold.state = reply[1] if reply[0] == "DONE" else state
        hold.receipt = Receipt(status, kind, hold.id, actual if status == "recorded" else 0)
        return hold.receipt

    def settle_usage(self, hold: Hold[Any], tokens: tuple[int, int, int, int]) -> Steps[Receipt]:
        """Commit the price of *tokens* (input, output, cache reads, cache writes)."""
        if hold.model is None:
            raise InvalidInputError("commit_usage() needs a reservation made with model=...")
        cost = yield from self._price(hold.model, tokens)
        # Through commit's checks: a price can exceed any single amount.
        receipt = yield from self.settle(hold, to_nano(cost, "actual_cost"), "committed")
        return receipt

    def reservation(
        self,
        make: MakeHandle[H],
        reservation_id: str,
        user_id: str | None,
        project_id: str | None,
        model: str | None,
        held_at: datetime.datetime | None,
        lookup: bool = True,
    ) -> Steps[H]:
        rid = check_id(reservation_id, "reservation_id")
        if not lookup:
            return self._described(make, rid, user_id, project_id, model, held_at)
        try:
            found = yield from self.ledger.lookup(rid)
        except BudgetUnavailableError as e:
            if user_id is None or held_at is None:
                e.reservation_id = rid  # as every "unavailable" about a reservation does
                raise
            found = None
        if found is None:
            if user_id is None or held_at is None:
                raise UnknownReservationError(f"no reservation {rid!r} (never made, or expired)")
            # Lost by the store (or it cannot be asked now): the hold as the caller knows it.
            return self._handle(make, rid, user_id, project_id, model, held_at, known=True)
        held, fields = found
        if not fields and held.state != "held":
            # Settled and folded away: it holds nothing, and its scopes are gone with its
            # amounts; settling this handle answers "duplicate".
            return make(rid, held, user_id="", project_id=None, model=None, on_error="charge")
        try:
            ids = dict(describe(f) for f in fields)
        except ValueError:
            ids = {}
        user_id, project_id, model = ids.get("user"), ids.get("project"), ids.get("model")
        if user_id is None:
            raise UnknownReservationError(f"reservation {rid!r} names no user (not ours?)")
        self.scopes(user_id, project_id, model)  # validated as a reserve's would be
        return make(
            rid, held, user_id=user_id, project_id=project_id, model=model, on_error="charge"
        )

    def _described(
        self,
        make: MakeHandle[H],
        rid: str,
        user_id: str | None,
        project_id: str | None,
        model: str | None,
        held_at: datetime.datetime | None,
    ) -> H:
        """A handle made from what the caller says, without asking the store."""
        if user_id is None:
            if project_id is not None or model is not None or held_at is not None:
                raise InvalidInputError(
                    "describe a hold with its user_id and held_at, or not at all"
                )
            held = Held(state="held", at=-1, held_nano=0, known=False)
            return make(rid, held, user_id="", project_id=None, model=None, on_error="charge")
        if held_at is None:
            raise InvalidInputError("a hold described by its user_id needs its held_at too")
        return self._handle(make, rid, user_id, project_id, model, held_at, known=False)

    def _handle(
        self,
        make: MakeHandle[H],
        rid: str,
        user_id: str,
        project_id: str | None,
        model: str | None,
        held_at: datetime.datetime,
        *,
        known: bool,
    ) -> H:
        """A handle for a hold the caller describes (its estimate: 0), its input checked."""
        at = at_ms(held_at)
        try:
            if not 0 <= at <= MAX_AT:
                raise ValueError("before 1970 or after 9999")
            self.ledger.frame(at)  # its periods: the calendar's edges are years 1 and 9999
        except ValueError as e:
            raise InvalidInputError(f"held_at out of range ({e}): {held_at!r}") from None
        self.scopes(user_id, project_id, model)  # validated as a reserve's would be
        held = Held(state="held", at=at, held_nano=0, known=known)
        return make(
            rid, held, user_id=user_id, project_id=project_id, model=model, on_error="charge"
        )

    # -- reporting and administration -------------------------------------------

    def window(self, window: object) -> str:
        """*window*, checked to be one this manager keeps."""
        window = check_window(window)
        if window not in self.ledger.windows:
            raise InvalidInputError(
                f"the {window} window is not kept: set {_ADVERB[window]} limit in the "
                f"configuration, or add it to COREASON_BUDGET_WINDOWS (windows=...)"
            )
        return window

    def usage(
        self, user_id: str, project_id: str | None, window: str = "day"
    ) -> Steps[dict[str, ScopeUsage]]:
        window = self.window(window)
        scopes = self.scopes(user_id, project_id, None)
        period, values = yield from self.ledger.usage(scopes, window)
        named = [describe(field) for field in scopes.fields]
        resets_at = instant(period.end_ms)
        return {
            name: ScopeUsage(name, entity, spent, _limit(limit), window, resets_at)
            for (name, entity), (spent, limit) in zip(named, values, strict=True)
        }

    def report(
        self,
        top: int | None,
        window: str = "day",
        period: datetime.date | datetime.datetime | None = None,
    ) -> Steps[Report]:
        check_top(top)
        window = self.window(window)
        calendar = self.ledger.calendar
        if period is None:
            now = yield from self.ledger.now_by_store()
            the_period = calendar.period(window, now)
        else:
            the_period = self._period(window, period)
        # Biggest first; each list pruned to its top as it grows, so that a day
        # of a million users costs a report memory for *top* rows, not for all.
        rows: dict[str, list[tuple[int, str]]] = {"user": [], "project": [], "model": []}
        total = 0
        cursor = 0
        while True:
            cursor, page = yield from self.ledger.counters(the_period, cursor)
            for counter, spent in page:
                try:
                    scope, entity = describe(counter)
                except ValueError:
                    continue  # not a counter of ours: nothing to report
                if entity is None:
                    total = spent
                else:
                    kept = rows[scope]
                    kept.append((-spent, entity))
                    if top is not None and len(kept) > 2 * top + _REPORT_SLACK:
                        kept.sort()
                        del kept[top:]
            if cursor == 0:
                break
        for kept in rows.values():
            kept.sort()
            if top is not None:
                del kept[top:]
        limited = [field(s, entity) for s in ("user", "project", "model") for _, entity in rows[s]]
        overrides = yield from self.ledger.overrides(window, [*limited, field("global")])
        j = self.ledger.windows.index(window)
        resets_at = instant(the_period.end_ms)

        def scope_usage(scope: str, entity: str | None, spent: int) -> ScopeUsage:
            limit = overrides.get(field(scope, entity), self._limits[scope][j])
            return ScopeUsage(scope, entity, spent, _limit(limit), window, resets_at)

        return Report(
            window=window,
            period=the_period.label,
            starts_at=instant(the_period.start_ms),
            resets_at=resets_at,
            total=scope_usage("global", None, total),
            users=tuple(scope_usage("user", entity, -neg) for neg, entity in rows["user"]),
            projects=tuple(scope_usage("project", e, -neg) for neg, e in rows["project"]),
            models=tuple(scope_usage("model", e, -neg) for neg, e in rows["model"]),
        )

    def _period(self, window: str, moment: object) -> Period:
        """The period of *window* holding *moment*: a date (its local midnight), or an instant."""
        calendar = self.ledger.calendar
        moment = check_period(moment)
        try:
            if isinstance(moment, datetime.datetime):
                return calendar.period(window, at_ms(moment))
            midnight = calendar.labelled("day", moment.isoformat()).start_ms
            return calendar.period(window, midnight)
        except (ValueError, OverflowError) as e:  # the calendar's edges (years 1 and 9999)
            raise InvalidInputError(f"no {window} period holds {moment!r}: {e}") from None

    def set_limit(
        self,
        scope: ScopeName,
        entity_id: str | None,
        limit_usd: float | Decimal | None,
        window: str = "day",
    ) -> Steps[None]:
        counter = self._field(scope, entity_id)
        window = self.window(window)
        limit = None if limit_usd is None else to_nano(limit_usd, "limit_usd", MAX_LIMIT_NANO)
        yield from self.ledger.set_limit(window, counter, limit)

    # -- scopes ------------------------------------------------------------------

    def _field(self, name: str, entity_id: str | None) -> str:
        """The counter field of a user, project, model or the global scope; validates the id."""
        if name == "global":
            if entity_id is not None:
                raise InvalidInputError("the global scope takes no entity id (pass None)")
            return field("global")
        if name in ("user", "project"):
            return field(name, check_id(entity_id, f"{name}_id"))
        if name == "model":
            return field(name, check_id(entity_id, "model"))
        raise InvalidInputError(
            f"scope must be 'user', 'project', 'model' or 'global', got {name!r}"
        )

    def scopes(self, user_id: str, project_id: str | None, model: str | None) -> Scopes:
        """
        Narrowest first: the first scope that refuses is the one reported.

        Remembered per (user, project, model), ids validated once: the same
        callers come back all day, and building the wire form is most of the
        Python a call would otherwise spend.
        """
        key = (user_id, project_id, model)
        try:
            known = self._scopes_seen.get(key)
        except TypeError:  # an unhashable id: let the validation below say what is wrong
            known = None
        if known is not None:
            return known
        limits = self._limits
        pairs = [(self._field("user", user_id), limits["user"])]
        if project_id is not None:
            pairs.append((self._field("project", project_id), limits["project"]))
        if model is not None:
            pairs.append((self._field("model", model), limits["model"]))
        pairs.append((field("global"), limits["global"]))
        scopes = Scopes.of(pairs)
        if len(self._scopes_seen) >= _SCOPES_REMEMBERED:
            self._scopes_seen.clear()  # cheaper than LRU bookkeeping on every call
        self._scopes_seen[key] = scopes
        return scopes


_ADVERB = {"hour": "an hourly", "day": "a daily", "week": "a weekly", "month": "a monthly"}


def _limit(nano: int) -> int | None:
    """A limit as answers give it: None for none."""
    return None if nano < 0 else nano


#: A settlement's reply word (OK's state, or GONE's) -> what became of the money.
_SETTLED: dict[str, Status] = {
    "committed": "recorded",
    "released": "recorded",
    "recorded": "recorded",
    "expired": "expired",
}
#: How far past 2 x top a report's list may grow before it is pruned back to top.
_REPORT_SLACK = 1024
#: How many (user, project, model) combinations a manager remembers at most.
_SCOPES_REMEMBERED = 10_000
