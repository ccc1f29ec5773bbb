"""
The manager's side of the spool: keep what the store could not take, replay it when it answers.

The spool file format and its locking live in :mod:`._spool`; this module
decides *when* a charge is kept (a write that failed closed) and *when* it is
replayed (in the background after a call that reached the store, or on demand),
and replays each entry through the same idempotent ledger operation it missed.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, NoReturn

import redis

from ._config import BudgetConfig
from ._ledger import Ledger, Scopes
from ._spool import (
    Entry,
    Kind,
    Outcome,
    ReplaySummary,
    Spool,
    spool_directory,
    spool_for,
    store_identity,
)
from .exceptions import BudgetUnavailableError, ConfigError

log = logging.getLogger("coreason_budget")


class SpoolKeeper:
    """One per manager: its spool (None when spooling is off) and its replays."""

    def __init__(self, config: BudgetConfig, ledger: Ledger) -> None:
        self._config = config
        self._ledger = ledger
        self._closed = False
        self._replayer: threading.Thread | None = None
        self.spool = _open_spool(config)

    def keep(
        self,
        error: BudgetUnavailableError,
        kind: Kind,
        op: str,
        day: int,
        scopes: Scopes,
        amount: int,
        state: str | None = None,
        owner: object = None,
    ) -> NoReturn:
        """
        Keep a charge the store could not take, then re-raise *error*: the caller
        still fails closed, but the money is not forgotten.
        """
        spool = self.spool
        if spool is None:
            raise error
        try:
            spool.append(kind, op, day, scopes.fields, amount, state, owner)
        except OSError as e:
            log.error(
                "Could not write the spool in %s (%s): %s %s of %d nano-USD is kept in memory "
                "only, and lost if this process ends before the store is back",
                spool.directory,
                e,
                kind,
                op,
                amount,
            )
            error.add_note(f"could not write it to the local spool: {e}")
            raise error from error.__cause__
        note = (
            f"The {kind} was saved to the local spool in {spool.directory} and will be "
            "recorded once the store is reachable"
        )
        if kind == "spend":
            # The one retry that is not safe any more: a new key is a new spend.
            note += f"; a retry records it again unless it passes idempotency_key={op!r}"
        error.add_note(note + ".")
        raise error from error.__cause__

    def confirm_settled(self, reservation_id: str) -> None:
        """A held handle's retry got through: what the spool holds for it is moot."""
        if self.spool is not None:
            self.spool.confirm_settled(reservation_id)

    def replay_if_due(self) -> None:
        """After a call that reached the store: start replaying the spool if it holds anything."""
        spool = self.spool
        if spool is not None and spool.due and not self._closed and spool.claim_replay():
            self._replayer = threading.Thread(
                target=self._replay_in_background,
                args=(spool,),
                name="coreason-budget-spool-replay",
                daemon=True,
            )
            self._replayer.start()

    def replay_now(self) -> ReplaySummary:
        """Replay every entry for this store now, in this thread (BudgetManager.replay_spool)."""
        spool = self.spool
        if spool is None:
            raise ConfigError(
                "no spool: spool_dir is 'off'"
                if spool_directory(self._config) is None
                else "no spool: a memory:// store lives only as long as its manager"
            )
        return self._replay(spool, defer_live_handles=False)

    def close(self) -> None:
        """Stop replaying; charges still spooled stay on disk for the next manager or the CLI."""
        self._closed = True
        replayer = self._replayer
        if replayer is not None:
            # Stops after the entry in flight, itself bounded by the store's timeouts.
            c = self._config
            replayer.join((c.retries + 1) * (c.connect_timeout + c.socket_timeout) + 1.0)

    def _replay_in_background(self, spool: Spool) -> None:
        """In its own thread, so that a caller never waits for someone else's backlog."""
        summary = None
        try:
            summary = self._replay(spool, defer_live_handles=True)
            if summary.replayed:
                log.info(
                    "Replayed %d spooled charge(s) (%d already recorded, %d expired); %d remain",
                    summary.replayed,
                    summary.duplicates,
                    summary.expired,
                    summary.remaining,
                )
        except Exception:
            log.exception("Replaying the spool failed; it is kept and retried")
        finally:
            spool.end_replay(again=summary is None or summary.error is not None)

    def _replay(self, spool: Spool, *, defer_live_handles: bool) -> ReplaySummary:
        defer = _unsettled if defer_live_handles else None
        summary = spool.replay(self._apply, defer)
        if summary.error is None:
            summary.merge(spool.replay_others(self._apply))
        return summary

    def _apply(self, entry: Entry) -> Outcome:
        """Re-run one spooled charge through its idempotent ledger operation."""
        if self._closed:
            raise BudgetUnavailableError("budget manager closed")
        try:
            scopes = Scopes.tracked(entry.fields)
        except ValueError as e:
            log.error("Dropping a spooled %s that names no counter (%s): %r", entry.kind, e, entry)
            return "rejected"
        try:
            outcome: Outcome
            if entry.kind == "spend":
                outcome = self._ledger.replay_spend(scopes, entry.amount, entry.op, entry.day)
            else:
                assert entry.state is not None
                reply = self._ledger.settle(scopes, entry.op, entry.day, entry.amount, entry.state)
                # OK or GONE/recorded: charged now; DONE: settled before; GONE/expired: too late.
                outcome = (
                    "duplicate"
                    if reply[0] == "DONE"
                    else "expired"
                    if reply[1] == "expired"
                    else "recorded"
                )
        except BudgetUnavailableError as e:
            cause = e.__cause__
            if isinstance(cause, redis.ResponseError) and "belongs to day" in str(cause):
                # The id names another day's reservation: never replayable. Logged in full.
                log.error("Dropping a spooled settlement the store refuses (%s): %r", cause, entry)
                return "rejected"
            raise
        if outcome == "expired":
            log.warning(
                "Spooled %s %s of day %d replayed after its day's ledger expired; not recorded",
                entry.kind,
                entry.op,
                entry.day,
            )
        return outcome


def _open_spool(config: BudgetConfig) -> Spool | None:
    directory = spool_directory(config)
    identity = store_identity(config)
    if directory is None or identity is None:
        return None
    spool = spool_for(directory, *identity)
    # Charges a dead process left for this store: replay them once the store answers.
    # (A directory listing, once per manager; the hot path reads only spool.due.)
    if spool.has_other_files():
        spool.due = True
    return spool


def _unsettled(owner: Any) -> bool:
    """A live reservation handle still unsettled: its holder may yet retry the commit."""
    return getattr(owner, "state", None) == "held"
