"""Collection-time glue of the conformance suite (loaded only when the suite is collected).

Expands every ``@conformance(...)`` test into (op, implementation, case) parameters, tags
each item with ``conf_op`` / ``conf_impl`` / ``conf_kind`` / ``conf_dtype`` /
``conf_provider`` / ``conf_tier`` user properties for the report,
and provides the ``ctx`` (the platform under test) and ``conf`` fixtures.
"""

from __future__ import annotations

import pytest

from heteroserve.conformance.context import DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import MARKER, ConfParam, build_params
from heteroserve.conformance.plugin import CONTEXT_KEY
from heteroserve.conformance.tiers import tier_of


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(cases, label=None, impl=None): heteroserve conformance cases")
    if CONTEXT_KEY not in config.stash:
        # conftests found during collection cannot raise UsageError cleanly; exit instead
        pytest.exit("the heteroserve conformance suite needs --platform NAME "
                    "(pytest --pyargs heteroserve.conformance --platform cpu)",
                    returncode=pytest.ExitCode.USAGE_ERROR)


def _context(config: pytest.Config) -> ConformanceContext:
    return config.stash[CONTEXT_KEY]  # type: ignore[return-value]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None or "conf" not in metafunc.fixturenames:
        return
    params = build_params(_context(metafunc.config), marker.kwargs["cases"],
                          marker.kwargs.get("label"), marker.kwargs.get("impl"))
    metafunc.parametrize("conf", params)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        conf = getattr(getattr(item, "callspec", None), "params", {}).get("conf")
        if isinstance(conf, ConfParam):
            item.user_properties += [
                ("conf_op", conf.label), ("conf_impl", conf.impl),
                ("conf_kind", "native" if conf.native else "fallback"),
                ("conf_dtype", DTYPE_NAMES.get(conf.case.dtype, str(conf.case.dtype))),
                ("conf_provider", conf.spec.provider if conf.spec else "platform"),
                ("conf_tier", tier_of(item.path.stem).value)]
            if conf.probe_refusal:
                item.user_properties.append(("conf_probe", conf.probe_refusal))


@pytest.fixture(scope="session")
def ctx(request: pytest.FixtureRequest) -> ConformanceContext:
    """The platform under test."""
    return _context(request.config)


@pytest.fixture
def conf(request: pytest.FixtureRequest) -> ConfParam:
    """This test's (op, implementation, case)."""
    return request.param
