"""
BudgetManager: the public, synchronous, thread-safe entry point.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import threading
from collections.abc import Callable
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from ._config import BudgetConfig
from ._ledger import UNLIMITED, Held, Ledger, Scopes, date_day, day_date, describe, field
from ._money import MAX_LIMIT_NANO, check_id, new_id, to_nano
from ._receipt import Receipt, Status
from ._replay import SpoolKeeper
from ._reservation import OnError, Reservation
from ._spool import ReplaySummary
from ._store import open_store
from ._usage import ModelSpend, Report, ScopeUsage
from .exceptions import (
    BudgetError,
    BudgetUnavailableError,
    InvalidInputError,
    UnknownReservationError,
)

if TYPE_CHECKING:
    from ._pricing import PricingEngine

log = logging.getLogger("coreason_budget")

ScopeName = Literal["user", "project", "global"]


class BudgetManager:
    """
    Daily USD budgets per user, per project and for the whole organisation.

    One manager per process is enough: it is thread-safe and owns a bounded
    connection pool. Every operation is one atomic call of the ledger script,
    so budgets hold across threads, processes and machines sharing a store.
    """

    def __init__(self, config: BudgetConfig, *, clock: Callable[[], float] | None = None) -> None:
        """
        *clock* (seconds since the epoch) replaces the store's clock in deciding
        which day a call belongs to; meant for tests. Without it every worker
        uses the Redis server's clock, so drifting worker clocks cannot split a day.
        """
        self.config = config
        self._store = open_store(config)
        self._ledger = Ledger(
            self._store.client,
            prefix=config.key_prefix,
            retention_seconds=config.retention_seconds,
            idempotency_ttl_seconds=config.idempotency_ttl_seconds,
            pool_size=config.pool_size,
            pool_timeout=config.pool_timeout,
            clock=clock,
        )
        self._limits = {
            "user": to_nano(config.daily_user_limit_usd, maximum=MAX_LIMIT_NANO),
            "project": to_nano(config.daily_project_limit_usd, maximum=MAX_LIMIT_NANO),
            "global": to_nano(config.daily_global_limit_usd, maximum=MAX_LIMIT_NANO),
        }
        self._scopes_seen: dict[tuple[str, str | None, str | None], Scopes] = {}
        self._pricing: PricingEngine | None = None
        self._pricing_lock = threading.Lock()
        if config.pricing_file is not None:
            # A malformed price file must stop start-up, not the first priced call;
            # reading it is cheap and does not import litellm.
            self._pricing = self._new_pricing()
        self._keeper = SpoolKeeper(config, self._ledger)
        # After any call the store answers, the spool (if it holds anything) replays.
        self._ledger.on_reached = self._keeper.replay_if_due

    @classmethod
    def from_env(cls) -> BudgetManager:
        """A manager configured from ``COREASON_BUDGET_*`` variables and ``.env``."""
        return cls(BudgetConfig.from_env())

    @property
    def pricing(self) -> PricingEngine:
        """Model prices (litellm's table plus overrides); loaded on first use."""
        if self._pricing is None:
            with self._pricing_lock:
                if self._pricing is None:
                    self._pricing = self._new_pricing()
        return self._pricing

    def _new_pricing(self) -> PricingEngine:
        from ._pricing import PricingEngine

        return PricingEngine(self.config.pricing_file)

    # -- the guard ------------------------------------------------------------

    def check_availability(
        self, user_id: str, estimated_cost: float | Decimal, project_id: str | None = None
    ) -> None:
        """
        Raise :class:`BudgetExceededError` if *estimated_cost* does not fit today.

        Read-only: two callers can both pass a check and together overspend.
        Use :meth:`reserve` where that matters.
        """
        amount = to_nano(estimated_cost, "estimated_cost")
        self._ledger.check(self._scopes(user_id, project_id, None), amount)

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

        Repeating a call with the same *idempotency_key* records it once
        (status "duplicate"); the same key for a different user, scopes or
        amount raises IdempotencyConflictError. Without a key, one is generated
        for this call (the receipt names it) so that retries cannot double-charge.

        If the store cannot be reached, the spend is saved to the local spool
        (``spool_dir``) and the receipt says "spooled": it is recorded exactly
        once when the store is back, on the day it was made. Without a spool this
        raises BudgetUnavailableError naming the key: the spend may or may not
        have reached the store, and only a retry with that key is safe.
        """
        amount = to_nano(cost, "cost")
        scopes = self._scopes(user_id, project_id, model)
        op = new_id() if idempotency_key is None else check_id(idempotency_key, "idempotency_key")
        day = self._ledger.today()  # the day this spend is made on, should it be spooled
        status: Status
        try:
            status = self._ledger.spend(scopes, amount, op)
        except BudgetUnavailableError as e:
            e.idempotency_key = op
            self._keeper.keep(e, "spend", op, day, scopes, amount)
            return Receipt("spooled", "spend", op, amount)
        return Receipt(status, "spend", op, 0 if status == "duplicate" else amount)

    def reserve(
        self,
        user_id: str,
        estimate: float | Decimal,
        project_id: str | None = None,
        model: str | None = None,
        *,
        on_error: OnError = "charge",
        reservation_id: str | None = None,
    ) -> Reservation:
        """
        Hold *estimate* in every applicable scope, atomically, or raise.

        Raises :class:`BudgetExceededError` having held nothing when any scope
        cannot fit it. Reserving again with the same *reservation_id* returns
        the existing hold instead of taking a second one; an id already settled
        (or undone) holds nothing and raises IdempotencyConflictError.
        """
        if on_error not in ("charge", "release"):
            raise InvalidInputError(f"on_error must be 'charge' or 'release', got {on_error!r}")
        amount = to_nano(estimate, "estimate")
        scopes = self._scopes(user_id, project_id, model)
        rid = new_id() if reservation_id is None else check_id(reservation_id, "reservation_id")
        day = self._ledger.today()
        try:
            held = self._ledger.reserve(scopes, amount, rid)
        except BudgetUnavailableError as e:
            self._undo_reserve(e, scopes, rid, day)
            raise
        except Exception:  # the ledger's answers: nothing was written
            raise
        except BaseException as e:
            # Interrupted (KeyboardInterrupt, a gevent-style timeout) after the script
            # may have run: as unknown as a lost reply, so undone the same way.
            lost = BudgetUnavailableError(f"reserve interrupted ({type(e).__name__})")
            with contextlib.suppress(BudgetError):
                self._undo_reserve(lost, scopes, rid, day)
            e.add_note("".join(getattr(lost, "__notes__", [])))
            raise
        return Reservation(
            self,
            self._ledger,
            self._keeper,
            scopes,
            rid,
            held,
            user_id=user_id,
            project_id=project_id,
            model=model,
            on_error=on_error,
        )

    def _undo_reserve(
        self, error: BudgetUnavailableError, scopes: Scopes, rid: str, day: int
    ) -> None:
        """
        A reserve that failed may still have taken its hold (only the reply was
        lost); nobody would ever settle it. Release it by id: through the spool
        (the store just failed us; the release lands with the next call that
        reaches it), else directly, once, in the background (the caller's
        error must not wait for a store that just failed it). A release that
        finds no hold leaves a tombstone, so a reserve of this id arriving late
        takes nothing either.
        """
        error.reservation_id = rid
        error.add_note(
            f"Reservation {rid!r} is being released in case the store took it before failing; "
            "reserving again needs a new reservation_id."
        )
        try:
            self._keeper.keep(error, "settle", rid, day, scopes, 0, "released")
        except BudgetUnavailableError:  # no spool

            def release() -> None:
                try:
                    self._ledger.settle(scopes, rid, day, 0, "released")
                except BudgetError as e:
                    log.warning(
                        "Could not release reservation %s (its reserve failed); if the store "
                        "took it, it stays held until its day ends: %s",
                        rid,
                        e,
                    )

            threading.Thread(target=release, name="coreason-budget-undo", daemon=True).start()

    # -- reporting and administration -------------------------------------------

    def usage(self, user_id: str, project_id: str | None = None) -> dict[str, ScopeUsage]:
        """Today's spent, limit and remaining per scope: "user", "project" (if given), "global"."""
        scopes = self._scopes(user_id, project_id, None)
        values = self._ledger.usage(scopes)
        named = [describe(field) for field in scopes.fields]
        return {
            name: ScopeUsage(name, entity, spent, limit)
            for (name, entity), (spent, limit) in zip(named, values, strict=True)
        }

    def report(self, top: int | None = None) -> Report:
        """
        Today's spend: the organisation's total, then users, projects and
        models, biggest first (the *top* of each, or all).
        """
        if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 0):
            raise InvalidInputError(f"top must be None or a whole number >= 0, got {top!r}")
        day = self._ledger.today_by_store()
        # Biggest first; each list pruned to its top as it grows, so that a day
        # of a million users costs a report memory for *top* rows, not for all.
        rows: dict[str, list[tuple[int, str]]] = {"user": [], "project": [], "model": []}
        total = 0
        for counter, spent in self._ledger.counters(day):
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
        for kept in rows.values():
            kept.sort()
            if top is not None:
                del kept[top:]
        limited = [field(s, entity) for s in ("user", "project") for _, entity in rows[s]]
        overrides = self._ledger.overrides([*limited, field("global")])

        def scope_usage(scope: str, entity: str | None, spent: int) -> ScopeUsage:
            limit = overrides.get(field(scope, entity), self._limits[scope])
            return ScopeUsage(scope, entity, spent, limit)

        return Report(
            day=day_date(day),
            total=scope_usage("global", None, total),
            users=tuple(scope_usage("user", entity, -neg) for neg, entity in rows["user"]),
            projects=tuple(scope_usage("project", e, -neg) for neg, e in rows["project"]),
            models=tuple(ModelSpend(entity, -neg) for neg, entity in rows["model"]),
        )

    def reservation(
        self,
        reservation_id: str,
        *,
        user_id: str | None = None,
        project_id: str | None = None,
        model: str | None = None,
        date: datetime.date | None = None,
    ) -> Reservation:
        """
        The handle of an existing reservation, by id, from any process.

        For settling a hold in another worker than the one that took it (an
        HTTP service behind a load balancer). Raises UnknownReservationError
        when the store has no such reservation (never made, or expired).

        With *user_id* and *date* (and the *project_id* and *model* it was
        made with), a reservation whose record the store lost (restarted
        without persistence) still gets a handle: committing it records the
        cost once on that day, as the handle that took it would. So does one
        the store cannot be asked about now, so that its settlement can be
        spooled. (The store settles a reservation in the scopes its record
        names, whatever the handle says.)
        """
        rid = check_id(reservation_id, "reservation_id")
        try:
            found = self._ledger.lookup(rid)
        except BudgetUnavailableError as e:
            if user_id is None or date is None:
                e.reservation_id = rid  # as every "unavailable" about a reservation does
                raise
            found = None
        if found is None:
            if user_id is None or date is None:
                raise UnknownReservationError(f"no reservation {rid!r} (never made, or expired)")
            if not isinstance(date, datetime.date) or isinstance(date, datetime.datetime):
                raise InvalidInputError(f"date must be a datetime.date, got {date!r}")
            day = date_day(date)
            held = Held(state="held", day=day, held_nano=0)
        else:
            held, fields = found
            try:
                ids = dict(describe(f) for f in fields)
            except ValueError:
                ids = {}
            user_id, project_id, model = ids.get("user"), ids.get("project"), ids.get("model")
            if user_id is None:
                raise UnknownReservationError(f"reservation {rid!r} names no user (not ours?)")
        return Reservation(
            self,
            self._ledger,
            self._keeper,
            self._scopes(user_id, project_id, model),
            rid,
            held,
            user_id=user_id,
            project_id=project_id,
            model=model,
            on_error="charge",
        )

    def set_limit(
        self, scope: ScopeName, entity_id: str | None, limit_usd: float | Decimal | None
    ) -> None:
        """
        Override the daily limit of one user or project (or the global one, with
        entity_id None); ``None`` removes the override. Stored in Redis, so
        every worker applies it from its next call on.
        """
        field = self._field(scope, entity_id)
        limit = None if limit_usd is None else to_nano(limit_usd, "limit_usd", MAX_LIMIT_NANO)
        self._ledger.set_limit(field, limit)

    def seconds_until_reset(self) -> int:
        """
        Seconds until today's budgets reset (the next UTC midnight), by the
        store's clock as this manager last learnt it: what a refused caller
        should wait (HTTP's Retry-After). At least 1.
        """
        return self._ledger.seconds_to_next_day()

    def ping(self) -> None:
        """Raise BudgetUnavailableError unless the store answers (for health checks)."""
        self._ledger.ping()

    def close(self) -> None:
        """
        Close the connection pool (and stop an embedded store no one else uses).

        Charges still spooled stay on disk: the next manager for this store
        (in any process) or ``coreason-budget replay-spool`` records them.
        """
        self._keeper.close()
        self._store.close()

    def __enter__(self) -> BudgetManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the spool -----------------------------------------------------------------

    def replay_spool(self) -> ReplaySummary:
        """
        Record now every charge spooled for this store: this process's, and
        those left by processes that died (files another live process holds
        are left to it). Replaying is idempotent, so a charge that did reach
        the store is not charged again. Stops at the first entry the store
        cannot take (``error`` says why); what is left stays spooled.
        """
        return self._keeper.replay_now()

    # -- scopes ------------------------------------------------------------------

    def _field(self, name: str, entity_id: str | None) -> str:
        """The counter field of a user, project or the global scope; validates the id."""
        if name == "global":
            if entity_id is not None:
                raise InvalidInputError("the global scope takes no entity id (pass None)")
            return field("global")
        if name in ("user", "project"):
            return field(name, check_id(entity_id, f"{name}_id"))
        raise InvalidInputError(f"scope must be 'user', 'project' or 'global', got {name!r}")

    def _scopes(self, user_id: str, project_id: str | None, model: str | None) -> Scopes:
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
        pairs.append((field("global"), limits["global"]))
        if model is not None:
            pairs.append((field("model", check_id(model, "model")), UNLIMITED))
        scopes = Scopes.of(pairs)
        if len(self._scopes_seen) >= _SCOPES_REMEMBERED:
            self._scopes_seen.clear()  # cheaper than LRU bookkeeping on every call
        self._scopes_seen[key] = scopes
        return scopes


#: How far past 2 x top a report's list may grow before it is pruned back to top.
_REPORT_SLACK = 1024
#: How many (user, project, model) combinations a manager remembers at most.
_SCOPES_REMEMBERED = 10_000
