"""Random quantized models for the timing tools (bench/quick_timing.py): synthetic fp16 weights whose projections
and lm_head are replaced by random QuantLinear drawn on the GPU (server/model/quant.py's layout), and the bytes a
decode step then reads. The fp16 arena stays allocated (7B: 13.5 GB next to 3.5 GB of int4), so this is for shapes
whose fp16 weights fit; the server's own `synthetic:<shape> --quant` builds them without the fp16 copy."""
from __future__ import annotations

import math

import torch

from server.model.quant import QuantLinear, pack_int4

MATRICES = ("w_qkv", "w_o", "w_gu", "w_down")


def random_quant(mode: str, n: int, k: int, group: int, gen: torch.Generator, gain: float = 1.0) -> QuantLinear:
    """Values ~N(0, gain^2 / k)-sized: outputs O(gain), as synthetic_weights' matrices. group 0: k (one per row)."""
    group = group or k
    ng = k // group
    if mode == "int8":
        q = torch.randint(-127, 128, (n, k), device="cuda", generator=gen, dtype=torch.int8)
        s = (gain * (0.5 + torch.rand(n, ng, device="cuda", generator=gen)) / (73.0 * math.sqrt(k))).half()
        return QuantLinear("int8", n, k, group, q, s, None)
    nib = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.uint8)
    s = (gain * (0.5 + torch.rand(n, ng, device="cuda", generator=gen)) / (4.6 * math.sqrt(k))).half()
    m = (-7.5 * s.float()).half()
    return QuantLinear("int4", n, k, group, pack_int4(nib).contiguous(), s, m)


def quantize_random(w, mode: str, group: int, seed: int = 0):
    """Replace w's projections and lm_head (in place) by random QuantLinear; a group that does not divide a
    matrix's K falls back to K (one group a row)."""
    g = torch.Generator(device="cuda").manual_seed(seed + 1000)
    for lw in w.layers:
        for name in MATRICES:
            n, k = getattr(lw, name).shape
            setattr(lw, name, random_quant(mode, n, k, group if group and k % group == 0 else 0, g))
    V, H = w.lm_head.shape
    w.lm_head = random_quant(mode, V, H, group if group and H % group == 0 else 0, g, gain=4.0)
    return w


def quant_weight_bytes(w) -> int:
    """Weight bytes one decode step reads: every matrix (quantized: q + scales + minimums), the norms and one
    embedding row (the model dtype)."""
    cfg = w.cfg
    e = w.embed.element_size()
    mats = [getattr(lw, n) for lw in w.layers for n in MATRICES] + [w.lm_head]
    b = sum(m.nbytes() if isinstance(m, QuantLinear) else m.numel() * e for m in mats)
    return b + (2 * cfg.num_layers + 2) * cfg.hidden_size * e
