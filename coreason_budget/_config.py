"""
Configuration: one frozen attrs class, built in code or from ``COREASON_BUDGET_*`` variables.

A bad value is a :class:`~coreason_budget.exceptions.ConfigError` that names
the variable (or attribute) and what was wrong, raised when the configuration
is built, so a misconfigured worker dies at start-up instead of at its first
LLM call.
"""

from __future__ import annotations

import logging
import math
import os
import typing
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs
from dotenv import dotenv_values
from redis.connection import parse_url

from ._money import MAX_LIMIT_NANO, MAX_LIMIT_USD, to_nano
from ._windows import WEEKDAYS, WINDOWS, Calendar
from .exceptions import ConfigError, InvalidInputError

log = logging.getLogger("coreason_budget")

ENV_PREFIX = "COREASON_BUDGET_"
STORE_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "unix", "embedded", "memory")
# Read by other parts of the project (server, CLI), not by BudgetConfig: not typos.
_KNOWN_ELSEWHERE = frozenset({"API_KEYS", "ADMIN_API_KEYS", "INSECURE_NO_AUTH"})
#: The scope kinds that take limits, narrowest first.
SCOPE_KINDS = ("user", "project", "model", "global")
_ADVERB = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly"}


class _FieldError(ConfigError):
    """A validator's complaint about one attribute; from_env renames it after its variable."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _limit(_: object, a: attrs.Attribute[Any], value: float | None) -> None:
    if value is None and a.default is None:
        return  # not limited in this window
    try:
        to_nano(value, a.name, maximum=MAX_LIMIT_NANO)
    except InvalidInputError as e:
        raise _FieldError(
            a.name, f"must be a finite number of USD from 0 to {MAX_LIMIT_USD:,}, got {value!r}"
        ) from e


def _positive_seconds(_: object, a: attrs.Attribute[Any], value: float) -> None:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (
        is_number and not (isinstance(value, float) and math.isnan(value)) and 0 < value <= 3600
    ):
        raise _FieldError(
            a.name, f"must be a number of seconds above 0 and at most 3600, got {value!r}"
        )


def _count(low: int, high: int) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _FieldError(a.name, f"must be a whole number from {low} to {high}, got {value!r}")

    return check


def _text(_: object, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is None and a.default is None:
        return
    if not isinstance(value, str) or not value:
        raise _FieldError(a.name, f"must be non-empty text, got {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _FieldError(a.name, f"must be valid unicode text, got {value!r}") from None


def _one_of(*choices: str) -> Any:
    def check(_: object, a: attrs.Attribute[Any], value: str) -> None:
        if value not in choices:
            raise _FieldError(a.name, f"must be one of {', '.join(choices)}, got {value!r}")

    return check


def _timezone(_: object, a: attrs.Attribute[Any], value: str) -> None:
    _text(_, a, value)
    if value.lower() == "localtime":  # each machine's own zone: workers would disagree
        raise _FieldError(a.name, "must name an IANA zone (e.g. Europe/Berlin), not localtime")
    try:
        Calendar(value)
    except ValueError as e:
        raise _FieldError(a.name, str(e)) from None


def _windows(_: object, a: attrs.Attribute[Any], value: str) -> None:
    if not isinstance(value, str):
        raise _FieldError(a.name, f"must be text naming windows, got {value!r}")
    unknown = [w for w in _words(value) if w not in WINDOWS]
    if unknown:
        raise _FieldError(
            a.name, f"must name windows among {', '.join(WINDOWS)}, got {', '.join(unknown)}"
        )


def _words(value: str) -> list[str]:
    return [w.strip().lower() for w in value.replace(",", " ").split() if w.strip()]


def _prefix(_: object, a: attrs.Attribute[Any], value: str) -> None:
    _text(_, a, value)
    # Braces would change the Redis Cluster hash tag; a colon-free, short prefix
    # keeps every key readable and in one slot.
    if len(value) > 64 or any(c in value for c in "{}: \t\r\n"):
        raise _FieldError(
            a.name, f"must be 1-64 characters without braces, colons or spaces, got {value!r}"
        )


def _store_url(_: object, a: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    _text(_, a, value)
    try:
        scheme = urlsplit(value).scheme
        if scheme.removesuffix("+cluster") in ("redis", "rediss", "unix"):
            # Parsed now, as the store will be: a bad port or option is a
            # configuration error at start-up, not a crash at the first call.
            parse_url(value.replace("+cluster://", "://", 1))  # type: ignore[no-untyped-call]
    except ValueError as e:
        raise _FieldError(a.name, f"is not a valid store URL ({e}): {value!r}") from None
    if scheme not in STORE_SCHEMES:
        raise _FieldError(
            a.name,
            f"must start with one of {', '.join(s + '://' for s in STORE_SCHEMES)}, got {value!r}",
        )
    if scheme == "embedded" and not value.removeprefix("embedded://"):
        raise _FieldError(
            a.name, "embedded:// needs a file path, e.g. embedded:///var/lib/budget.db"
        )


@attrs.frozen(kw_only=True)
class BudgetConfig:
    """
    How a :class:`~coreason_budget.BudgetManager` connects and what it enforces.

    Timeouts are short on purpose: a budget guard that hangs when its store
    stalls stalls every LLM call behind it. A dead store fails a call within
    (retries + 1) x (connect_timeout + socket_timeout): at most 1.5 s with the
    defaults, typically 0.8 s for a stalled store and 0.06 s for a refused port.
    """

    #: ``redis://``, ``rediss://``, ``unix://``, ``redis+cluster://``, ``rediss+cluster://``,
    #: ``embedded://PATH`` or ``memory://``. None: the embedded store at a per-user path.
    redis_url: str | None = attrs.field(default=None, validator=_store_url)
    #: Limits per scope and window, in USD. The daily user, project and global
    #: limits are always on; every other is off (None) unless set, and a window
    #: no limit names costs nothing (see windows).
    daily_user_limit_usd: float = attrs.field(default=10.0, validator=_limit)
    daily_project_limit_usd: float = attrs.field(default=500.0, validator=_limit)
    daily_global_limit_usd: float = attrs.field(default=5000.0, validator=_limit)
    #: Organisation-wide, per model (every model alike; set_limit for one model).
    daily_model_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    hourly_user_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    hourly_project_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    hourly_global_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    hourly_model_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    weekly_user_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    weekly_project_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    weekly_global_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    weekly_model_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    monthly_user_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    monthly_project_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    monthly_global_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    monthly_model_limit_usd: float | None = attrs.field(default=None, validator=_limit)
    #: The IANA time zone windows are calendar-aligned in (days start at its midnight).
    timezone: str = attrs.field(default="UTC", validator=_timezone)
    #: The day weeks start on, "monday" to "sunday".
    week_start: str = attrs.field(default="monday", validator=_one_of(*WEEKDAYS))
    #: Windows kept besides the day and those a limit above names (comma-separated,
    #: e.g. "month"): needed to set per-entity limits in a window with no default one.
    windows: str = attrs.field(default="", validator=_windows)
    #: Every key starts with ``{key_prefix}``: one Redis Cluster slot per prefix.
    key_prefix: str = attrs.field(default="coreason_budget", validator=_prefix)
    connect_timeout: float = attrs.field(default=0.25, validator=_positive_seconds)
    socket_timeout: float = attrs.field(default=0.25, validator=_positive_seconds)
    #: Retries of a command after a connection error or timeout; safe because
    #: every write carries an operation id.
    retries: int = attrs.field(default=2, validator=_count(0, 10))
    #: Connections per manager (per node on a cluster); a burst beyond it waits
    #: up to pool_timeout.
    pool_size: int = attrs.field(default=32, validator=_count(1, 10_000))
    pool_timeout: float = attrs.field(default=0.5, validator=_positive_seconds)
    #: How long a day's counters and reservations are kept after the day ends.
    retention_seconds: int = attrs.field(default=7 * 86400, validator=_count(0, 366 * 86400))
    #: How long an operation id is remembered at least, so its retry is not charged
    #: twice. It is remembered as long as the day it charged is kept, too.
    idempotency_ttl_seconds: int = attrs.field(default=2 * 86400, validator=_count(1, 366 * 86400))
    #: Hashes per UTC day that operation-id markers are spread over. Redis keeps a
    #: hash of up to 128 fields compactly (``hash-max-listpack-entries``): about
    #: your record_spend calls per day / 64 keeps them so (the default suits a
    #: million a day; beyond 128 a bucket takes about 3x the memory, nothing
    #: breaks). Changing it forgets the markers already made: set it once.
    record_buckets: int = attrs.field(default=16384, validator=_count(1, 1 << 22))
    #: Where the server and CLI log, besides stderr; "off": stderr only. Importing the
    #: library never writes there.
    log_path: str = attrs.field(default="logs/app.log", validator=_text)
    #: How the service writes log lines: "text", or "json" (one JSON object a line).
    log_format: str = attrs.field(default="text", validator=_one_of("text", "json"))
    #: JSON or TOML file of model prices that win over litellm's table.
    pricing_file: str | None = attrs.field(default=None, validator=_text)
    #: Where a charge (record_spend, commit) that cannot reach the store is kept
    #: until it can, so no recorded spend is lost. None: a per-user directory
    #: beside the embedded store's (``$XDG_DATA_HOME/coreason-budget/spool``);
    #: "off": no spool (such a charge only raises BudgetUnavailableError).
    spool_dir: str | None = attrs.field(default=None, validator=_text)

    def limit_nano(self, scope: str, window: str) -> int | None:
        """The default limit of *scope* ("user", ...) in *window*, nano-dollars; None: none."""
        usd: float | None = getattr(self, f"{_ADVERB[window]}_{scope}_limit_usd")
        return None if usd is None else to_nano(usd, maximum=MAX_LIMIT_NANO)

    def kept_windows(self) -> tuple[str, ...]:
        """
        The windows counted, narrowest first: the day, those a limit names,
        and those listed in ``windows``. Each costs every write one more hash.
        """
        kept = {"day", *_words(self.windows)}
        kept.update(w for w in WINDOWS for s in SCOPE_KINDS if self.limit_nano(s, w) is not None)
        return tuple(w for w in WINDOWS if w in kept)

    def calendar(self) -> Calendar:
        """Where the windows' periods begin and end."""
        return Calendar(self.timezone, self.week_start)

    def call_bound(self) -> float:
        """
        About the longest one store call can take: the wait for a pooled
        connection, every attempt's connect and reply timeouts, and a second
        to spare. What waiting for a call in flight (on close) is bounded by.
        """
        attempts = (self.retries + 1) * (self.connect_timeout + self.socket_timeout)
        return self.pool_timeout + attempts + 1.0

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        env_file: str | os.PathLike[str] | None = ".env",
    ) -> BudgetConfig:
        """
        Build the configuration from ``COREASON_BUDGET_*`` variables.

        Values in *env_file* (if it exists) fill in what the real environment
        does not set; the environment always wins. Empty values count as unset.
        """
        merged = env_values(environ, env_file)
        names = {a.name for a in attrs.fields(cls)}
        values: dict[str, str] = {}
        for key, raw in merged.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key.removeprefix(ENV_PREFIX).lower()
            if name in names:
                values[name] = raw
            elif name.upper() not in _KNOWN_ELSEWHERE:
                log.warning("Ignoring unknown configuration variable %s", key)

        def var(name: str) -> str:
            return f"{ENV_PREFIX}{name.upper()}={values.get(name)!r}"

        try:
            return _converter.structure(values, cls)
        except cattrs.ClassValidationError as e:
            with_notes, without = e.group_exceptions()
            problems = [
                f"{var(note.name)}: expected {_type_name(note.type)}" for _, note in with_notes
            ]
            # Validators run in the constructor, outside any attribute's note.
            problems += [
                f"{var(x.field)}: {x.reason}" for x in without if isinstance(x, _FieldError)
            ]
            raise ConfigError("; ".join(problems) or str(e)) from None


def env_values(
    environ: Mapping[str, str] | None = None,
    env_file: str | os.PathLike[str] | None = ".env",
) -> dict[str, str]:
    """
    The variables every face of the project reads its settings from: *environ*
    (default ``os.environ``) over *env_file* (if it exists). The environment
    wins; an empty value counts as unset. Values are stripped.
    """
    sources: list[Mapping[str, str | None]] = []
    if env_file is not None and os.path.exists(env_file):
        sources.append(dotenv_values(env_file))
    sources.append(os.environ if environ is None else environ)
    merged: dict[str, str] = {}
    for source in sources:  # later sources win, but an empty value never does
        merged.update((k, v.strip()) for k, v in source.items() if v is not None and v.strip())
    return merged


def _type_name(tp: Any) -> str:
    if float in typing.get_args(tp):  # float | None
        tp = float
    return {float: "a number", int: "a whole number", str: "text"}.get(tp, str(tp))


_converter = cattrs.Converter(detailed_validation=True)
