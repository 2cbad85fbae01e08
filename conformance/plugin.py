"""pytest plugin of the conformance suite (entry point ``pytest11: heteroserve_conformance``).

pytest loads this module in every run of every project that has heteroserve installed, so it
only adds command-line options. Everything else happens when ``--platform NAME`` is given:
the platform's plugins are loaded once (an unknown or unavailable platform is a one-line usage
error) and a :class:`~heteroserve.conformance.report.ReportCollector` is registered, which
turns test reports into the op x implementation table and, with ``--report DIR``, writes
``conformance-<platform>.json`` and ``.md`` into ``DIR``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPORTER_NAME = "heteroserve-conformance-reporter"
#: where pytest_configure leaves the ConformanceContext for the suite's conftest
CONTEXT_KEY: pytest.StashKey[object] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("heteroserve-conformance", "heteroserve conformance suite")
    group.addoption("--platform", default=None, metavar="NAME",
                    help="heteroserve platform the conformance suite tests "
                         "(pytest --pyargs heteroserve.conformance --platform NAME)")
    group.addoption("--report", default=None, metavar="DIR",
                    help="write conformance-<platform>.json and .md into DIR")
    group.addoption("--conformance-quick", action="store_true", default=False,
                    help="run a smaller shape grid (smoke test of a new plugin)")
    group.addoption("--conformance-probes", type=int, default=1, metavar="N",
                    help="claims probing: run the first N cases per test that each "
                         "implementation refuses anyway, reporting any that pass as "
                         "'supported but unclaimed' (0: off, e.g. where a refused case "
                         "could crash the device)")
    group.addoption("--conformance-performance", type=float, default=None, metavar="FRACTION",
                    help="run the optional performance tier: memory-bound ops must move "
                         "bytes at FRACTION (0-1] of the device's measured copy bandwidth "
                         "(off by default)")


def _targets_suite(config: pytest.Config) -> bool:
    """Whether the command line names this package (by module name or by path)."""
    suite = Path(__file__).resolve().parent
    for arg in config.args:
        base = str(arg).split("::")[0]
        if base == __package__ or base.startswith(f"{__package__}."):
            return True
        path = (config.invocation_params.dir / base).resolve()
        if path == suite or suite in path.parents:
            return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("platform", default=None)
    if not name:
        if _targets_suite(config):
            raise pytest.UsageError("the heteroserve conformance suite needs --platform NAME "
                                    "(pytest --pyargs heteroserve.conformance --platform cpu)")
        return
    from heteroserve.conformance.context import ConformanceSetupError, open_context
    from heteroserve.conformance.report import ReportCollector

    try:
        ctx = open_context(name, quick=bool(config.getoption("conformance_quick")),
                           probes_per_test=int(config.getoption("conformance_probes")),
                           performance_fraction=config.getoption("conformance_performance"))
    except ConformanceSetupError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[CONTEXT_KEY] = ctx
    config.pluginmanager.register(
        ReportCollector(ctx, config.getoption("report"), config), REPORTER_NAME)

