"""
``coreason-budget``: the command line for operators (argparse only, no extra dependencies).

Exit codes are the contract for scripts: 0 done (or allowed; for ``spend``
also "spooled": saved locally, recorded exactly once when the store is back,
so never repeat it without its idempotency key), 1 refused by a budget, 2 bad
input or configuration, 3 the store could not be asked (fail closed: treat it
as refused; nothing was saved to be charged later). Known errors are one line on stderr, never a
traceback. With ``--json`` (before or after the command) stdout carries exactly
one JSON document, shaped like the HTTP API's answers, for errors too (argument
errors aside: argparse reports those on stderr, exit 2).

Importing this module imports neither FastAPI nor uvicorn; ``serve`` does,
when it runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import IO, TYPE_CHECKING, Any

import attrs

from ._config import ENV_PREFIX, BudgetConfig
from ._manager import BudgetManager
from ._money import MAX_LIMIT_NANO, NANO_PER_USD, format_usd, to_nano
from ._usage import ScopeUsage
from ._windows import WINDOWS
from .exceptions import (
    BudgetError,
    BudgetExceededError,
    BudgetUnavailableError,
    ConfigError,
    InvalidInputError,
    UnknownModelError,
)

if TYPE_CHECKING:
    from ._demo import DemoResult

__all__ = ["main"]

PROG = "coreason-budget"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

Handler = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code instead of exiting, so tests can call it."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    handler: Handler = args.handler
    if handler is not _serve:
        # WARNING and up on stderr (an embedded store's first-use notice, say). Only `serve`
        # writes the log file; it configures logging itself, and basicConfig runs only once.
        logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        return handler(args)
    except BudgetExceededError as e:
        return _fail(args, EXIT_REFUSED, "budget_exceeded", e, e.to_json(), refusal(e))
    except BudgetUnavailableError as e:
        return _fail(args, EXIT_UNAVAILABLE, "budget_unavailable", e, e.to_json())
    except (ConfigError, InvalidInputError, UnknownModelError) as e:
        return _fail(args, EXIT_USAGE, "invalid", e)
    except BudgetError as e:
        return _fail(args, EXIT_REFUSED, "error", e)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# -- arguments ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LLM budgets per user, project, model and organisation, by the hour, day, "
        "week or month, from the shell.",
        epilog="Exit codes: 0 ok/allowed (or spend spooled: recorded once the store is back), "
        "1 refused by a budget, 2 bad input or configuration, 3 budget store unavailable "
        "(fail closed; nothing saved). The store and limits come from "
        f"{ENV_PREFIX}* variables (and .env) unless --redis-url is given.",
    )
    _common_options(parser, top=True)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _common_options(sub, top=False)
        sub.set_defaults(handler=handler)
        return sub

    sub = command("serve", _serve, "run the HTTP service (needs coreason-budget[server])")
    sub.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    sub.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")
    sub.add_argument(
        "--workers", type=_positive, default=1, help="worker processes (default: %(default)s)"
    )
    sub.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve without API keys: anyone who can reach the port can spend",
    )

    sub = command(
        "usage",
        _usage,
        "a user's spend, limit and remaining in the current period of a window (default: today)",
    )
    sub.add_argument("user", metavar="USER")
    sub.add_argument("--project", metavar="P", help="also show this project")
    _window_option(sub)

    sub = command(
        "report",
        _report,
        "one period's spend (default: today): total, top users, projects and models",
    )
    sub.add_argument(
        "--top", type=_positive, default=10, metavar="N", help="rows per list (default: 10)"
    )
    _window_option(sub)
    sub.add_argument(
        "--period",
        metavar="WHEN",
        help="report the period holding WHEN instead of the current one: a date (YYYY-MM-DD, "
        "its local midnight), a month (YYYY-MM, with --window month) or a datetime with a UTC "
        "offset (2026-11-29T14:00:00+00:00); a past period is kept for "
        f"{ENV_PREFIX}RETENTION_SECONDS after it ends",
    )

    sub = command(
        "set-limit",
        _set_limit,
        "override a limit in one window (default: daily), shared by every worker "
        "(USD 'none' removes the override)",
    )
    sub.add_argument("scope", metavar="SCOPE", choices=("user", "project", "model", "global"))
    sub.add_argument(
        "entity",
        metavar="ID",
        help="user or project id, or model name; '-' (or nothing) for global",
    )
    sub.add_argument("usd", metavar="USD", nargs="?", help="limit in USD, or 'none'")
    _window_option(sub, "the window the limit is for")

    sub = command(
        "check",
        _check,
        "would COST fit every budget now (each window's current period)? exit 0 allowed, "
        "1 refused (writes nothing)",
    )
    sub.add_argument("user", metavar="USER")
    sub.add_argument("cost", metavar="COST", help="estimated cost in USD")
    sub.add_argument("--project", metavar="P")

    sub = command("spend", _spend, "record money already spent (recorded even past a limit)")
    sub.add_argument("user", metavar="USER")
    sub.add_argument("cost", metavar="COST", help="cost in USD")
    sub.add_argument("--project", metavar="P")
    sub.add_argument("--model", metavar="M")
    sub.add_argument(
        "--idempotency-key", metavar="K", help="record once however often the command is retried"
    )

    sub = command(
        "replay-spool",
        _replay_spool,
        "record the charges spooled locally while the store was unreachable, from every "
        "process's spool file in the directory (idempotent: nothing is charged twice); "
        "exit 3 if the store could not take them all",
    )
    sub.add_argument(
        "--spool-dir",
        metavar="DIR",
        help=f"spool directory (default: {ENV_PREFIX}SPOOL_DIR, else the per-user one)",
    )

    sub = command(
        "demo",
        _demo,
        "simulate many users and threads making priced LLM calls on small budgets, then prove "
        "that no limit was exceeded (embedded store in a temporary folder unless --redis-url)",
    )
    sub.add_argument("--calls", type=_positive, metavar="N", help="calls (default: 2000)")
    sub.add_argument("--threads", type=_threads, metavar="T", help="threads (default: 16)")
    sub.add_argument("--seed", type=int, default=7, metavar="S", help="workload seed (default: 7)")
    sub.add_argument("--quick", action="store_true", help="300 calls, 8 threads, no latency")
    return parser


def _common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--redis-url`` and ``--json``, accepted before the command and after it."""
    # SUPPRESS under a command: an option given before the command is not reset by the
    # subparser's own default.
    parser.add_argument(
        "--redis-url",
        default=None if top else argparse.SUPPRESS,
        metavar="URL",
        help=f"budget store, overriding {ENV_PREFIX}REDIS_URL (redis://, embedded://PATH, ...)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print one JSON document on stdout (also for errors)",
    )


def _window_option(parser: argparse.ArgumentParser, help: str = "the budget window") -> None:
    parser.add_argument(
        "--window",
        choices=WINDOWS,
        default="day",
        help=f"{help} (default: %(default)s), in {ENV_PREFIX}TIMEZONE; a window other than "
        f"the day must be kept (a limit in it configured, or it listed in {ENV_PREFIX}WINDOWS)",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _threads(text: str) -> int:
    value = _positive(text)
    if value > 512:
        raise argparse.ArgumentTypeError(f"at most 512 threads, got {value}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {value}")
    return value


def _amount(text: str, what: str) -> Decimal:
    """A USD amount as typed (``0.05`` or ``$0.05``); Decimal, so no float rounding on the way."""
    try:
        return Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise InvalidInputError(f"{what} must be a number of USD, got {text!r}") from None


def _manager(args: argparse.Namespace) -> BudgetManager:
    config = BudgetConfig.from_env()
    if args.redis_url is not None:
        try:
            config = attrs.evolve(config, redis_url=args.redis_url)
        except ConfigError as e:
            raise ConfigError(f"--redis-url: {e}".replace(": redis_url:", "")) from None
    return BudgetManager(config)


# -- commands ----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .server import (
            LOG_PATH_OFF,
            UVICORN_LOG_CONFIG,
            ServerSettings,
            configure_logging,
            multiprocess_metrics,
        )
    except ImportError as e:
        raise ConfigError(
            f"serve needs the server extra ({e.name} is not installed): "
            "pip install 'coreason-budget[server]'"
        ) from None
    # Both checks here, once, before any worker starts: a worker that dies at start-up
    # makes uvicorn restart it forever, and an unauthenticated service must be asked for.
    ServerSettings.from_env(insecure_no_auth=True if args.insecure_no_auth else None)
    if args.redis_url is not None:
        # Workers read their configuration from the environment, which they inherit.
        os.environ[ENV_PREFIX + "REDIS_URL"] = args.redis_url
    if args.insecure_no_auth:
        os.environ[ENV_PREFIX + "INSECURE_NO_AUTH"] = "1"
    config = BudgetConfig.from_env()
    configure_logging(config.log_path, config.log_format)
    log = logging.getLogger("coreason_budget.server")
    # Opening the store here turns a missing store or extra into exit 2 before any worker
    # starts. An unreachable store is only a warning: it may come up after us (compose,
    # Kubernetes), and until it does /health says 503 and every request is refused.
    # Held open while serving, which also keeps an embedded store's server up between workers.
    # A sync manager: it only pings and holds the store, outside any event loop; each worker
    # serves on an AsyncBudgetManager of its own (app_from_env), opened on its own loop.
    with BudgetManager(config) as budget, multiprocess_metrics(args.workers):
        try:
            budget.ping()
        except BudgetUnavailableError as e:
            log.warning("%s; requests are refused until it answers", e)
        log.info(
            "Serving on %s:%d with %d worker(s); logging to stderr%s",
            args.host,
            args.port,
            args.workers,
            "" if config.log_path == LOG_PATH_OFF else f" and {config.log_path}",
        )
        try:
            uvicorn.run(
                "coreason_budget.server:app_from_env",
                factory=True,
                host=args.host,
                port=args.port,
                workers=args.workers,
                log_config=UVICORN_LOG_CONFIG,
                access_log=False,
            )
        except SystemExit as e:
            # uvicorn exits 3 when it cannot start (the port is taken, say): here 3 means
            # "store unavailable", so a start-up failure is the configuration's (2).
            if e.code in (0, None):
                return EXIT_OK
            raise ConfigError(
                f"the service could not start on {args.host}:{args.port} (see the log above: "
                "is the port already in use?)"
            ) from None
    return EXIT_OK


def _usage(args: argparse.Namespace) -> int:
    with _manager(args) as budget:
        usage = budget.usage(args.user, args.project, window=args.window)
        config = budget.config
    if args.json:
        return _print_json({scope: u.to_json() for scope, u in usage.items()})
    header = ("scope", "id", "spent", "limit", "remaining", "used")
    rows = [_scope_row(u) for u in usage.values()]
    lines = []
    resets_at = next(iter(usage.values())).resets_at
    if resets_at is not None:
        label = config.calendar().period(args.window, _ms(resets_at) - 1).label
        lines.append(
            f"Spend in {args.window} {label} ({config.timezone}); resets at "
            f"{resets_at.isoformat()} ({_from_now(resets_at)})"
        )
    lines += table(header, rows, right=(2, 3, 4, 5))
    print("\n".join(lines))
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    period = None if args.period is None else _period(args.period, args.window)
    with _manager(args) as budget:
        try:
            r = budget.report(args.top, window=args.window, period=period)
        except ValueError as e:  # a period too near year 1 or 9999 for the calendar
            if isinstance(e, BudgetError) or period is None:
                raise
            raise InvalidInputError(f"--period {args.period}: {e}") from None
        zone = budget.config.timezone
    if args.json:
        return _print_json(r.to_json())
    total = r.total
    limit = _ADVERB.get(r.window, r.window) + " limit"
    spent = usd(total.spent_nano)
    if total.limit_nano is None:
        summary = f"{spent} (no global {limit})"
    else:
        summary = f"{spent} of {usd(total.limit_nano)} global {limit} ({_percent(total)} used)"
    now = datetime.datetime.now(datetime.UTC)
    if now < r.starts_at:
        when = f"starts {_from_now(r.starts_at)}"
    elif now < r.resets_at:
        when = f"resets {_from_now(r.resets_at)}"
    else:
        when = f"ended {_duration(int((now - r.resets_at).total_seconds()))} ago"
    lines = [
        f"Spend in {r.window} {r.period} ({zone}): {summary}",
        f"From {r.starts_at.isoformat()} to {r.resets_at.isoformat()} ({when})",
    ]
    header = ("id", "spent", "limit", "remaining", "used")
    for title, scopes in (("users", r.users), ("projects", r.projects), ("models", r.models)):
        lines += ["", f"Top {title}:"]
        rows = [_scope_row(u)[1:] for u in scopes]
        lines += table(header, rows, right=(1, 2, 3, 4)) if rows else ["  (none in this period)"]
    print("\n".join(lines))
    return EXIT_OK


def _set_limit(args: argparse.Namespace) -> int:
    scope, entity, text, window = args.scope, args.entity, args.usd, args.window
    if text is None:
        if scope != "global":
            raise InvalidInputError(f"set-limit {scope} needs an ID and a USD amount (or 'none')")
        entity, text = "-", entity  # `set-limit global 5000`
    if (scope == "global") != (entity == "-"):
        raise InvalidInputError(
            "the global scope takes '-' as its ID"
            if scope == "global"
            else f"'-' is not a {scope} id; it stands for the global scope only"
        )
    limit = None if text.strip().lower() == "none" else _amount(text, "USD")
    entity_id = None if scope == "global" else entity
    with _manager(args) as budget:
        budget.set_limit(scope, entity_id, limit, window)
        default = budget.config.limit_nano(scope, window)
    if args.json:
        return _print_json(
            {
                "status": "updated",
                "scope": scope,
                "entity_id": entity_id,
                "window": window,
                "limit_usd": None if limit is None else float(limit),
            }
        )
    who = scope if entity_id is None else f"{scope} {entity_id}"
    adverb = _ADVERB[window]
    if limit is None:
        applies = (
            f"no {adverb} limit applies (none is configured)"
            if default is None
            else f"the configured default {adverb} limit ({format_usd(default)}) applies"
        )
        print(f"{who}: {adverb} override removed; {applies}")
    else:
        amount = format_usd(to_nano(limit, maximum=MAX_LIMIT_NANO))
        print(f"{who}: {adverb} limit set to {amount}")
    return EXIT_OK


def _check(args: argparse.Namespace) -> int:
    cost = _amount(args.cost, "COST")
    who = f"user {args.user}" + (f", project {args.project}" if args.project else "")
    with _manager(args) as budget:
        try:
            budget.check_availability(args.user, cost, args.project)
        except BudgetExceededError as e:
            # A refusal is this command's answer, not a failure: stdout, like "allowed".
            if args.json:
                _print_json({"allowed": False, "detail": str(e), **e.to_json()})
            else:
                print(f"refused: {refusal(e)}")
            return EXIT_REFUSED
        windows = budget.config.kept_windows()
    if args.json:
        return _print_json(
            {
                "allowed": True,
                "user_id": args.user,
                "project_id": args.project,
                "estimated_cost_usd": float(cost),
            }
        )
    print(
        f"allowed: {format_usd(to_nano(cost))} fits the current budgets ({who}; "
        f"{_words(windows)} {'window' if len(windows) == 1 else 'windows'})"
    )
    return EXIT_OK


def _spend(args: argparse.Namespace) -> int:
    cost = _amount(args.cost, "COST")
    with _manager(args) as budget:
        receipt = budget.record_spend(
            args.user, cost, args.project, args.model, args.idempotency_key
        )
    if args.json:
        return _print_json(
            {
                **receipt.to_json(),
                "user_id": args.user,
                "project_id": args.project,
                "model": args.model,
                "cost_usd": float(cost),
            }
        )
    extra = "".join(
        f", {name} {value}"
        for name, value in (("project", args.project), ("model", args.model))
        if value is not None
    )
    what = f"{format_usd(to_nano(cost))} for user {args.user}{extra}"
    key = receipt.idempotency_key
    if receipt.status == "spooled":
        print(
            f"spooled {what}: the store is unreachable; saved locally and recorded exactly "
            f"once when it is back (idempotency key {key}; retry only with "
            f"--idempotency-key {key})"
        )
    elif receipt.status == "duplicate":
        print(f"already recorded {what} (idempotency key {key}): nothing charged again")
    else:
        print(f"recorded {what} (idempotency key {key})")
    return EXIT_OK


def _replay_spool(args: argparse.Namespace) -> int:
    config = BudgetConfig.from_env()
    if args.spool_dir is not None:
        config = attrs.evolve(config, spool_dir=args.spool_dir)
    if args.redis_url is not None:
        try:
            config = attrs.evolve(config, redis_url=args.redis_url)
        except ConfigError as e:
            raise ConfigError(f"--redis-url: {e}".replace(": redis_url:", "")) from None
    with BudgetManager(config) as budget:
        summary = budget.replay_spool()
    if args.json:
        _print_json(
            {"status": "replayed" if summary.error is None else "partial", **summary.to_json()}
        )
    else:
        print(
            f"replayed {summary.replayed} spooled charge(s) from {summary.files} file(s): "
            f"{summary.recorded} recorded now, {summary.duplicates} already recorded, "
            f"{summary.expired} too old to record, {summary.rejected} refused"
        )
        if summary.remaining:
            print(f"{summary.remaining} charge(s) still spooled")
        if summary.busy_files:
            print(f"{summary.busy_files} file(s) held by running processes (they replay their own)")
        for other in summary.other_stores:
            print(f"left alone, for another store or prefix: {other}")
        if summary.torn_lines:
            print(f"{summary.torn_lines} torn last line(s) skipped (writes cut short by a crash)")
    if summary.quarantined:
        # On stderr too with --json: a person must look at these, nothing will replay them.
        unreadable = summary.quarantined - summary.rejected
        print(
            f"{PROG}: {summary.quarantined} line(s) quarantined ({summary.rejected} refused by "
            f"the store, {unreadable} not a valid entry), never replayed, kept in: "
            + ", ".join(summary.quarantine_files),
            file=sys.stderr,
        )
    if summary.error is not None:
        print(f"{PROG}: stopped: {summary.error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from . import _demo

    calls = args.calls or (300 if args.quick else 2000)
    threads = args.threads or (8 if args.quick else 16)
    # A bar is for people watching; piped or captured output gets only the summary.
    progress = _ProgressBar(sys.stderr) if sys.stderr.isatty() and not args.json else None
    if not args.json:
        print(
            f"Simulating {calls} LLM calls by {len(_demo.TEAM)} users in "
            f"{len(set(_demo.TEAM.values()))} projects on {threads} threads...",
            file=sys.stderr,
        )
    result = _demo.run(
        calls=calls,
        threads=threads,
        seed=args.seed,
        redis_url=args.redis_url,
        latency=not args.quick,
        progress=progress,
    )
    if args.json:
        _print_json(result.to_json())
    else:
        print(format_demo(result))
    return EXIT_OK if result.ok else EXIT_REFUSED


# -- output ------------------------------------------------------------------------------------


def usd(nano: int) -> str:
    """
    ``$1,234.5678``: at most 4 decimals (at least 2), rounded *down*, so a
    display never shows more spent than a limit allows. ``--json`` is exact.
    """
    value = (Decimal(nano) / NANO_PER_USD).quantize(Decimal("0.0001"), rounding=ROUND_FLOOR)
    whole, _, frac = f"{value:,.4f}".partition(".")
    frac = frac.rstrip("0").ljust(2, "0")
    return f"${whole}.{frac}"


#: What a scope without a limit shows in a table's limit column ("-" for remaining and used).
NO_LIMIT = "no limit"
_ADVERB = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly"}


def _percent(u: ScopeUsage) -> str:
    if not u.limit_nano:  # no limit, or a zero one
        return "-"
    # Floored too: 99.99% must not read as 100.0% while there is still room.
    tenths = u.spent_nano * 1000 // u.limit_nano
    return f"{tenths // 10}.{tenths % 10}%"


def _scope_row(u: ScopeUsage) -> tuple[str, ...]:
    return (
        u.scope,
        u.entity_id or "-",
        usd(u.spent_nano),
        NO_LIMIT if u.limit_nano is None else usd(u.limit_nano),
        "-" if u.remaining_nano is None else usd(u.remaining_nano),
        _percent(u),
    )


def refusal(e: BudgetExceededError) -> str:
    """
    A refusal in a line: ``user alice would exceed its monthly limit: spent $9.50 of
    $10.00, requested $1.00; resets at 2026-12-01T05:00:00+00:00 (in 3d 12h)``.
    """
    who = "the global budget" if e.entity_id is None else f"{e.scope} {e.entity_id}"
    text = (
        f"{who} would exceed its {_ADVERB.get(e.window, e.window)} limit: spent "
        f"{format_usd(e.spent_nano)} of {format_usd(e.limit_nano)}, requested "
        f"{format_usd(e.requested_nano)}"
    )
    if e.resets_at is not None:
        text += f"; resets at {e.resets_at.isoformat()}"
        if e.retry_after_seconds is not None:
            text += f" (in {_duration(e.retry_after_seconds)})"
    return text


def _duration(seconds: int) -> str:
    """``3d 12h``, ``5h 7m``, ``4m 10s``, ``9s``: the two largest units (the second if not 0)."""
    seconds = max(seconds, 0)
    for size, unit, smaller, small_unit in (
        (86400, "d", 3600, "h"),
        (3600, "h", 60, "m"),
        (60, "m", 1, "s"),
    ):
        if seconds >= size:
            big, rest = divmod(seconds, size)
            small = rest // smaller
            return f"{big}{unit}" + (f" {small}{small_unit}" if small else "")
    return f"{seconds}s"


def _from_now(moment: datetime.datetime) -> str:
    """``in 3d 12h``, by this machine's clock (for display: the store's decides)."""
    left = (moment - datetime.datetime.now(datetime.UTC)).total_seconds()
    return f"in {_duration(max(int(left), 0))}"


def _words(items: Sequence[str]) -> str:
    """``day``, ``day and month``, ``hour, day and month``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _ms(moment: datetime.datetime) -> int:
    return (moment - _EPOCH) // datetime.timedelta(milliseconds=1)


_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_MONTH = re.compile(r"([0-9]{4})-([0-9]{2})", re.ASCII)


def _period(text: str, window: str) -> datetime.date | datetime.datetime:
    """``--period``: a date, a month (with ``--window month``) or an aware datetime."""
    text = text.strip()
    wrong = (
        f"--period must be a date (YYYY-MM-DD), a month (YYYY-MM, with --window month) or "
        f"a datetime with a UTC offset (2026-11-29T14:00:00+00:00), got {text!r}"
    )
    try:
        if _DATE.fullmatch(text):
            return datetime.date.fromisoformat(text)
        if month := _MONTH.fullmatch(text):
            if window != "month":
                raise InvalidInputError(
                    f"--period {text}: a month names a period with --window month only "
                    f"(this is --window {window}); give a date, e.g. {text}-01"
                )
            return datetime.date(int(month[1]), int(month[2]), 1)
        if len(text) > 10 and text[10] in "T ":
            moment = datetime.datetime.fromisoformat(text)
            if moment.utcoffset() is None:
                raise InvalidInputError(
                    f"--period {text}: a datetime needs a UTC offset (e.g. {text}+00:00, or Z), "
                    "so that it names one instant"
                )
            return moment
    except ValueError as e:
        if isinstance(e, InvalidInputError):
            raise
        raise InvalidInputError(f"{wrong} ({e})") from None
    raise InvalidInputError(wrong)


def table(
    header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> list[str]:
    """Plain aligned columns (numbers right-aligned): readable in any terminal, log or email."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_demo(result: DemoResult) -> str:
    """The demo's summary table and its closing proof."""
    header = ("scope", "id", "limit", "spent", "used", "allowed", "blocked")
    rows = [
        (
            s.scope,
            s.entity_id or "-",
            NO_LIMIT if s.limit_nano is None else usd(s.limit_nano),
            usd(s.spent_nano),
            _percent(ScopeUsage(s.scope, s.entity_id, s.spent_nano, s.limit_nano)),
            str(s.allowed),
            str(s.blocked),
        )
        for s in result.scopes
    ]
    committed = result.allowed - result.failed
    lines = [
        f"{result.calls} calls on {result.threads} threads (seed {result.seed}) in "
        f"{result.seconds:.2f}s, priced from {result.prices_from}:",
        f"{result.allowed} allowed ({result.failed} failed at the provider and were released), "
        f"{result.blocked} blocked before they were made.",
        "",
        *table(header, rows, right=(2, 3, 4, 5, 6)),
        "",
        "Spend by model: " + ", ".join(f"{m} {usd(n)}" for m, n in result.models),
        "",
    ]
    over = [s for s in result.scopes if not s.within_limit]
    if over:
        names = ", ".join(f"{s.scope} {s.entity_id or ''}".strip() for s in over)
        lines.append(f"FAILED: over their daily limit: {names}")
    else:
        lines.append(
            f"OK: no limit was exceeded: in all {len(result.scopes)} scopes above, spent <= limit "
            "(compared exactly, in integer nano-dollars, from the store's own report)."
        )
    if result.ledger_matches:
        lines.append(
            f"OK: the ledger's total equals the sum of the {committed} committed costs, "
            f"{result.ledger_nano:,} nano-dollars, exactly."
        )
    else:
        lines.append(
            f"FAILED: the ledger holds {result.ledger_nano:,} nano-dollars but the threads "
            f"committed {result.committed_nano:,}."
        )
    lines.append(
        "The proof is exact because each simulated cost is capped at its estimate. A real "
        "provider can bill more than was estimated; that money is recorded in full and can "
        "take a scope past its limit."
    )
    return "\n".join(lines)


class _ProgressBar:
    """``[#####.....]  50% 1000/2000``, redrawn in place; the demo calls it under its lock."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        percent = done * 100 // total
        if percent == self.last:  # redraw at most 101 times, however many calls
            return
        self.last = percent
        filled = self.width * done // total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {percent:3d}% {done}/{total}")
        if done == total:
            self.stream.write("\n")
        self.stream.flush()


def _print_json(document: dict[str, Any]) -> int:
    print(json.dumps(document, indent=2))
    return EXIT_OK


def _fail(
    args: argparse.Namespace,
    code: int,
    kind: str,
    error: Exception,
    extra: dict[str, Any] | None = None,
    message: str | None = None,
) -> int:
    print(f"{PROG}: {error if message is None else message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": kind, "detail": str(error), **(extra or {})}, indent=2))
    return code
