"""
The manager's side of the spool: keep what the store could not take, replay it when it answers.

The spool file format and its locking live in :mod:`._spool`; this module
decides *when* a charge is kept (a write the store could not take: the caller
then answers "spooled") and *when* it is replayed (in the background after a
call that reached the store, or on demand), and replays each entry through the
same idempotent ledger operation it missed. A charge that could not be kept
(spooling off, or the spool cannot be written) is not kept anywhere: the
caller raises BudgetUnavailableError, and nothing is charged later.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import redis

from ._config import BudgetConfig
from ._ledger import Ledger, Scopes
from ._spool import (
    Entry,
    Kind,
    Rejected,
    Replayed,
    ReplaySummary,
    Spool,
    spool_directory,
    spool_for,
    store_identity,
)
from ._steps import Steps
from .exceptions import BudgetError, BudgetUnavailableError, ConfigError

log = logging.getLogger("coreason_budget")


class SpoolKeeper:
    """One per manager: its spool (None when spooling is off) and its replays."""

    def __init__(self, config: BudgetConfig, ledger: Ledger) -> None:
        self._config = config
        self._ledger = ledger
        self._closed = False
        self._replayer: threading.Thread | None = None
        self.spool = _open_spool(config)
        #: Runs a ledger operation's steps to the end, from a replaying thread:
        #: the manager's driver (set by the manager; an async one's is a bridge to its loop).
        self.run: Callable[[Steps[Any]], Any] = _not_connected

    def keep(
        self,
        error: BudgetUnavailableError,
        kind: Kind,
        op: str,
        at: int | None,
        scopes: Scopes,
        amount: int,
        state: str | None = None,
    ) -> None:
        """
        Keep a charge the store could not take; returns once it is on disk.

        Then it will be recorded exactly once (replays are idempotent), and the
        caller answers "spooled". Raises *error* when it could not be kept
        (spooling off, or the spool cannot be written): the caller's answer is
        then "unavailable", and the error names the id that makes a retry safe.
        """
        spool = self.spool
        if spool is None:
            raise error
        try:
            spool.append(kind, op, at, scopes.fields, amount, state)
        except OSError as e:
            log.error(
                "Could not write the spool in %s (%s): %s %s of %d nano-USD is not kept, and "
                "will not be recorded unless the caller retries it",
                spool.directory,
                e,
                kind,
                op,
                amount,
            )
            error.add_note(f"could not write it to the local spool: {e}")
            raise error from error.__cause__

    def replay_if_due(self) -> None:
        """After a call that reached the store: start replaying the spool if it holds anything."""
        spool = self.spool
        if (
            spool is not None
            and spool.due
            and not self._closed
            and not getattr(_replaying, "now", False)  # a replay's own calls reached it
            and spool.claim_replay()
        ):
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
        return self._replay(spool)

    def close(self) -> None:
        """Stop replaying; charges still spooled stay on disk for the next manager or the CLI."""
        self._closed = True
        replayer = self._replayer
        if replayer is not None:
            # Stops after the entry in flight, itself bounded by the store's timeouts.
            replayer.join(self._config.call_bound())

    def _replay_in_background(self, spool: Spool) -> None:
        """In its own thread, so that a caller never waits for someone else's backlog."""
        summary = None
        try:
            summary = self._replay(spool)
            if summary.replayed or summary.quarantined:
                log.info(
                    "Replayed %d spooled charge(s) (%d already recorded, %d expired); %d remain; "
                    "%d quarantined%s",
                    summary.replayed,
                    summary.duplicates,
                    summary.expired,
                    summary.remaining,
                    summary.quarantined,
                    f" in {', '.join(summary.quarantine_files)}"
                    if summary.quarantine_files
                    else "",
                )
        except Exception:
            log.exception("Replaying the spool failed; it is kept and retried")
        finally:
            spool.end_replay(again=summary is None or summary.error is not None)

    def _replay(self, spool: Spool) -> ReplaySummary:
        _replaying.now = True
        try:
            summary = spool.replay(self._apply)
            if summary.error is None:
                summary.merge(spool.replay_others(self._apply))
        finally:
            _replaying.now = False
        return summary

    def _apply(self, entry: Entry) -> Replayed:
        """
        Re-run one spooled charge through its idempotent ledger operation.

        Raises BudgetUnavailableError when the store is away (the replay stops,
        the rest stays spooled), Rejected when it refuses this very entry, as it
        would every time (the entry is quarantined, the replay goes on).
        """
        if self._closed:
            raise BudgetUnavailableError("budget manager closed")
        try:
            scopes = Scopes.tracked(entry.fields)
        except ValueError as e:
            raise Rejected(f"names no counter: {e}") from e
        try:
            outcome: Replayed
            if entry.kind == "spend":
                assert entry.at is not None
                outcome = self.run(
                    self._ledger.replay_spend(scopes, entry.amount, entry.op, entry.at)
                )
            else:
                assert entry.state is not None
                reply = self.run(
                    self._ledger.settle(scopes, entry.op, entry.at, entry.amount, entry.state)
                )
                # OK or GONE/recorded: charged now; DONE: settled before; GONE/expired: too late.
                outcome = (
                    "duplicate"
                    if reply[0] == "DONE"
                    else "expired"
                    if reply[1] == "expired"
                    else "recorded"
                )
        except BudgetUnavailableError as e:
            reason = _refusal(e)
            if reason is None:
                raise
            raise Rejected(reason) from e
        except BudgetError as e:
            # Not the store being away: it refuses this entry (an idempotency key
            # used for another charge, a counter it cannot add to), and always will.
            raise Rejected(f"{type(e).__name__}: {e}") from e
        except (ValueError, OverflowError) as e:
            # The entry cannot even be sent (the spool checks every value first, so
            # this would be a gap in those checks): it would fail the same way each time.
            raise Rejected(f"cannot be sent to the store: {type(e).__name__}: {e}") from e
        if outcome == "expired":
            log.warning(
                "Spooled %s %s replayed after its periods' ledger expired; not recorded",
                entry.kind,
                entry.op,
            )
        return outcome


#: Words of a store error that refuses one entry, and would refuse it every time. Any
#: other error stops the replay instead (the rest stays spooled): a store that refuses
#: every call (read-only, out of memory, loading, no script support, no permission)
#: must not have the whole spool quarantined.
_REFUSALS = (
    "WRONGTYPE",  # a key of this entry holds something else
    "is not an integer",  # a counter of this entry holds something else (a refund's)
)


def _refusal(error: BudgetUnavailableError) -> str | None:
    """Why the store refuses this very entry for good; None if it is unavailable."""
    cause = error.__cause__
    if isinstance(cause, redis.DataError):
        return f"the store's client cannot send it: {cause}"
    # Subclasses (NoScript, ReadOnly, OutOfMemory, BusyLoading, cluster errors...)
    # are the store's state, not the entry's.
    if type(cause) is redis.ResponseError and any(w in str(cause) for w in _REFUSALS):
        return f"refused by the store: {cause}"
    return None


def _not_connected(steps: Steps[Any]) -> Any:
    steps.close()
    raise BudgetUnavailableError("budget manager not connected to its store yet")


#: Set in a thread while it replays: its own ledger calls must not start another replay.
_replaying = threading.local()


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
