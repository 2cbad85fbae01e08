"""Drive a model runner or a scheduler directly, for tests (no processes)."""

from __future__ import annotations

import os

import torch

from heteroserve.core.config import ServerArgs
from heteroserve.core.kernels.attention import ForwardMode
from heteroserve.core.model_runner.batch_builder import SequenceInput, build_forward_batch
from heteroserve.core.model_runner.build import build_model_runner
from heteroserve.core.scheduler import Req, Scheduler
from heteroserve.core.scheduler.sampling_params import SamplingParams
from platform_under_test import TEST_PLATFORM


def live_children() -> list[int]:
    """Pids of this process's children that still run (zombies excluded)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            out.append(int(entry))
    return out


class ChildWatch:
    """The children of this process started after construction, to check that an engine
    leaves none behind while other tests of the same worker process keep theirs (torch's
    compile workers, a module's server)."""

    def __init__(self) -> None:
        self.before = set(live_children())

    def new_live(self) -> list[int]:
        """Pids of children started since construction that still run (zombies excluded)."""
        return sorted(set(live_children()) - self.before)


def cpu_args(path, **kw) -> ServerArgs:
    """fp32 engine arguments on the cpu platform, or on ``$HETEROSERVE_TEST_PLATFORM`` with
    ``$HETEROSERVE_TEST_KERNELS`` (comma-separated OP=IMPL) to rerun the parity tests on a
    device; ``$HETEROSERVE_TEST_DISABLE_GRAPH=1`` captures no decode graph (for a kernel a
    graph cannot hold, such as a torch-native fallback that reads ids on the host)."""
    kw.setdefault("max_total_tokens", 4096)
    kw.setdefault("kernel", [k for k in os.environ.get("HETEROSERVE_TEST_KERNELS", "").split(",") if k])
    if os.environ.get("HETEROSERVE_TEST_DISABLE_GRAPH") == "1":  # for kernels graphs cannot hold
        kw.setdefault("disable_cuda_graph", True)
    return ServerArgs(model_path=str(path), dtype="float32",
                      platform=TEST_PLATFORM, **kw)


class PagedSequence:
    """One sequence's pages from a simple bump allocator, for driving a runner by hand."""

    next_page = 1

    def __init__(self, runner, num_tokens: int) -> None:
        n = -(-num_tokens // runner.page_size)
        self.pages = list(range(PagedSequence.next_page, PagedSequence.next_page + n))
        PagedSequence.next_page += n
        assert PagedSequence.next_page <= runner.num_pages, "test pool exhausted"


def extend(runner, seqs: list[tuple[list[int], int, PagedSequence]]) -> torch.Tensor:
    batch = build_forward_batch([SequenceInput(ids, prefix, s.pages) for ids, prefix, s in seqs],
                                ForwardMode.EXTEND, runner.page_size, runner.device)
    return runner.forward(batch).cpu()


def decode(runner, seqs: list[tuple[int, int, PagedSequence]]) -> torch.Tensor:
    batch = build_forward_batch([SequenceInput([t], pos, s.pages) for t, pos, s in seqs],
                                ForwardMode.DECODE, runner.page_size, runner.device)
    return runner.forward(batch).cpu()


def run_scheduler(args: ServerArgs, prompts: list[list[int]], eos: list[int] = (),
                  runner=None, **sampling) -> tuple[dict[str, list[int]], Scheduler]:
    """Generate for every prompt through one scheduler; returns ``{rid: output ids}``."""
    if runner is None:
        _, _, runner = build_model_runner(args)
    sched = Scheduler(runner, args, list(eos), runner.page_size)
    sampling.setdefault("max_new_tokens", 16)
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    for i, ids in enumerate(prompts):
        sched.add_request(Req(rid=f"r{i}", input_ids=list(ids),
                              sampling_params=SamplingParams(**sampling)))
    outs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    for _ in range(10_000):
        if not sched.has_work():
            break
        for o in sched.step():
            outs[o.rid] += o.new_token_ids
    return outs, sched


def randomise_qk_norms(path, seed: int = 0) -> None:
    """Replace a tiny checkpoint's q/k norm weights (all ones as built) by random ones in
    [0.25, 1.75), in place, under their checkpoint names."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(seed)
    for f in path.glob("*.safetensors"):
        tensors = load_file(f)
        for name, t in tensors.items():
            if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
                tensors[name] = (torch.rand(t.shape, generator=gen) * 1.5 + 0.25).to(t.dtype)
        save_file(tensors, f, metadata={"format": "pt"})
