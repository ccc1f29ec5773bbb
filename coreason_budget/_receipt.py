"""
Receipt: what became of the money of a write, the one answer every face gives.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from ._money import nano_to_usd

#: recorded: the store took it now. duplicate: the store already had this key
#: (an earlier call, or an earlier settlement of the reservation): nothing more
#: was charged. spooled: the store could not be reached; it is saved on disk and
#: will be recorded exactly once when the store is back. expired: its day is
#: past retention; the store keeps nothing to charge, so it never will be.
Status = Literal["recorded", "duplicate", "spooled", "expired"]
Kind = Literal["spend", "commit", "release"]


@attrs.frozen
class Receipt:
    """
    The answer to ``record_spend``, ``commit`` and ``release``.

    ``idempotency_key`` is what makes a retry safe: the spend's key (generated
    when none was given) or the reservation id. Retrying with it never charges
    twice, whatever the status; retrying *without* it after "spooled" would.
    """

    status: Status
    kind: Kind
    idempotency_key: str
    amount_nano: int

    @property
    def amount_usd(self) -> float:
        return nano_to_usd(self.amount_nano)

    @property
    def spooled(self) -> bool:
        """Saved locally, not yet in the store: recorded once it is reachable."""
        return self.status == "spooled"

    def to_json(self) -> dict[str, Any]:
        """The shape the HTTP API and the CLI's ``--json`` share."""
        return {
            "status": self.status,
            "kind": self.kind,
            "idempotency_key": self.idempotency_key,
            "amount_usd": self.amount_usd,
            "amount_nano": self.amount_nano,
        }
