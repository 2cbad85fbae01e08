"""The report half of ``benchmarks/bench_http.py``: the per-level table (HTTP next to the
offline Engine), issue 22's targets evaluated on it, and the PNG plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: issue 22's targets, evaluated in the report (never asserted)
TARGET_CHUNKS_PER_TOKEN = 0.95
TARGET_GAP_OVER_STEP = 1.2
TARGET_TTFT_DELTA_MS = 15.0
TARGET_THROUGHPUT_RATIO = 0.97


@dataclass(frozen=True)
class Level:
    """One concurrency level: ``num_prompts`` requests, at most ``concurrency`` in flight."""

    concurrency: int
    num_prompts: int


def level_table(report: dict, levels: list[Level]) -> list[dict]:
    """One row per level: HTTP numbers next to the offline Engine's."""
    http = {lv["concurrency"]: lv for lv in report.get("http", {}).get("levels", [])}
    steps = report.get("offline", {}).get("decode_step", {})
    rows = []
    for lv in levels:
        m = http.get(lv.concurrency, {}).get("summary", {})
        step = steps.get(str(lv.concurrency), {})
        gap, step_ms = m.get("itl_ms_p50"), step.get("step_ms")
        rows.append({
            "concurrency": lv.concurrency, "num_prompts": lv.num_prompts,
            "failed": m.get("failed"),
            "http_output_tok_s": m.get("output_throughput"),
            "http_total_tok_s": m.get("total_throughput"),
            "chunks_with_text_per_reply": m.get("chunks_with_text_per_reply"),
            "chunks_with_text_per_token": m.get("chunks_with_text_per_token"),
            "ttft_ms_p50": m.get("ttft_ms_p50"), "ttft_ms_p99": m.get("ttft_ms_p99"),
            "inter_chunk_gap_ms_p50": gap, "inter_chunk_gap_ms_p99": m.get("itl_ms_p99"),
            "offline_decode_step_ms": step_ms,
            "gap_p50_over_step": gap / step_ms if gap and step_ms else None,
            "offline_batch_output_tok_s": step.get("batch_output_tok_s"),
        })
    return rows


def evaluate_targets(report: dict, rows: list[dict], levels: list[Level]) -> dict:
    """Issue 22's done-means numbers on this run (None where a number is missing)."""
    def all_of(values: list, ok) -> bool | None:
        return None if not values or None in values else all(ok(v) for v in values)

    chunks = [r["chunks_with_text_per_token"] for r in rows]
    ratios = [r["gap_p50_over_step"] for r in rows]
    off = report.get("offline", {})
    c1 = next((r for r in rows if r["concurrency"] == 1), None)
    off_ttft = off.get("ttft_c1", {}).get("ttft_ms_p50")
    delta = (c1["ttft_ms_p50"] - off_ttft if c1 and c1["ttft_ms_p50"] is not None
             and off_ttft is not None else None)
    big = max(levels, key=lambda lv: (lv.concurrency, lv.num_prompts))
    http_big = next((r["http_output_tok_s"] for r in rows if r["concurrency"] == big.concurrency),
                    None)
    off_tp = off.get("throughput", {}).get("output_throughput")
    ratio = http_big / off_tp if http_big and off_tp else None
    return {
        "chunks_with_text_per_token_min": min(chunks) if None not in chunks and chunks else None,
        f"chunks_per_token_ge_{TARGET_CHUNKS_PER_TOKEN}": all_of(
            chunks, lambda v: v >= TARGET_CHUNKS_PER_TOKEN),
        "gap_p50_over_step_max": max(ratios) if None not in ratios and ratios else None,
        f"gap_p50_le_{TARGET_GAP_OVER_STEP}x_step": all_of(
            ratios, lambda v: v <= TARGET_GAP_OVER_STEP),
        "ttft_p50_c1_minus_offline_ms": delta,
        f"ttft_c1_within_{TARGET_TTFT_DELTA_MS:g}ms": None if delta is None
        else abs(delta) <= TARGET_TTFT_DELTA_MS,
        "http_over_offline_throughput": ratio,
        f"throughput_ge_{TARGET_THROUGHPUT_RATIO}x": None if ratio is None
        else ratio >= TARGET_THROUGHPUT_RATIO,
    }


def plot(path: Path, report: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [r["concurrency"] for r in rows]

    def series(key: str) -> list[float]:
        return [float("nan") if r[key] is None else r[key] for r in rows]

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    a = ax[0][0]
    a.plot(cs, series("http_output_tok_s"), "o-", label="HTTP (bench serve client)")
    a.plot(cs, series("offline_batch_output_tok_s"), "s--", label="offline Engine, one batch")
    tp = report.get("offline", {}).get("throughput")
    if tp:
        a.plot([tp["concurrency"]], [tp["output_throughput"]], "k*", markersize=12,
               label=f"offline Engine, {tp['num_prompts']} prompts")
    a.set_ylabel("output tokens/s")
    a = ax[0][1]
    a.plot(cs, series("chunks_with_text_per_token"), "o-")
    a.axhline(TARGET_CHUNKS_PER_TOKEN, color="gray", ls=":", label="target 0.95")
    a.set_ylabel("SSE chunks with text per generated token")
    a = ax[1][0]
    a.plot(cs, series("inter_chunk_gap_ms_p50"), "o-", label="inter-chunk gap p50")
    a.plot(cs, series("inter_chunk_gap_ms_p99"), "^-", label="inter-chunk gap p99")
    a.plot(cs, series("offline_decode_step_ms"), "s--", label="offline decode step")
    a.set_yscale("log")
    a.set_ylabel("ms")
    a = ax[1][1]
    a.plot(cs, series("ttft_ms_p50"), "o-", label="HTTP TTFT p50")
    a.plot(cs, series("ttft_ms_p99"), "^-", label="HTTP TTFT p99")
    off = report.get("offline", {}).get("ttft_c1", {}).get("ttft_ms_p50")
    if off is not None:
        a.plot([1], [off], "k*", markersize=12, label="offline TTFT p50, concurrency 1")
    a.set_yscale("log")
    a.set_ylabel("ms")
    for a in ax.flat:
        a.set_xscale("log", base=2)
        a.set_xticks(cs, [str(c) for c in cs])
        a.minorticks_off()
        a.set_xlabel("concurrent clients")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    w = report["workload"]
    fig.suptitle(f"heteroserve HTTP vs offline Engine: {report['device']}, "
                 f"{w['input_len']} in / {w['output_len']} out, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


