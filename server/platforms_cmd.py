"""``heteroserve platforms [--explain]``: what was discovered and what would be chosen."""

from __future__ import annotations

import argparse
import json

import torch

from heteroserve.core.kernels.dispatch import (
    negotiate_page_size, parse_kernel_overrides, resolve_op, wanted_ops,
)
from heteroserve.core.kernels.linear import LINEAR_SCHEMES
from heteroserve.core.kernels.registry import KernelRequest
from heteroserve.core.plugins.manager import PluginCatalog, load_plugins

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("platforms", help="list discovered platforms; --explain shows dispatch")
    p.add_argument("--explain", action="store_true",
                   help="print the resolved dispatch table and why other candidates were rejected")
    p.add_argument("--platform", default=None, help="explain only this platform")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None)
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--num-q-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--quant-scheme", default="unquantized",
                   help="linear scheme(s) to resolve, comma-separated, or 'all' "
                        f"({', '.join(LINEAR_SCHEMES)})")
    p.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL")
    p.add_argument("--verbose", action="store_true",
                   help="with --explain: every rejected candidate on its own line")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def quant_schemes(value: str) -> list[str]:
    """``--quant-scheme`` -> the linear schemes to resolve (unquantized first). Raises
    ``ValueError`` naming an unknown scheme."""
    wanted = list(LINEAR_SCHEMES) if value == "all" else [v.strip() for v in value.split(",")]
    unknown = [v for v in wanted if v not in LINEAR_SCHEMES]
    if unknown:
        raise ValueError(f"--quant-scheme {', '.join(unknown)} is not a linear scheme; known: "
                         f"{', '.join(LINEAR_SCHEMES)} or all")
    return list(dict.fromkeys(["unquantized", *wanted]))


def _request(catalog: PluginCatalog, name: str, args: argparse.Namespace) -> KernelRequest:
    platform = catalog.platforms[name].platform
    caps = platform.capabilities()
    return KernelRequest(
        platform=name, device_type=platform.device_type,
        dtype=_DTYPES[args.dtype] if args.dtype else caps.dtypes[0],
        head_size=args.head_size, num_q_heads=args.num_q_heads, num_kv_heads=args.num_kv_heads,
        page_size=args.page_size, quant_scheme=quant_schemes(args.quant_scheme)[-1],
        platform_page_sizes=caps.kv_page_sizes)


def describe(catalog: PluginCatalog, args: argparse.Namespace) -> dict:
    """Everything ``heteroserve platforms`` prints, as data."""
    out: dict = {"platforms": {}, "failed_plugins": [
        {"plugin": f.plugin, "source": f.source, "error": f.error} for f in catalog.failures]}
    names = [args.platform] if args.platform else sorted(catalog.platforms)
    for name in names:
        if name not in catalog.platforms:
            raise ValueError(f"unknown platform {name!r}; discovered: "
                             f"{', '.join(sorted(catalog.platforms)) or 'none'}")
        entry = catalog.platforms[name]
        a = entry.availability
        info: dict = {"source": entry.source, "priority": entry.platform.priority,
                      "available": a.available, "reason": a.reason, "devices": list(a.devices),
                      "device_type": entry.platform.device_type,
                      "capabilities": entry.platform.capabilities().describe()}
        if args.explain:
            info["dispatch"] = _explain(catalog, name, args)
        out["platforms"][name] = info
    return out


def _explain(catalog: PluginCatalog, name: str, args: argparse.Namespace) -> dict:
    overrides = parse_kernel_overrides(args.kernel)
    request = _request(catalog, name, args)
    request = request.with_page_size(
        negotiate_page_size(catalog.registry, request, overrides.get("attention")))
    schemes = quant_schemes(args.quant_scheme)
    table: dict = {"request": {"dtype": str(request.dtype).removeprefix("torch."),
                               "head_size": request.head_size, "page_size": request.page_size,
                               "quant_scheme": request.quant_scheme}, "ops": {}}
    resolutions = {}
    for op in wanted_ops(schemes):
        try:
            resolutions[op] = resolve_op(catalog.registry, op, request, overrides.get(op))
        except Exception as exc:  # show every op even when one cannot resolve
            table["ops"][op] = {"chosen": None, "error": str(exc)}
    for op, res in sorted(resolutions.items()):
        table["ops"][op] = {
            "chosen": res.chosen.name, "provider": res.chosen.provider,
            "kind": "forced" if res.forced else ("native" if res.native else "fallback"),
            "description": res.chosen.description,
            "rejected": [{"name": n, "reason": r} for n, r in res.rejected]}
    return table


OTHER_PLATFORM = "runs only on "  # KernelSpec.check's reason for a platform mismatch


def grouped_rejections(rejected: list[dict]) -> str:
    """One line for an op's rejected candidates: identical reasons grouped with their names
    in parentheses, most common first; candidates for other platforms folded into one count
    (``lower priority than torch_native (splitkv_decode); 6 for other platforms (cuda, rocm)``)."""
    by_reason: dict[str, list[str]] = {}
    elsewhere: dict[str, None] = {}
    for rej in rejected:
        if rej["reason"].startswith(OTHER_PLATFORM):
            for name in rej["reason"].removeprefix(OTHER_PLATFORM).split(", "):
                elsewhere[name] = None
            by_reason.setdefault("", []).append(rej["name"])
            continue
        by_reason.setdefault(rej["reason"], []).append(rej["name"])
    others = by_reason.pop("", [])
    groups = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    parts = [f"{reason} ({', '.join(names)})" for reason, names in groups]
    if others:
        parts.append(f"{len(others)} for other platforms ({', '.join(sorted(elsewhere))})")
    return "; ".join(parts)


def _print_dispatch(dispatch: dict, verbose: bool) -> None:
    req = dispatch["request"]
    print(f"  dispatch for dtype={req['dtype']} head_size={req['head_size']} "
          f"page_size={req['page_size']} quant={req['quant_scheme']}:")
    for op, row in dispatch["ops"].items():
        if row.get("chosen") is None:
            print(f"    {op:<24} -> (none) {row.get('error', '')}")
            continue
        head = f"    {op:<24} -> {row['chosen']} ({row['kind']}, {row['provider']})"
        if verbose:
            print(head)
            for rej in row["rejected"]:
                print(f"    {'':<24}    not {rej['name']}: {rej['reason']}")
        elif row["rejected"]:
            print(f"{head}; not: {grouped_rejections(row['rejected'])}")
        else:
            print(head)
        if op.startswith("linear.") and row.get("description"):
            print(f"    {'':<24}    kernel: {row['description']}")


def _print_text(data: dict, verbose: bool = False) -> None:
    for name, info in data["platforms"].items():
        state = "available" if info["available"] else "unavailable"
        print(f"{name}  [{state}]  from {info['source']}  priority {info['priority']}")
        print(f"  {info['reason']}")
        for dev in info["devices"]:
            print(f"  device: {dev}")
        caps = info["capabilities"]
        print("  capabilities: " + ", ".join(f"{k}={v}" for k, v in caps.items()))
        dispatch = info.get("dispatch")
        if dispatch:
            _print_dispatch(dispatch, verbose)
        print()
    for f in data["failed_plugins"]:
        print(f"plugin {f['plugin']} ({f['source']}) failed to load: {f['error']}")


def run(args: argparse.Namespace) -> int:
    data = describe(load_plugins(), args)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_text(data, verbose=args.verbose)
    return 0
