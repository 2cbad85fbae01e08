"""The conformance report: op x implementation x pass/fail/skip x max error, from pytest hooks.

:class:`ReportCollector` is registered by the suite's pytest plugin when ``--platform`` is
given. It reads the ``conf_*`` user properties the suite attaches to each test and the
``max_rel_err`` properties tests record, prints the table at the end of the run and, with
``--report DIR``, writes ``conformance-<platform>.json`` and ``conformance-<platform>.md``.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from heteroserve.conformance.provenance import DIGEST_FIELD, content_digest, provenance
from heteroserve.conformance.tiers import reached, summarize

if TYPE_CHECKING:
    from heteroserve.conformance.context import ConformanceContext


@dataclass
class ConfResult:
    """One test's outcome (``passed``, ``failed`` or ``skipped``) and what it measured."""

    nodeid: str
    op: str
    impl: str
    kind: str
    provider: str
    dtype: str = ""
    tier: str = "correct"
    outcome: str = ""
    message: str = ""
    max_rel_err: float | None = None


def _one_line(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    text = getattr(crash, "message", None) or str(report.longrepr)
    return " ".join(text.split())[:400]


def _num(x: float | None) -> float | str | None:
    return x if x is None or math.isfinite(x) else "inf"


def _fmt_err(x: float | str | None) -> str:
    if isinstance(x, str) or x is None:
        return x or "-"
    return "inf" if not math.isfinite(x) else f"{x:.2e}"


def _command_line() -> str:
    """The command the user ran (``python -m pytest ...`` or the console script's name)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0] = f"python -m {Path(argv[0]).parent.name}"
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


class ReportCollector:
    """pytest plugin object collecting conformance results (see the module docstring)."""

    def __init__(self, ctx: ConformanceContext, report_dir: str | None,
                 config: pytest.Config) -> None:
        self.ctx = ctx
        self.report_dir = Path(report_dir) if report_dir else None
        self.config = config
        self.results: dict[str, ConfResult] = {}
        self.deselected = 0
        self.probes: dict[str, dict[str, str]] = {}
        #: performance-tier measurements, by test
        self.performance: dict[str, dict[str, Any]] = {}
        #: set when the session ends by Ctrl-C / SIGINT (a time limit): no tier is claimed
        self.interrupted = False
        # taken at the start: the code under test, not what the tree holds when the run ends
        self.provenance = provenance(ctx)

    # -- hooks -----------------------------------------------------------------------------
    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += len(items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(p for p in report.user_properties if p[0].startswith("conf_"))
        if "conf_op" not in props:
            return
        if "conf_probe" in props:
            self._probe(report, props)
            return
        res = self.results.setdefault(report.nodeid, ConfResult(
            report.nodeid, props["conf_op"], props["conf_impl"], props["conf_kind"],
            props.get("conf_provider", ""), props.get("conf_dtype", ""),
            props.get("conf_tier", "correct")))
        for key, value in report.user_properties:
            if key == "max_rel_err":
                res.max_rel_err = value if res.max_rel_err is None else max(res.max_rel_err, value)
            elif key == "perf":
                self.performance[report.nodeid] = {"test": report.nodeid, **value}
        if report.failed:
            if res.outcome != "failed":
                res.outcome, res.message = "failed", f"{report.when}: {_one_line(report)}"
        elif report.skipped and res.outcome != "failed":
            res.outcome, res.message = "skipped", _one_line(report)
        elif report.when == "call" and report.passed and not res.outcome:
            res.outcome = "passed"

    def _probe(self, report: pytest.TestReport, props: dict[str, Any]) -> None:
        """A claims probe (an xfail parameter): xpassed -> supported but unclaimed."""
        if report.when != "call" and not (report.skipped and not hasattr(report, "wasxfail")):
            return
        if hasattr(report, "wasxfail"):
            verdict = "supported but unclaimed" if report.passed else "refusal confirmed"
        else:
            verdict = "not run"
        self.probes[report.nodeid] = {
            "test": report.nodeid, "op": props["conf_op"], "implementation": props["conf_impl"],
            "refusal": props["conf_probe"], "verdict": verdict}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results:
            return
        terminalreporter.section(f"heteroserve conformance: {self.ctx.name}")
        for line in self._table_lines():
            terminalreporter.write_line(line)
        tiers = summarize((r.tier, r.outcome) for r in self.results.values())
        terminalreporter.write_line(
            "tiers: " + ", ".join(f"{t} {v['status']}" for t, v in tiers.items())
            + f"; tier reached: {'+'.join(reached(tiers)) or 'none'}")
        if self.report_dir is not None:
            terminalreporter.write_line(f"report written to {self._path('md')}")

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.report_dir is None or hasattr(self.config, "workerinput"):
            return  # a pytest-xdist worker saw part of the run; the controller writes it all
        self.interrupted = exitstatus == pytest.ExitCode.INTERRUPTED
        self.report_dir.mkdir(parents=True, exist_ok=True)
        data = self.build()
        self._path("json").write_text(json.dumps(data, indent=2) + "\n")
        self._path("md").write_text(render_markdown(data))

    # -- building ----------------------------------------------------------------------------
    def _path(self, ext: str) -> Path:
        assert self.report_dir is not None
        return self.report_dir / f"conformance-{self.ctx.name}.{ext}"

    def rows(self) -> list[dict[str, Any]]:
        """One row per (op, implementation): counts, worst error, native or fallback."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.results.values():
            row = rows.setdefault((r.op, r.impl), {
                "op": r.op, "implementation": r.impl, "kind": r.kind, "provider": r.provider,
                "passed": 0, "failed": 0, "skipped": 0, "max_rel_err": None,
                "max_rel_err_by_dtype": {}})
            if r.outcome in ("passed", "failed", "skipped"):
                row[r.outcome] += 1
            if r.max_rel_err is not None:
                prev = row["max_rel_err"]
                row["max_rel_err"] = r.max_rel_err if prev is None else max(prev, r.max_rel_err)
                by = row["max_rel_err_by_dtype"]
                by[r.dtype] = max(by.get(r.dtype, r.max_rel_err), r.max_rel_err)
        return [rows[k] for k in sorted(rows)]

    def _table_lines(self) -> list[str]:
        lines = [f"{'op':<22} {'implementation':<24} {'kind':<8} {'pass':>5} {'fail':>5} "
                 f"{'skip':>5} {'max err':>9}"]
        for row in self.rows():
            lines.append(f"{row['op']:<22} {row['implementation']:<24} {row['kind']:<8} "
                         f"{row['passed']:>5} {row['failed']:>5} {row['skipped']:>5} "
                         f"{_fmt_err(row['max_rel_err']):>9}")
        return lines

    def _filters(self) -> dict[str, str]:
        """The run's ``-k`` / ``-m`` expressions (empty when none). Under pytest-xdist the
        workers deselect, so the controller's ``deselected`` count stays 0: an expression
        alone marks the run partial."""
        opt = self.config.option
        found = {"keyword": getattr(opt, "keyword", "") or "",
                 "markexpr": getattr(opt, "markexpr", "") or ""}
        return {k: v for k, v in found.items() if v}

    def build(self) -> dict[str, Any]:
        """The JSON document (also the source of the Markdown)."""
        from heteroserve import __version__

        tiers = summarize((r.tier, r.outcome) for r in self.results.values())
        results = list(self.results.values())
        counts = {k: sum(r.outcome == k for r in results) for k in ("passed", "failed", "skipped")}
        rows = self.rows()
        for row in rows:
            row["max_rel_err"] = _num(row["max_rel_err"])
            row["max_rel_err_by_dtype"] = {k: _num(v) for k, v in
                                           row["max_rel_err_by_dtype"].items()}
        doc = {
            "platform": self.ctx.name,
            # an interrupted run did not show any level: the tests it never reached could fail
            "tier_reached": ("none" if self.interrupted else "+".join(reached(tiers)) or "none"),
            "tiers": tiers,
            "selection": {"quick": self.ctx.quick, "deselected": self.deselected,
                          "filters": self._filters(), "interrupted": self.interrupted,
                          "complete": (not self.ctx.quick and self.deselected == 0
                                       and not self._filters() and not self.interrupted)},
            "devices": list(self.ctx.availability.devices),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": _command_line(),
            "pytest_args": [str(a) for a in self.config.invocation_params.args],
            "torch_version": torch.__version__,
            "heteroserve_version": __version__,
            "provenance": self.provenance,
            "capabilities": self.ctx.capabilities.describe(),
            "quick": self.ctx.quick,
            "summary": {**counts, "ok": counts["failed"] == 0 and counts["passed"] > 0},
            "table": rows,
            "failures": [{"test": r.nodeid, "op": r.op, "implementation": r.impl,
                          "message": r.message} for r in results if r.outcome == "failed"],
            "skips": [{"test": r.nodeid, "op": r.op, "implementation": r.impl,
                       "reason": r.message} for r in results if r.outcome == "skipped"],
            # so partial runs (a time limit, a -k filter) can be merged test by test
            "passes": sorted(r.nodeid for r in results if r.outcome == "passed"),
            # claims probing (informational): refused cases run anyway
            "claims": sorted(self.probes.values(), key=lambda p: p["test"]),
            "skip_ops": dict(self.ctx.skip_ops),
            # the optional performance tier: what was asked for and what each op reached
            "performance": {"required_fraction": self.ctx.performance_fraction,
                            "measurements": [self.performance[k]
                                             for k in sorted(self.performance)]},
            "plugin_failures": [{"plugin": f.plugin, "source": f.source, "error": f.error}
                                for f in self.ctx.catalog.failures],
        }
        doc[DIGEST_FIELD] = {"sha256": content_digest(doc),
                             "of": "this document without this field, as JSON with sorted "
                                   "keys and compact separators"}
        return doc


def render_markdown(data: dict[str, Any]) -> str:
    """The Markdown view of :meth:`ReportCollector.build`'s document."""
    s = data["summary"]
    sel = data["selection"]
    verdict = ("INCOMPLETE" if sel.get("interrupted") else "PASS" if s["ok"] else "FAIL")
    prov = data["provenance"]
    hs = prov["heteroserve"]
    out = [f"# heteroserve conformance report: `{data['platform']}` ({verdict})", "",
           f"- tier reached: **{data['tier_reached']}**"
           + (" (run interrupted before every test ran: no tier is claimed)"
              if sel.get("interrupted") else
              "" if sel["complete"] else " (partial run: holds for the selected tests only)"),
           f"- date: {data['date']}",
           f"- devices: {', '.join(data['devices']) or '-'}",
           f"- torch {data['torch_version']}, heteroserve {data['heteroserve_version']} "
           f"({hs['git_sha'] or 'no git SHA'})",
           "- plugins: " + (", ".join(f"{p['distribution']} {p['version']} "
                                       f"({p['git_sha'] or 'no git SHA'})"
                                       for p in prov["plugins"]) or "-"),
           f"- runtime: `{json.dumps(prov['runtime'])}`",
           f"- digest (sha256 of the JSON report): `{data[DIGEST_FIELD]['sha256']}`",
           f"- command: `{data['command']}`",
           f"- capabilities: `{json.dumps(data['capabilities'])}`",
           f"- grid: {'quick' if data['quick'] else 'full'}",
           f"- result: {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped", "",
           "## Tiers", "", "| tier | status | passed | failed | skipped |",
           "|---|---|---:|---:|---:|"]
    out += [f"| {t} | {v['status']} | {v['passed']} | {v['failed']} | {v['skipped']} |"
            for t, v in data["tiers"].items()]
    out += ["", "## Results", "",
            "Max rel. error: worst `max|out - ref| / max|ref|` against the float64 oracle "
            "(0 for exact checks); per dtype in the last column.", "",
            "| op | implementation | kind | provider | passed | failed | skipped "
            "| max rel. error | by dtype |",
            "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in data["table"]:
        by = ", ".join(f"{k} {_fmt_err(v)}" for k, v in r["max_rel_err_by_dtype"].items())
        out.append(f"| {r['op']} | {r['implementation']} | {r['kind']} | {r['provider']} | "
                   f"{r['passed']} | {r['failed']} | {r['skipped']} | "
                   f"{_fmt_err(r['max_rel_err'])} | {by or '-'} |")
    if data["failures"]:
        out += ["", "## Failures", ""]
        out += [f"- `{f['test']}`: {f['message']}" for f in data["failures"]]
    if data["skips"]:
        grouped: dict[tuple[str, str, str], int] = {}
        for sk in data["skips"]:
            key = (sk["op"], sk["implementation"], sk["reason"])
            grouped[key] = grouped.get(key, 0) + 1
        out += ["", "## Skipped", "", "| op | implementation | reason | tests |",
                "|---|---|---|---:|"]
        out += [f"| {op} | {impl} | {reason} | {n} |" for (op, impl, reason), n in
                sorted(grouped.items())]
    unclaimed = [p for p in data["claims"] if p["verdict"] == "supported but unclaimed"]
    if data["claims"]:
        out += ["", "## Claims probing (informational)", "",
                f"{len(data['claims'])} refused case(s) run anyway; {len(unclaimed)} passed "
                "(supported but unclaimed: the `supports()` predicate could say yes).", ""]
        out += [f"- `{p['test']}`: {p['verdict']} (refused: {p['refusal']})"
                for p in data["claims"]]
    perf = data.get("performance") or {}
    if perf.get("measurements"):
        out += ["", "## Performance", "",
                f"Memory-bound ops against the measured copy bandwidth; required fraction "
                f"{perf['required_fraction']}.", "",
                "| op | implementation | case | GB/s | copy GB/s | fraction |",
                "|---|---|---|---:|---:|---:|"]
        out += [f"| {m['op']} | {m['implementation']} | {m['case']} | {m['gb_per_s']} | "
                f"{m['copy_gb_per_s']} | {m['fraction']} |" for m in perf["measurements"]]
    if data["skip_ops"]:
        out += ["", "## Ops the platform plugin skips", ""]
        out += [f"- `{op}`: {reason}" for op, reason in data["skip_ops"].items()]
    if data["plugin_failures"]:
        out += ["", "## Plugins that failed to load", ""]
        out += [f"- `{f['plugin']}` ({f['source']}): {f['error']}" for f in data["plugin_failures"]]
    return "\n".join(out) + "\n"
