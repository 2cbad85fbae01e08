"""Tiny quantized checkpoints in real formats, and the transformers references they are
compared with.

``fp8`` (block and per tensor), ``awq`` and ``gptq`` checkpoints are written by small packers
that follow each format's documented layout (the float64 quantizers of the conformance
suite, independent of any engine code); ``compressed-tensors`` checkpoints are written by
the compressed-tensors library itself. :func:`dequantized_reference` builds the
transformers model with the dequantized weights and, for W8A8 schemes, forward pre-hooks
that quantize each projection's input as the scheme says.
"""

from __future__ import annotations

import json
import zlib
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from heteroserve.conformance import quantize as cq
from heteroserve.conformance.oracles.linear import dequantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
               "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")  # + MLA's


def copy_without_weights(src: Path, dst: Path) -> Path:
    """``dst`` (created) holding every file of checkpoint folder ``src`` but its
    ``*.safetensors`` (config, tokenizer, ...), for a test to write altered weights into."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


def _is_projection(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in PROJECTIONS


def _copy_folder(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, out / f.name)


def _set_quant_config(out: Path, qcfg: dict[str, Any]) -> None:
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def _gptq_sym(w: torch.Tensor, group: int, g_idx: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """GPTQ v1, symmetric: ``s = 2 amax / 15`` (fp16), zero point 8 (stored as 7)."""
    wt = w.T
    k, n = wt.shape
    groups = g_idx.long() if g_idx is not None else torch.arange(k) // group
    scales = torch.empty(k // group, n, dtype=torch.float64)
    for g in range(k // group):
        rows = wt[groups == g]
        scales[g] = (2 * rows.abs().amax(dim=0) / 15).clamp(min=1e-4).to(torch.float16).double()
    q = (torch.round(wt / scales[groups]) + 8).clamp(0, 15)
    out = {"qweight": cq.pack_nibbles(q.view(k // 8, 8, n).permute(0, 2, 1)),
           "qzeros": cq.pack_nibbles(torch.full((k // group, n // 8, 8), 7.0)),
           "scales": scales.to(torch.float16), "g_idx": groups.to(torch.int32)}
    return out


def _act_order_g_idx(k: int, group: int, seed: int) -> torch.Tensor:
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[perm] = torch.arange(k) // group
    return g_idx


def write_quantized(src: Path, out: Path, fmt: str, **opts: Any) -> tuple[Path, str, int]:
    """Write ``src`` (a tiny fp32 model) quantized in ``fmt`` to ``out``; returns ``(out,
    linear scheme, group size)``. ``fmt``: ``fp8-block``, ``fp8-tensor`` (static input
    scales), ``awq``, ``gptq`` (``desc_act``, ``sym``). ``ignore``: projection names kept
    unquantized (e.g. ``("down_proj",)``)."""
    _copy_folder(src, out)
    tensors = load_file(str(next(src.glob("*.safetensors"))))
    ignore = tuple(opts.get("ignore", ()))
    group = int(opts.get("group", 32))
    desc_act, sym = bool(opts.get("desc_act", False)), bool(opts.get("sym", True))
    scheme, qcfg = {
        "fp8-block": ("fp8_block", {"quant_method": "fp8", "activation_scheme": "dynamic",
                                    "fmt": "e4m3", "weight_block_size": [128, 128]}),
        "fp8-tensor": ("fp8_per_tensor", {"quant_method": "fp8", "activation_scheme": "static"}),
        "awq": ("awq_w4a16", {"quant_method": "awq", "bits": 4, "group_size": group,
                              "zero_point": True, "version": "gemm"}),
        "gptq": ("gptq_w4a16", {"quant_method": "gptq", "bits": 4, "group_size": group,
                                "desc_act": desc_act, "sym": sym, "checkpoint_format": "gptq"}),
    }[fmt]
    if ignore:
        key = "modules_to_not_convert" if fmt in ("awq", "gptq") else "ignored_layers"
        qcfg[key] = list(ignore)
    saved: dict[str, torch.Tensor] = {}
    for name, t in sorted(tensors.items()):
        if not _is_projection(name) or name.split(".")[-2] in ignore:
            saved[name] = t
            continue
        w, base = t.double(), name[: -len(".weight")]
        if fmt == "fp8-block":
            parts = cq.quantize_fp8_block(w, torch.float8_e4m3fn)
        elif fmt == "fp8-tensor":
            parts = cq.quantize_fp8_per_tensor(w, torch.float8_e4m3fn)
            parts = {"weight": parts["weight"], "weight_scale": parts["weight_scale"].reshape(()),
                     "input_scale": torch.tensor(0.05, dtype=torch.float32)}
        elif fmt == "awq":
            parts = cq.pack_awq(w, group)
        else:
            # projections fed by the same input (q/k/v, gate/up) share one act order
            leaf = name.split(".")[-2]
            feed = "qkv" if leaf in ("q_proj", "k_proj", "v_proj") else \
                "gate_up" if leaf in ("gate_proj", "up_proj") else leaf
            order_seed = zlib.crc32(f"{name.split('.')[2]}.{feed}".encode())
            g_idx = _act_order_g_idx(w.shape[1], group, order_seed) if desc_act else None
            parts = _gptq_sym(w, group, g_idx) if sym else cq.pack_gptq(
                w, group, g_idx if g_idx is not None else torch.arange(w.shape[1]) // group)
        saved.update({f"{base}.{suffix}": v.contiguous() for suffix, v in parts.items()})
    save_file(saved, str(out / "model.safetensors"), metadata={"format": "pt"})
    _set_quant_config(out, qcfg)
    return out, scheme, group


def dequantized_state(path: Path, scheme: str, group: int) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint written by :func:`write_quantized`, each projection
    dequantized by the conformance oracle's definition of ``scheme``."""
    tensors = load_file(str(path / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        base, _, suffix = name.rpartition(".")
        if base.split(".")[-1] in PROJECTIONS and not (suffix == "weight" and t.is_floating_point()
                                                      and t.element_size() >= 2):
            bases.setdefault(base, {})[suffix] = t
        else:
            out[name] = t
    if scheme == "fp8_per_tensor":
        _common_fused_scales(bases)
    for base, parts in bases.items():
        parts.pop("input_scale", None)
        if "weight_packed" in parts:
            out[f"{base}.weight"] = _ct_w4_dequantize(parts, group)
            continue
        if scheme == "fp8_per_tensor":
            parts["weight_scale"] = parts["weight_scale"].reshape(1)
        out[f"{base}.weight"] = dequantize(scheme, parts, group).to(torch.float32).contiguous()
    return out


def _ct_w4_dequantize(parts: dict[str, torch.Tensor], group: int) -> torch.Tensor:
    """compressed-tensors pack-quantized 4-bit weights, unpacked by the library itself."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    n, k = (int(v) for v in parts["weight_shape"])
    q = unpack_from_int32(parts["weight_packed"], 4, torch.Size([n, k])).double()
    scale = parts["weight_scale"].double()
    zero = torch.zeros_like(scale)
    if "weight_zero_point" in parts:
        zero = unpack_from_int32(parts["weight_zero_point"], 4, torch.Size(scale.shape),
                                 packed_dim=0).double()
    cols = torch.arange(k) // group
    return ((q - zero[:, cols]) * scale[:, cols]).to(torch.float32)


def _common_fused_scales(bases: dict[str, dict[str, torch.Tensor]]) -> None:
    """Per-tensor fp8 shards that an engine fuses (q/k/v, gate/up) share one scale, the
    largest: each shard's fp8 values are re-rounded to it (docs/models.md)."""
    fused = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    for base in [b for b in bases if b.endswith(("q_proj", "gate_proj"))]:
        stem = base.rpartition(".")[0]
        names = next(f for f in fused if base.endswith(f[0]))
        members = [bases[f"{stem}.{n}"] for n in names if f"{stem}.{n}" in bases]
        common = max(float(m["weight_scale"]) for m in members)
        for m in members:
            ratio = float(m["weight_scale"]) / common
            m["weight"] = (m["weight"].double() * ratio).clamp(-448, 448).to(torch.float8_e4m3fn)
            m["weight_scale"] = torch.tensor(common, dtype=torch.float32)


def fake_quant_input(scheme: str, x: torch.Tensor) -> torch.Tensor:
    """What a W8A8 scheme's dynamic activation quantization makes of ``x`` (float path)."""
    xf = x.to(torch.float32)
    if scheme == "int8_w8a8":
        s = (xf.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
        return (torch.round(xf / s).clamp(-128, 127) * s).to(x.dtype)
    fmax = 448.0
    if scheme == "fp8_per_tensor":
        s = (xf.abs().amax() / fmax).clamp(min=1e-12)
    elif scheme == "fp8_per_channel":
        s = (xf.abs().amax(-1, keepdim=True) / fmax).clamp(min=1e-12)
    elif scheme == "fp8_block":  # groups of 128 columns, the last one possibly shorter
        k = xf.shape[-1]
        g = torch.nn.functional.pad(xf, (0, -k % 128)).unflatten(-1, (-1, 128))
        s = (g.abs().amax(-1, keepdim=True) / fmax).clamp(min=1e-12)
        q = (g / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).to(torch.float32) * s
        return q.flatten(-2)[..., :k].to(x.dtype)
    else:
        return x
    return ((xf / s).clamp(-fmax, fmax).to(torch.float8_e4m3fn).to(torch.float32) * s).to(x.dtype)


def add_activation_hooks(model: torch.nn.Module, scheme: str, skip: tuple[str, ...] = ()) -> None:
    """Quantize the input of every projection of ``model`` as ``scheme`` does, through
    forward pre-hooks; not those with a name component in ``skip`` (a projection such as
    ``kv_b_proj``, or a block such as ``shared_experts``)."""
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, torch.nn.Linear) and leaf in PROJECTIONS and \
                not set(name.split(".")) & set(skip):
            module.register_forward_pre_hook(lambda _m, args: (fake_quant_input(scheme, args[0]),))


def dequantized_reference(path: Path, scheme: str, group: int, tmp: Path,
                          skip: tuple[str, ...] = (), quantize_activations: bool = True
                          ) -> torch.nn.Module:
    """transformers (fp32) on the dequantized weights of ``path``, with the scheme's
    activation quantization hooked in (``quantize_activations``: else the exact weights
    alone)."""
    import transformers

    ref_dir = tmp / "dequantized"
    _copy_folder(path, ref_dir)
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    save_file(dequantized_state(path, scheme, group), str(ref_dir / "model.safetensors"),
              metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    if quantize_activations:
        add_activation_hooks(model, scheme, skip)
    return model


def _observe(weight: torch.Tensor, args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max of ``weight [N, K]`` at the granularity of compressed-tensors ``args``."""
    strategy = str(args.strategy.value if hasattr(args.strategy, "value") else args.strategy)
    if strategy == "channel":
        return weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    if strategy == "group":
        g = weight.unflatten(1, (-1, args.group_size))
        return g.amin(-1), g.amax(-1)
    if strategy == "block":
        b0, b1 = args.block_structure
        g = weight.unflatten(0, (-1, b0)).unflatten(2, (-1, b1))
        return g.amin(dim=(1, 3)), g.amax(dim=(1, 3))
    return weight.amin().reshape(1), weight.amax().reshape(1)


def write_compressed_tensors(src: Path, out: Path, preset: str, group: int = 32,
                             ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """Quantize ``src`` with compressed-tensors' preset scheme ``preset`` (``W4A16``,
    ``W4A16_ASYM``, ``W8A8``, ``FP8``, ``FP8_DYNAMIC``, ``FP8_BLOCK``), targets ``Linear``,
    weight scales from min/max (what a minmax observer computes), and save it compressed
    with the library's own compressor. Static activation scales (``FP8``) get 0.05."""
    import transformers
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if scheme.weights.group_size:
        scheme.weights.group_size = group
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(ignore))
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            qs = getattr(module, "quantization_scheme", None)
            if qs is None or qs.weights is None:
                continue
            lo, hi = _observe(module.weight.data, qs.weights)
            scale, zero = calculate_qparams(lo, hi, qs.weights)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
            if hasattr(module, "input_scale"):
                module.input_scale.data.fill_(0.05)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out
