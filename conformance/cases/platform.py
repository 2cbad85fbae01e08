"""Cases for the platform-level checks: graph replay, communicator, model-level greedy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heteroserve.conformance.cases.attention import AttnCase
from heteroserve.conformance.context import DTYPE_NAMES, ConformanceContext
from heteroserve.conformance.params import Case
from heteroserve.core.kernels import ops


def graph_cases(ctx: ConformanceContext) -> list[AttnCase]:
    """A decode step (ragged lengths, GQA 4) in the platform's preferred dtype and page size."""
    dt = ctx.capabilities.dtypes[0]
    page = (ctx.capabilities.kv_page_sizes or (16,))[0]
    seqs = ((0, 1), (8, 1), (39, 1))
    return [AttnCase(ops.ATTENTION, f"{DTYPE_NAMES.get(dt, dt)}-decode-p{page}-h8:2-d128", dt,
                     "decode", 8, 2, 128, page, seqs)]


@dataclass(frozen=True)
class CommCase(Case):
    """``init_group``: run under a world-size-1 process group of the platform's backend
    (otherwise with ``torch.distributed`` uninitialised, as a single-device engine runs)."""

    init_group: bool


def communicator_cases(ctx: ConformanceContext) -> list[CommCase]:
    """With and without a world-size-1 process group, in the platform's first dtype."""
    dt = ctx.capabilities.dtypes[0]
    return [CommCase("communicator", f"{DTYPE_NAMES.get(dt, dt)}-{kind}", dt, kind == "group")
            for kind in ("no_group", "group")]


@dataclass(frozen=True)
class WorldCase(Case):
    """A process group of ``world_size`` ranks of the platform's backend (with 4 ranks, the
    two 2-rank subgroups are checked too)."""

    world_size: int


def world_cases(ctx: ConformanceContext) -> list[WorldCase]:
    """Four ranks (world sizes 4 and, over subgroups, 2) in the platform's first dtype."""
    dt = ctx.capabilities.dtypes[0]
    return [WorldCase("communicator", f"{DTYPE_NAMES.get(dt, dt)}-world4+2", dt, 4)]


@dataclass(frozen=True)
class ModelCase(Case):
    """A tiny random-weight ``arch`` model (``core.models.tiny``), ``new_tokens`` greedy."""

    arch: str
    new_tokens: int = 16


def model_cases(ctx: ConformanceContext) -> list[ModelCase]:
    """Dense Llama always; outside ``--conformance-quick`` also Qwen3-MoE, Gemma 3 (sliding
    windows, per-layer rope, GeGLU) and DeepSeek-V3 (the platform's MLA, grouped routing)."""
    archs = ("llama",) if ctx.quick else ("llama", "qwen3_moe", "gemma3", "deepseek_v3")
    return [ModelCase("model_greedy", f"{arch}-fp32-greedy16", torch.float32, arch)
            for arch in archs]
