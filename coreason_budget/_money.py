"""
Money and identifier validation: the one place user input is turned into ledger units.

Amounts are stored as integer nano-dollars (1e-9 USD) so that a million
charges of $0.000001 add up to exactly $1; floats are converted once, here,
through their shortest decimal form (``repr``), never accumulated.
"""

from __future__ import annotations

import math
import numbers
import os
from decimal import Decimal
from fractions import Fraction
from typing import Any

from .exceptions import InvalidInputError

NANO_PER_USD = 1_000_000_000
#: Largest single amount accepted anywhere; larger is a bug, not a purchase.
MAX_AMOUNT_USD = 1_000_000
MAX_AMOUNT_NANO = MAX_AMOUNT_USD * NANO_PER_USD
#: Largest daily limit. Keeps every comparison the Lua script makes below 2**53,
#: where Lua's doubles are still exact integers.
MAX_LIMIT_USD = 9_000_000
MAX_LIMIT_NANO = MAX_LIMIT_USD * NANO_PER_USD
MAX_ID_LENGTH = 256

_NANO = Decimal(NANO_PER_USD)
#: Below 2**22, float spacing is under a nano-dollar (see to_nano's fast path).
_EXACT_BELOW = float(2**22)


def to_nano(amount: object, what: str = "cost", maximum: int = MAX_AMOUNT_NANO) -> int:
    """
    Convert a USD amount (int, float or Decimal) to nano-dollars, rounding up.

    Rounding up means a sub-nano remainder is charged, never given away.
    """
    # The hot path first: a float in range (NaN and the infinities fail the comparison).
    if type(amount) is float and 0.0 <= amount < _EXACT_BELOW:
        nano = round(amount * 1e9)
        # If that many nano-dollars is this very float, it is the float's decimal
        # (below 2**22 floats are closer together than a nano-dollar, so no other
        # decimal of at most 9 places maps to it): no rounding up to do.
        if nano / 1e9 == amount and nano <= maximum:
            return nano
    if isinstance(amount, bool) or not isinstance(amount, int | float | Decimal):
        if isinstance(amount, numbers.Integral) and not isinstance(amount, bool):
            return to_nano(_exactly(int, amount, what), what, maximum)  # numpy.int64, say
        raise InvalidInputError(
            f"{what} must be a number of USD (int, float or Decimal), got {type(amount).__name__}"
        )
    if type(amount) not in (int, float, Decimal):
        # A subclass (numpy.float64, an IntEnum) may override repr, arithmetic or
        # comparisons; its plain value is what it means.
        base = float if isinstance(amount, float) else int if isinstance(amount, int) else Decimal
        return to_nano(_exactly(base, amount, what), what, maximum)
    finite = (
        math.isfinite(amount)
        if isinstance(amount, float)
        else (not isinstance(amount, Decimal) or amount.is_finite())
    )
    if not finite:
        raise InvalidInputError(f"{what} must be finite, got {amount!r}")
    if amount < 0:
        raise InvalidInputError(f"{what} must not be negative, got {amount!r}")
    if isinstance(amount, int):
        nano = amount * NANO_PER_USD
    elif isinstance(amount, float):
        # repr() gives a float's shortest round-tripping decimal: 0.1 -> "0.1".
        plain = _plain_float_nano(amount)
        nano = _decimal_nano(Decimal(repr(amount))) if plain is None else plain
    else:
        nano = _decimal_nano(amount)
    if nano > maximum:
        raise InvalidInputError(
            f"{what} of {amount!r} USD is above the maximum of {format_usd(maximum)}"
        )
    return nano


def _exactly(base: type[Any], amount: object, what: str) -> Any:
    """*amount* as a plain int, float or Decimal; anything that fails is bad input."""
    try:
        return base(amount)
    except Exception as e:
        raise InvalidInputError(f"{what} of {type(amount).__name__} is not a number: {e}") from e


def _plain_float_nano(amount: float) -> int | None:
    """
    A float whose repr has no exponent but more than 9 decimals (what float
    arithmetic makes: 1234 * 0.000003), converted from its digits with integer
    arithmetic, exactly as the Decimal route would.
    """
    text = repr(amount)
    if "e" in text:
        return None
    whole, _, frac = text.partition(".")
    nano = int(whole) * NANO_PER_USD + int(frac[:9].ljust(9, "0"))
    return nano + 1 if frac[9:].strip("0") else nano  # a sub-nano remainder rounds up


def _decimal_nano(dec: Decimal) -> int:
    """Exact for any finite, non-negative Decimal, rounded up."""
    if dec == 0:
        return 0
    # Decimal arithmetic rounds to its context's 28 digits and can overflow;
    # the exponent bounds first, then exact rational arithmetic for the rest.
    if dec.adjusted() > 15:
        return MAX_LIMIT_NANO * 1_000  # above every maximum
    if dec.adjusted() < -12:
        return 1  # below a thousandth of a nano-dollar, still more than nothing
    return math.ceil(Fraction(dec) * NANO_PER_USD)


def nano_to_usd(nano: int) -> float:
    """The float closest to *nano* nano-dollars (int / int division is correctly rounded)."""
    return nano / NANO_PER_USD


def format_usd(nano: int) -> str:
    """``$9.99``; more decimals only when the cents alone would hide the amount."""
    usd = Decimal(nano) / _NANO
    text = f"{usd:.9f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


#: Ids drawn from the OS ahead, 64 at a time: a system call per id cost a
#: microsecond or two of every reserve and spend. Emptied in a forked child,
#: which must never hand out its parent's.
_ids: list[str] = []
if hasattr(os, "register_at_fork"):  # no fork (Windows), no hook
    os.register_at_fork(after_in_child=_ids.clear)


def new_id() -> str:
    """
    A fresh reservation or operation id: 128 random bits from the OS (its
    cryptographic source, as uuid4's), so workers can never repeat each other's.
    """
    try:
        return _ids.pop()  # atomic: two threads never get the same one
    except IndexError:
        fresh = os.urandom(16 * 64).hex()
        _ids.extend(fresh[i : i + 32] for i in range(32, len(fresh), 32))
        return fresh[:32]


def check_id(value: object, what: str) -> str:
    """Validate a user, project, model or idempotency id: non-empty text up to 256 characters."""
    if not isinstance(value, str):
        raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(
            f"{what} is {len(value)} characters long; the maximum is {MAX_ID_LENGTH}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInputError(f"{what} is not valid unicode text: {e.reason}") from e
    return value
