"""
The things being compared, each doing the same job over three scopes (user, project, global).

* ``ours``: :class:`coreason_budget.BudgetManager`.
* ``floor``: one EVALSHA of a trivial registered script (``return 1``) per round
  trip ours needs (two for reserve+commit), through the same kind of redis-py
  pool ours uses, built from the same kwargs (``_store._pool_kwargs``). No
  Python-side budget logic can be cheaper than this.
* ``limits``: the `limits` library's fixed window with cost, one item per
  scope, what a user might reach for today. Per call it does what a
  reasonable user of it would: ``test()`` every scope before the LLM call,
  ``hit()`` every scope with the actual cost after it. That is not atomic
  across scopes (nor between test and hit), and it cannot refund.
* ``limits-hit-each`` (contention only): ``hit()`` every scope up front and
  admit only if all three said yes. Each hit is atomic, so it never
  overspends, but a refused call stays charged in the scopes that said yes.
* ``plain``: the home-made guard: GET each scope's counter, compare, then
  INCRBYFLOAT each scope after the call.

Every subject offers the four benchmarked operations (``check``,
``reserve_commit``, ``record_spend``, ``usage``, each taking a user id) and, for
the contention run, ``admit(user, cost)`` (a token or None) and
``settle(token, user, cost)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import redis

from coreason_budget import BudgetConfig, BudgetExceededError, BudgetManager
from coreason_budget._store import _pool_kwargs

OPS = ("check", "reserve_commit", "record_spend", "usage")
OP_TITLES = {
    "check": "check_availability",
    "reserve_commit": "reserve + commit",
    "record_spend": "record_spend",
    "usage": "usage",
}
#: Round trips the floor spends per operation: ours makes one EVALSHA per call.
FLOOR_CALLS = {"check": 1, "reserve_commit": 2, "record_spend": 1, "usage": 1}

PROJECT = "p1"
COST = 0.001  # check_availability estimate, record_spend cost
ESTIMATE = 0.01  # reserve
ACTUAL = 0.005  # commit
#: Limits high enough that nothing is refused while measuring speed.
HUGE = (9e6, 9e6, 9e6)
MICRO = 1_000_000


def micro(usd: float) -> int:
    """limits counts in integers: micro-dollars keep every amount here exact."""
    return round(usd * MICRO)


def config(url: str, limits_usd: tuple[float, float, float] = HUGE) -> BudgetConfig:
    user, project, everyone = limits_usd
    return BudgetConfig(
        redis_url=url,
        daily_user_limit_usd=user,
        daily_project_limit_usd=project,
        daily_global_limit_usd=everyone,
        key_prefix="bench",
    )


def same_pool_client(cfg: BudgetConfig) -> redis.Redis:
    """A client on the same kind of pool, with the same kwargs, as a manager gets."""
    assert cfg.redis_url is not None
    pool = redis.BlockingConnectionPool.from_url(cfg.redis_url, **_pool_kwargs(cfg))
    return redis.Redis(connection_pool=pool)


class Ours:
    name = "ours"

    def __init__(self, cfg: BudgetConfig) -> None:
        self.manager = BudgetManager(cfg)

    def check(self, user: str) -> None:
        self.manager.check_availability(user, COST, project_id=PROJECT)

    def reserve_commit(self, user: str) -> None:
        self.manager.reserve(user, ESTIMATE, project_id=PROJECT).commit(ACTUAL)

    def record_spend(self, user: str) -> None:
        self.manager.record_spend(user, COST, project_id=PROJECT)

    def usage(self, user: str) -> Any:
        return self.manager.usage(user, PROJECT)

    def admit(self, user: str, cost: float) -> Any:
        try:
            return self.manager.reserve(user, cost, project_id=PROJECT)
        except BudgetExceededError:
            return None

    def settle(self, token: Any, user: str, cost: float) -> None:
        token.commit(cost)

    def project_spent_usd(self) -> float:
        return self.manager.usage("u0", PROJECT)["project"].spent_usd

    def close(self) -> None:
        self.manager.close()


class Floor:
    name = "floor"

    def __init__(self, cfg: BudgetConfig) -> None:
        self.client = same_pool_client(cfg)
        self.script = self.client.register_script("return 1")

    def check(self, user: str) -> None:
        self.script()

    def reserve_commit(self, user: str) -> None:
        self.script()
        self.script()

    record_spend = check
    usage = check

    def close(self) -> None:
        self.client.connection_pool.disconnect()


class LimitsPeer:
    name = "limits"

    def __init__(self, cfg: BudgetConfig) -> None:
        from limits import RateLimitItemPerDay
        from limits.storage import RedisStorage
        from limits.strategies import FixedWindowRateLimiter

        assert cfg.redis_url is not None
        self.client = same_pool_client(cfg)
        storage = RedisStorage(cfg.redis_url, connection_pool=self.client.connection_pool)
        self.limiter = FixedWindowRateLimiter(storage)
        self.user_item = RateLimitItemPerDay(micro(cfg.daily_user_limit_usd), namespace="user")
        self.project_item = RateLimitItemPerDay(
            micro(cfg.daily_project_limit_usd), namespace="project"
        )
        self.global_item = RateLimitItemPerDay(
            micro(cfg.daily_global_limit_usd), namespace="global"
        )

    def scopes(self, user: str) -> tuple[tuple[Any, str], ...]:
        return ((self.user_item, user), (self.project_item, PROJECT), (self.global_item, "all"))

    def fits(self, user: str, cost: int) -> bool:
        return all(self.limiter.test(item, ident, cost=cost) for item, ident in self.scopes(user))

    def charge(self, user: str, cost: int) -> list[bool]:
        return [self.limiter.hit(item, ident, cost=cost) for item, ident in self.scopes(user)]

    def check(self, user: str) -> bool:
        return self.fits(user, micro(COST))

    def reserve_commit(self, user: str) -> None:
        if self.fits(user, micro(ESTIMATE)):
            self.charge(user, micro(ACTUAL))

    def record_spend(self, user: str) -> None:
        self.charge(user, micro(COST))

    def usage(self, user: str) -> Any:
        return [self.limiter.get_window_stats(item, ident) for item, ident in self.scopes(user)]

    def admit(self, user: str, cost: float) -> Any:
        return True if self.fits(user, micro(cost)) else None

    def settle(self, token: Any, user: str, cost: float) -> None:
        self.charge(user, micro(cost))

    def project_spent_usd(self) -> float:
        # get_window_stats() clips at the limit; the raw counter shows any excess.
        return int(self.limiter.storage.get(self.project_item.key_for(PROJECT))) / MICRO

    def close(self) -> None:
        self.client.connection_pool.disconnect()


class LimitsHitEach(LimitsPeer):
    name = "limits-hit-each"

    def admit(self, user: str, cost: float) -> Any:
        return True if all(self.charge(user, micro(cost))) else None

    def settle(self, token: Any, user: str, cost: float) -> None:
        pass  # charged up front


class PlainPeer:
    name = "plain"

    def __init__(self, cfg: BudgetConfig) -> None:
        self.client = same_pool_client(cfg)
        self.limits = (
            cfg.daily_user_limit_usd,
            cfg.daily_project_limit_usd,
            cfg.daily_global_limit_usd,
        )

    @staticmethod
    def keys(user: str) -> tuple[str, str, str]:
        day = time.strftime("%Y-%m-%d", time.gmtime())
        return (f"plain:{day}:u:{user}", f"plain:{day}:p:{PROJECT}", f"plain:{day}:g")

    def fits(self, user: str, cost: float) -> bool:
        for key, limit in zip(self.keys(user), self.limits, strict=True):
            # 1e-9 of slack so that float sums of cents are not refused a cent early.
            if float(self.client.get(key) or 0) + cost > limit + 1e-9:
                return False
        return True

    def charge(self, user: str, cost: float) -> None:
        for key in self.keys(user):
            self.client.incrbyfloat(key, cost)

    def check(self, user: str) -> bool:
        return self.fits(user, COST)

    def reserve_commit(self, user: str) -> None:
        if self.fits(user, ESTIMATE):
            self.charge(user, ACTUAL)

    def record_spend(self, user: str) -> None:
        self.charge(user, COST)

    def usage(self, user: str) -> Any:
        return [float(self.client.get(key) or 0) for key in self.keys(user)]

    def admit(self, user: str, cost: float) -> Any:
        return True if self.fits(user, cost) else None

    def settle(self, token: Any, user: str, cost: float) -> None:
        self.charge(user, cost)

    def project_spent_usd(self) -> float:
        return float(self.client.get(self.keys("u0")[1]) or 0)

    def close(self) -> None:
        self.client.connection_pool.disconnect()


KINDS: dict[str, Callable[[BudgetConfig], Any]] = {
    "ours": Ours,
    "floor": Floor,
    "limits": LimitsPeer,
    "plain": PlainPeer,
    "limits-hit-each": LimitsHitEach,
}
#: What the speed tables compare (limits-hit-each is a contention variant only).
COMPARED = ("ours", "floor", "limits", "plain")


@attrs.define
class Subjects:
    """One instance of each compared subject on one server, shared by every thread."""

    by_name: dict[str, Any]

    def op(self, subject: str, op: str, user: str) -> Callable[[], object]:
        method = getattr(self.by_name[subject], op)
        return lambda: method(user)

    def close(self) -> None:
        for subject in self.by_name.values():
            subject.close()


def build_subjects(url: str, names: tuple[str, ...] = COMPARED) -> Subjects:
    cfg = config(url)
    return Subjects({name: KINDS[name](cfg) for name in names})
