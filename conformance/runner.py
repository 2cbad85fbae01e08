"""Run the conformance suite programmatically (``heteroserve conformance`` calls this)."""

from __future__ import annotations

import importlib.util
import os

import pytest

PACKAGE = "heteroserve.conformance"
#: seconds one test may take before pytest-timeout fails it (a hung kernel or engine start-up
#: becomes one failed case in the report instead of a run that never ends); JIT builds of a
#: vendor library's modules fit well inside it
DEFAULT_TEST_TIMEOUT_S = 900


def conformance_args(platform: str, report_dir: str | None,
                     pytest_args: list[str] | tuple[str, ...] = (),
                     test_timeout_s: float | None = DEFAULT_TEST_TIMEOUT_S) -> list[str]:
    """The pytest command line (without the ``pytest`` itself) for one platform. With
    pytest-timeout installed (the ``conformance`` extra has it) each test gets
    ``test_timeout_s`` seconds unless ``pytest_args`` set a timeout themselves (``0`` or
    None: no limit)."""
    args = ["--pyargs", PACKAGE, "--platform", platform, "-p", "no:cacheprovider"]
    user_set = any(a.startswith(("--timeout", "timeout=")) for a in pytest_args)
    if test_timeout_s and not user_set and importlib.util.find_spec("pytest_timeout"):
        args += ["-o", f"timeout={test_timeout_s:g}"]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):  # entry points off: load it by name
        args += ["-p", f"{PACKAGE}.plugin"]
    if report_dir:
        args += ["--report", str(report_dir)]
    return args + list(pytest_args)


def run_conformance(platform: str, report_dir: str | None, pytest_args: list[str],
                    test_timeout_s: float | None = DEFAULT_TEST_TIMEOUT_S) -> int:
    """Run the suite for ``platform`` in this process; with ``report_dir``, write
    ``conformance-<platform>.json`` and ``.md`` there. ``pytest_args`` are passed through
    (``-k splitkv_decode``, ``-x``, ``--conformance-quick``); ``test_timeout_s`` as in
    :func:`conformance_args`. Returns pytest's exit code
    (0: everything ran passed; 1: some test failed; 4: usage error such as an unknown
    platform)."""
    return int(pytest.main(conformance_args(platform, report_dir, pytest_args,
                                            test_timeout_s)))
