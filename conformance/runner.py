"""Run the conformance suite programmatically (``heteroserve conformance`` calls this)."""

from __future__ import annotations

import os

import pytest

PACKAGE = "heteroserve.conformance"


def conformance_args(platform: str, report_dir: str | None,
                     pytest_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The pytest command line (without the ``pytest`` itself) for one platform."""
    args = ["--pyargs", PACKAGE, "--platform", platform, "-p", "no:cacheprovider"]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):  # entry points off: load it by name
        args += ["-p", f"{PACKAGE}.plugin"]
    if report_dir:
        args += ["--report", str(report_dir)]
    return args + list(pytest_args)


def run_conformance(platform: str, report_dir: str | None, pytest_args: list[str]) -> int:
    """Run the suite for ``platform`` in this process; with ``report_dir``, write
    ``conformance-<platform>.json`` and ``.md`` there. ``pytest_args`` are passed through
    (``-k splitkv_decode``, ``-x``, ``--conformance-quick``). Returns pytest's exit code
    (0: everything ran passed; 1: some test failed; 4: usage error such as an unknown
    platform)."""
    return int(pytest.main(conformance_args(platform, report_dir, pytest_args)))
