"""
What installing and importing the package gives: its version and metadata, and
an import that works where there is no ``fcntl`` (Windows), simulated here.
"""

from __future__ import annotations

import configparser
import importlib.metadata
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import coreason_budget
from coreason_budget import BudgetConfig, BudgetManager
from coreason_budget.server import ServerSettings, create_app

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "coreason_budget"


def setup_cfg() -> configparser.ConfigParser:
    config = configparser.ConfigParser(interpolation=None)
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config


class TestPackaging:
    def test_version_is_the_installed_distributions(self) -> None:
        version = importlib.metadata.version("coreason-budget")
        assert coreason_budget.__version__ == version
        assert version == setup_cfg()["metadata"]["version"]

    def test_the_version_is_written_once(self) -> None:
        """setup.cfg holds it; no module of the package repeats it."""
        version = setup_cfg()["metadata"]["version"]
        assert (ROOT / "setup.cfg").read_text(encoding="utf-8").count(version) == 1
        for path in PACKAGE.rglob("*.py"):
            assert f'"{version}"' not in path.read_text(encoding="utf-8"), path

    def test_the_service_reports_the_version(self) -> None:
        manager = BudgetManager(BudgetConfig(redis_url="memory://"))
        try:
            app = create_app(manager, ServerSettings(api_keys=frozenset({"key"})))
            assert app.version == coreason_budget.__version__
        finally:
            manager.close()

    def test_project_urls_and_classifiers(self) -> None:
        metadata = setup_cfg()["metadata"]
        urls = dict(line.split(" = ", 1) for line in metadata["project_urls"].strip().splitlines())
        assert set(urls) >= {"Homepage", "Source", "Issues", "Changelog"}
        assert all(url.startswith("https://") for url in urls.values())
        classifiers = metadata["classifiers"].strip().splitlines()
        # The Python versions the tests run on, and the one system they run on.
        tested = (
            f"Programming Language :: Python :: {sys.version_info.major}.{sys.version_info.minor}"
        )
        assert tested in classifiers
        assert "Operating System :: POSIX :: Linux" in classifiers
        assert "Operating System :: OS Independent" not in classifiers  # the spool needs flock
        minimum = re.fullmatch(r">=(\d+\.\d+)", setup_cfg()["options"]["python_requires"])
        assert minimum is not None
        assert f"Programming Language :: Python :: {minimum[1]}" in classifiers


def without_fcntl(code: str) -> subprocess.CompletedProcess[str]:
    """Run *code* in an interpreter that, like Windows's, has no fcntl and no fork."""
    prelude = textwrap.dedent(
        """
        import os, sys
        sys.modules["fcntl"] = None  # import fcntl: ImportError
        del os.register_at_fork, os.fork
        """
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


class TestWithoutFcntl:
    """Windows: the package imports and works on a redis:// store; the spool and the
    embedded store, which need flock, refuse to start with a message saying what to do."""

    def test_import_and_a_redis_store_without_spool(self, redis_url: str) -> None:
        run = without_fcntl(
            f"""
            import coreason_budget, coreason_budget.cli, coreason_budget.client
            import coreason_budget.server
            from coreason_budget import BudgetConfig, BudgetManager
            config = BudgetConfig(redis_url={redis_url!r}, spool_dir="off", key_prefix="nofcntl")
            with BudgetManager(config) as budget:
                print(budget.record_spend("user_1", 0.25).status)
                print(budget.usage("user_1")["user"].spent_usd)
            print(coreason_budget.__version__)
            """
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines() == ["recorded", "0.25", coreason_budget.__version__]

    def test_the_spool_and_the_embedded_store_refuse_clearly(
        self, redis_url: str, tmp_path: Path
    ) -> None:
        run = without_fcntl(
            f"""
            from coreason_budget import BudgetConfig, BudgetManager, ConfigError
            for config in (
                BudgetConfig(redis_url={redis_url!r}),  # the default spool
                BudgetConfig(redis_url={redis_url!r}, spool_dir={str(tmp_path)!r}),
                BudgetConfig(redis_url="embedded://{tmp_path}/ledger.rdb", spool_dir="off"),
                BudgetConfig(spool_dir="off"),  # the default store: embedded
            ):
                try:
                    BudgetManager(config).close()
                except ConfigError as e:
                    print(e)
                else:
                    print("started")
            """
        )
        assert run.returncode == 0, run.stderr
        spool, spool_dir, embedded, default = run.stdout.splitlines()
        assert spool == spool_dir
        assert spool.startswith("The local spool needs POSIX file locks")
        assert "COREASON_BUDGET_SPOOL_DIR=off" in spool
        assert embedded.startswith("The embedded store (embedded://) needs POSIX file locks")
        assert default.startswith("No budget store is configured, and the embedded store")
        for message in (embedded, default):
            assert "set COREASON_BUDGET_REDIS_URL (redis_url) to redis://HOST:PORT" in message
        assert not list(tmp_path.iterdir())  # nothing was created
