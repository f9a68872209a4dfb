"""The reference decoder: pure torch, exactly the math of the decode step on our buffer
layout (weight arena views, KV arena with sessions; docs/architecture.md "Reference decoder"), for
every architecture of server/model/config.py's table: Qwen2's q/k/v biases and Mistral's / Qwen2's
sliding window included (the cuda backend has the biases, not the window; server/backends.py). It is
the oracle: it is checked against HF transformers on real weights, and the CUDA kernels against it.

`compute_dtype=torch.float32` (the oracle) upcasts weights per op and rounds to the model
dtype at the same points as HF (after each linear, norm and residual add). With
`compute_dtype` = the model dtype it is a fast torch path (cuBLAS GEMMs + SDPA on the GPU)
that the CUDA backend uses for prefill.

Quantized models (server/model/quant.py): a QuantLinear matrix enters each product as its exact
fp32 dequantized values (`dequantize`), so the oracle's weights are the quantized model's own, with
nothing rounded on the way. Up to DENSE_CACHE_BYTES of them (SmolLM2: 0.5 GB) are dequantized once
and kept; larger models dequantize each matrix per use (no dense copy of a 7B model).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from case4_errors import BadInput
from server.model.quant import QuantLinear, dequantize
from server.model.weights import ModelWeights
from server.kv import KVArena


DENSE_CACHE_BYTES = 2 << 30


class ReferenceDecoder:
    def __init__(self, weights: ModelWeights, kv: KVArena, compute_dtype: torch.dtype = torch.float32):
        self.w = weights
        self.cfg = weights.cfg
        self.kv = kv
        self.dtype = weights.dtype
        self.cdt = compute_dtype
        self.stages: dict[str, torch.Tensor] | None = None  # filled when recording
        qls = weights.quant_linears()
        self.dense: dict[int, torch.Tensor] = {}  # id(QuantLinear) -> its dequantized values, when they fit
        if sum(q.n * q.k * 4 for q in qls) <= DENSE_CACHE_BYTES:
            self.dense = {id(q): dequantize(q) for q in qls}

    # -- helpers ------------------------------------------------------------------------
    def _r(self, t: torch.Tensor) -> torch.Tensor:
        """Round to the model dtype (where HF would hold the value in it), keep computing in cdt."""
        return t if self.dtype == self.cdt else t.to(self.dtype).to(self.cdt)

    def _lin(self, x: torch.Tensor, w: torch.Tensor | QuantLinear, b: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w.T (+ b), rounded once, as HF's nn.Linear (bias included before the rounding)."""
        if hasattr(w, "prefill_linear"):  # the cuda backend's prefill on quantized weights (cuda_backend.DequantMatrix)
            return self._r(w.prefill_linear(x, None if b is None else b.to(self.cdt)))
        if isinstance(w, QuantLinear):
            w = self.dense[id(w)] if id(w) in self.dense else dequantize(w)
        return self._r(F.linear(x, w.to(self.cdt), None if b is None else b.to(self.cdt)))

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return self._r(w.to(self.cdt) * self._r(n.to(self.cdt)))

    def _rope(self, x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D]: HF half rotation of the first R dims; c, s [T, 1, R/2] fp32 table rows."""
        R = self.cfg.rotary_dim
        xf = x.float()
        a, b, rest = xf[..., :R // 2], xf[..., R // 2:R], xf[..., R:]
        out = torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)
        return self._r(out.to(self.cdt))

    def _record(self, name: str, t: torch.Tensor) -> None:
        if self.stages is not None:
            self.stages[name] = t.detach().float().cpu().clone()

    # -- the forward pass ------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, session: int, ids: list[int], start: int, last_only: bool = False) -> torch.Tensor:
        """Run tokens `ids` at positions start..start+T-1 of `session`; return fp32 logits [T, V]
        (last_only: of the last position only, [1, V])."""
        T = len(ids)
        if start + T > self.kv.max_seq:
            raise BadInput(f"sequence of {start + T} tokens exceeds the context of {self.kv.max_seq}")
        if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:  # on the host list: no device sync
            raise BadInput(f"token id out of range [0, {self.cfg.vocab_size})")
        tok = torch.tensor(ids, dtype=torch.long, device=self.w.arena.device)
        return self.forward_tokens(session, tok, start, last=slice(T - 1, T) if last_only else None)

    def forward_tokens(self, session: int, tok: torch.Tensor, start: int, last=None) -> torch.Tensor:
        """forward() on a device tensor of token ids [T] (checked by the caller), with no host
        sync: CUDA-graph capturable (server/prefill_graphs.py). `last` (a slice, or a device index
        tensor [1]) picks the rows that get logits; None: all T."""
        cfg, w, kvs = self.cfg, self.w, self.kv
        T = tok.shape[0]
        dev = w.arena.device
        pos = torch.arange(start, start + T, device=dev)
        cos = self.w.rope_cos[pos][:, None, :]                          # [T, 1, R/2], once for all layers
        sin = self.w.rope_sin[pos][:, None, :]
        # query i (position start + i) sees keys 0..start + i; a fresh prompt is plain causal
        causal = start == 0 and T > 1 and self.cdt != torch.float32
        keys = torch.arange(start + T, device=dev)[None, :]
        mask = None if causal else (keys <= pos[:, None])                # [T, S]
        # sliding window (transformers' sliding_window_overlay): position p also needs key > p - window;
        # it changes something only once the sequence is longer than the window
        win = cfg.sliding_window
        wmask = (keys <= pos[:, None]) & (keys > pos[:, None] - win) if win and start + T > win else None
        Hq, Hkv, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = w.embed[tok].to(self.cdt)                                   # [T, H]
        for l, lw in enumerate(w.layers):
            h = self._norm(x, lw.attn_norm)                             # [T, H]
            qkv = self._lin(h, lw.w_qkv, w.b_qkv[l] if w.b_qkv else None)  # [T, (Hq+2Hkv)D]
            q = qkv[:, :Hq * D].view(T, Hq, D)
            k = qkv[:, Hq * D:(Hq + Hkv) * D].view(T, Hkv, D)
            v = qkv[:, (Hq + Hkv) * D:].view(T, Hkv, D)
            self._record(f"L{l}.q", q), self._record(f"L{l}.k", k), self._record(f"L{l}.v", v)  # pre-RoPE, as HF's projections
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc, vc = kvs.k(session, l), kvs.v(session, l)               # [Hkv, max_seq, D]
            kc[:, start:start + T] = k.transpose(0, 1).to(self.dtype)
            vc[:, start:start + T] = v.transpose(0, 1).to(self.dtype)
            lmask = wmask if wmask is not None and cfg.window_of(l) else mask
            ctx = self._attention(q, kc[:, :start + T], vc[:, :start + T], lmask)  # [T, Hq*D]
            self._record(f"L{l}.ctx", ctx)
            x = self._r(x + self._lin(ctx, lw.w_o))
            self._record(f"L{l}.attn_out", x)
            h = self._norm(x, lw.mlp_norm)
            gu = self._lin(h, lw.w_gu)                                  # [T, 2I]
            I = cfg.intermediate_size
            act = self._r(F.silu(gu[:, :I].float()).to(self.cdt))
            mlp = self._lin(self._r(act * gu[:, I:]), lw.w_down)
            self._record(f"L{l}.mlp", mlp)
            x = self._r(x + mlp)
            self._record(f"L{l}.out", x)
        if last is not None:
            x = x[last]
        h = self._norm(x, w.final_norm)
        self._record("final_hidden", h)
        logits = self._lin(h, w.lm_head).float()
        self._record("logits", logits)
        return logits

    def _attention(self, q, kc, vc, mask: torch.Tensor | None) -> torch.Tensor:
        """q [T, Hq, D]; kc/vc [Hkv, start+T, D] (model dtype) -> ctx [T, Hq*D]. `mask` [T, S]
        (True = attend), or None for a plain causal prompt (start 0: SDPA's causal kernel)."""
        cfg = self.cfg
        T, Hq, D = q.shape
        g = cfg.group
        k, v = kc.to(self.cdt), vc.to(self.cdt)                          # [Hkv, S, D]
        if g > 1:  # each KV head serves g query heads (expand + copy: no host sync, graph-safe)
            k = k[:, None].expand(-1, g, -1, -1).reshape(Hq, -1, D)      # [Hq, S, D]
            v = v[:, None].expand(-1, g, -1, -1).reshape(Hq, -1, D)
        qh = q.transpose(0, 1)                                          # [Hq, T, D]
        if mask is None:
            ctx = F.scaled_dot_product_attention(qh[None], k[None], v[None], is_causal=True)[0]
        elif self.cdt == torch.float32:
            scores = (qh @ k.transpose(1, 2)).float() * D ** -0.5
            scores = scores.masked_fill(~mask, float("-inf"))
            ctx = torch.softmax(scores, dim=-1).to(self.cdt) @ v
        else:
            ctx = F.scaled_dot_product_attention(qh[None], k[None], v[None], attn_mask=mask[None, None])[0]
        return self._r(ctx.transpose(0, 1).reshape(T, Hq * D))

    # -- the server-facing API -----------------------------------------------------------
    def prefill(self, session: int, ids: list[int]) -> torch.Tensor:
        """Reset `session`, run the prompt; fp32 logits [V] of its last position."""
        self.kv.check_session(session)
        if not ids:
            raise BadInput("the prompt is empty")
        logits = self.forward(session, list(ids), 0, last_only=True)
        self.kv.seq_len[session] = len(ids)
        return logits[-1]

    def step(self, session: int, token: int) -> torch.Tensor:
        """One decode step at position seq_len[session]; fp32 logits [V]."""
        self.kv.check_session(session)
        T = self.kv.seq_len[session]
        logits = self.forward(session, [int(token)], T)
        self.kv.seq_len[session] = T + 1
        return logits[0]

    def step_stages(self, session: int, token: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.stages = {}
        try:
            logits = self.step(session, token)
            return logits, self.stages
        finally:
            self.stages = None
