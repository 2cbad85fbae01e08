"""Torch-native multi-head latent attention (contract: ``core/kernels/mla.py``).

``extend`` up-projects each sequence's cached latents into per-head K/V and attends (the
prefill form); ``decode`` absorbs ``w_kc`` into the query and ``w_vc`` into the output and
attends over the latent cache directly (the decode form), vectorised over a padded batch.
All math is fp32; outputs are in the query dtype. Runs on any torch device.
"""

from __future__ import annotations

import torch

from heteroserve.core.kernels.attention import AttentionMetadata
from heteroserve.core.kernels.mla import MLABackend, MLALayer

#: Upper bound on fp32 score elements materialised at once per sequence chunk.
_SCORE_BUDGET = 1 << 24


class TorchNativeMLA(MLABackend):
    """MLA with plain torch ops over a latent cache ``[pages, page_size, c + r]``, any page
    size, q/cache dtypes bf16/fp16/fp32; takes strided inputs."""

    strided_inputs = True

    def _check(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, meta: AttentionMetadata) -> None:
        c = self.config
        want = {"q_nope": (q_nope, (meta.num_tokens, c.num_heads, c.qk_nope_head_dim)),
                "q_pe": (q_pe, (meta.num_tokens, c.num_heads, c.qk_rope_head_dim)),
                "w_kc": (w_kc, (c.num_heads, c.qk_nope_head_dim, c.kv_lora_rank)),
                "w_vc": (w_vc, (c.num_heads, c.v_head_dim, c.kv_lora_rank))}
        for name, (t, shape) in want.items():
            if tuple(t.shape) != shape:
                raise ValueError(f"mla: {name} must be {list(shape)}, got {list(t.shape)}")
        if cache.shape[1:] != self.kv_cache_shape(1)[1:]:
            raise ValueError(f"mla: cache shape {list(cache.shape)} does not match "
                             f"[pages, {c.page_size}, {c.latent_dim}]")

    def _check_decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                      w_kc: torch.Tensor, w_vc: torch.Tensor, meta: AttentionMetadata) -> int:
        """:meth:`_check`, and one query per sequence; returns the batch size."""
        self._check(q_nope, q_pe, cache, w_kc, w_vc, meta)
        bsz = q_nope.shape[0]
        if bsz != meta.batch_size:
            raise ValueError(f"mla decode: expected one query per sequence "
                             f"({meta.batch_size}), got {bsz}")
        return bsz

    def _slots(self, meta: AttentionMetadata, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Page and in-page offset of positions ``0..width-1`` of every sequence, ``[B, width]``
        each (positions past a sequence's end land on padding page 0)."""
        ps = meta.page_size
        pos = torch.arange(width, device=meta.kv_page_indices.device)
        table = meta.block_table.to(torch.long)
        page_col = (pos // ps).clamp(max=table.shape[1] - 1)
        return table[:, page_col], (pos % ps).expand(table.shape[0], -1)

    def _check_new_rows(self, latent: torch.Tensor, k_pe: torch.Tensor,
                        meta: AttentionMetadata) -> None:
        """``ValueError`` naming ``latent`` or ``k_pe`` when it is not ``[T, width]``."""
        c = self.config
        if latent.shape != (meta.num_tokens, c.kv_lora_rank):
            raise ValueError(f"mla write_kv: latent must be [{meta.num_tokens}, "
                             f"{c.kv_lora_rank}], got {list(latent.shape)}")
        if k_pe.shape != (meta.num_tokens, c.qk_rope_head_dim):
            raise ValueError(f"mla write_kv: k_pe must be [{meta.num_tokens}, "
                             f"{c.qk_rope_head_dim}], got {list(k_pe.shape)}")

    def write_kv(self, latent: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        self._check_new_rows(latent, k_pe, meta)
        loc = meta.out_cache_loc.to(torch.long)
        cache[loc // meta.page_size, loc % meta.page_size] = torch.cat(
            [latent, k_pe], dim=-1).to(cache.dtype)

    def extend(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
               meta: AttentionMetadata) -> torch.Tensor:
        self._check(q_nope, q_pe, cache, w_kc, w_vc, meta)
        c = self.config
        out = torch.empty((q_nope.shape[0], c.num_heads, c.v_head_dim), dtype=q_nope.dtype,
                          device=q_nope.device)
        if q_nope.shape[0] == 0:
            return out
        pages, offs = self._slots(meta, meta.max_seq_len)
        wk, wv = w_kc.to(torch.float32), w_vc.to(torch.float32)
        q_start = 0
        for b, (seq_len, prefix) in enumerate(zip(meta.seq_lens_cpu, meta.prefix_lens_cpu)):
            n_new = seq_len - prefix
            if n_new <= 0:
                continue
            rows = cache[pages[b, :seq_len], offs[b, :seq_len]].to(torch.float32)
            latent, k_pe = rows[:, :c.kv_lora_rank], rows[:, c.kv_lora_rank:]
            k_nope = latent @ wk.transpose(1, 2)  # up-projected keys [H, L, dn]
            v = latent @ wv.transpose(1, 2)  # up-projected values [H, L, dv]
            k_pos = torch.arange(seq_len, device=q_nope.device)
            chunk = max(1, _SCORE_BUDGET // max(1, c.num_heads * seq_len))
            for lo in range(0, n_new, chunk):
                hi = min(n_new, lo + chunk)
                sel = slice(q_start + lo, q_start + hi)
                qn = q_nope[sel].to(torch.float32).transpose(0, 1)  # [H, n, dn]
                qp = q_pe[sel].to(torch.float32).transpose(0, 1)  # [H, n, r]
                scores = (qn @ k_nope.transpose(1, 2) + qp @ k_pe.t()) * layer.scale
                q_pos = torch.arange(prefix + lo, prefix + hi, device=q_nope.device)
                scores = scores.masked_fill(k_pos[None, None, :] > q_pos[None, :, None],
                                            float("-inf"))
                o = torch.softmax(scores, dim=-1) @ v  # [H, n, dv]
                out[sel] = o.transpose(0, 1).to(out.dtype)
            q_start += n_new
        return out

    def decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
               w_kc: torch.Tensor, w_vc: torch.Tensor, layer: MLALayer,
               meta: AttentionMetadata) -> torch.Tensor:
        bsz = self._check_decode(q_nope, q_pe, cache, w_kc, w_vc, meta)
        c = self.config
        if bsz == 0:
            return torch.empty((0, c.num_heads, c.v_head_dim), dtype=q_nope.dtype,
                               device=q_nope.device)
        width = meta.max_seq_len
        pages, offs = self._slots(meta, width)
        seq_lens = meta.seq_lens.to(torch.long).view(bsz, 1)
        in_seq = torch.arange(width, device=q_nope.device).view(1, width) < seq_lens  # [B, L]
        rows = cache[pages, offs].to(torch.float32)
        rows = torch.where(in_seq[..., None], rows, torch.zeros((), device=rows.device))
        latent, k_pe = rows[..., :c.kv_lora_rank], rows[..., c.kv_lora_rank:]
        # absorbed query: [H, B, dn] @ [H, dn, c] -> [B, H, c]
        q_lat = (q_nope.to(torch.float32).transpose(0, 1) @ w_kc.to(torch.float32)).transpose(0, 1)
        scores = (q_lat @ latent.transpose(1, 2)
                  + q_pe.to(torch.float32) @ k_pe.transpose(1, 2)) * layer.scale  # [B, H, L]
        scores = scores.masked_fill(~in_seq[:, None, :], float("-inf"))
        o_lat = torch.softmax(scores, dim=-1) @ latent  # [B, H, c]
        # absorbed output: [H, B, c] @ [H, c, dv] -> [B, H, dv]
        out = (o_lat.transpose(0, 1) @ w_vc.to(torch.float32).transpose(1, 2)).transpose(0, 1)
        return out.to(q_nope.dtype)
