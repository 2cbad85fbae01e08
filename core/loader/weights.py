"""Iterate checkpoint tensors (safetensors, single or sharded) or fill dummy weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from heteroserve.core.models.config import ModelLoadError

logger = logging.getLogger(__name__)


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of ``folder`` (from the shard index when there is one).
    Raises :class:`ModelLoadError` when there are none or the index names a missing file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard(s) listed in the index are missing: "
                                 f"{', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no *.safetensors weights (use --load-format dummy "
                             "for random weights of the real shapes)")
    return files


def iterate_safetensors(folder: Path, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every tensor, shard by shard, with a progress bar."""
    from safetensors import safe_open
    from tqdm import tqdm

    files = checkpoint_files(folder)
    bar = tqdm(files, desc="Loading safetensors shards", unit="shard",
               disable=not progress or len(files) < 2)
    for path in bar:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def fill_dummy(model: nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights of the real shapes, generated on the parameters' own device:
    normal(0, std) matrices, ones for norm weights, zeros for biases; deterministic for
    ``seed``. Non-float (or 8-bit float) parameters get small random values."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = generators.get(p.device)
            if gen is None:
                gen = generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
            if p.dtype.is_floating_point and p.element_size() >= 2:
                if p.dim() == 1:
                    p.fill_(1.0 if "norm" in name else 0.0)
                else:
                    p.normal_(0.0, std, generator=gen)
            else:
                p.copy_(torch.randint(-8, 8, p.shape, generator=gen, device=p.device).to(p.dtype))
