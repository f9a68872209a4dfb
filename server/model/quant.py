"""Weight-only quantized matrices: the one layout both backends and the GGUF reader share.

A quantized `[N, K]` projection (N output rows, K inputs, row-major like every matrix in the arena) is a
`QuantLinear`. Groups run along the input dimension K; group `g` of row `n` covers inputs
`[g*G, (g+1)*G)`. Dequantization is defined in fp32 and is exact (no rounding) for every mode:

    int8:  w[n, k] = float(q[n, k]) * float(scale[n, k // G])                       q: int8  [N, K]
    int4:  w[n, k] = float(nib[n, k]) * float(scale[n, k // G]) + float(minv[n, k // G])
           q: uint8 [N, K // 2]; byte j of row n holds input 2j in its low nibble and 2j+1 in its high one;
           nib in 0..15.
    scale, minv: fp16 [N, K // G]

`q * scale` is exact in fp32 (a <= 8-bit integer times an 11-bit mantissa), so fused or unfused
multiply-add give the same fp32 value. This is what lets GGUF blocks map on without rounding:

    Q8_0 (32 int8 + fp16 d)           -> int8, G = 32, scale = d
    Q4_0 (32 nibbles + fp16 d)        -> int4, G = 32, scale = d, minv = -8 * d   (exact: a power of two)
    Q4_1 (32 nibbles + fp16 d, m)     -> int4, G = 32, scale = d, minv = m

Quantizing at load (round to nearest, from fp16/bf16/fp32):
    int8: symmetric, G = K by default (one scale per output row): scale = fp16(max|w| / 127),
          q = clamp(round(w / scale), -127, 127)
    int4: asymmetric, G in {32, 64, 128} (default 128): minv = fp16(min w), scale = fp16((max w - min w) / 15),
          nib = clamp(round((w - minv) / scale), 0, 15)   (with the fp16-rounded scale and minv)
A group whose scale is 0 (constant weights) dequantizes to minv (int4) or 0 (int8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantLinear:
    mode: str                  # "int8" | "int4"
    n: int                     # output rows
    k: int                     # inputs
    group: int                 # inputs per scale group (divides k)
    q: torch.Tensor            # int8 [n, k] | uint8 [n, k // 2]
    scale: torch.Tensor        # fp16 [n, k // group]
    minv: torch.Tensor | None  # fp16 [n, k // group] (int4), None (int8)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    def nbytes(self) -> int:
        """Bytes a decode step reads for this matrix."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.minv) if t is not None)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k/2] -> int values 0..15 as uint8 [n, k] (low nibble first)."""
    lo, hi = q & 0x0F, q >> 4
    return torch.stack((lo, hi), dim=-1).reshape(q.shape[0], q.shape[1] * 2)


def pack_int4(nib: torch.Tensor) -> torch.Tensor:
    """uint8 [n, k] with values 0..15 -> uint8 [n, k/2] (input 2j low nibble, 2j+1 high)."""
    nib = nib.to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def dequantize(ql: QuantLinear) -> torch.Tensor:
    """The exact fp32 values of `ql` ([n, k]), the definition every kernel is checked against."""
    g = ql.k // ql.group
    scale = ql.scale.float().reshape(ql.n, g, 1)
    if ql.mode == "int8":
        w = ql.q.float().reshape(ql.n, g, ql.group) * scale
    else:
        w = unpack_int4(ql.q).float().reshape(ql.n, g, ql.group) * scale + ql.minv.float().reshape(ql.n, g, 1)
    return w.reshape(ql.n, ql.k)


# ---------------------------------------------------------------------------------------
# building QuantLinear (additions of the Python side: load-time RTN and synthetic weights)

def _groups(k: int, group: int) -> int:
    if group <= 0 or k % group:
        raise ValueError(f"group size {group} does not divide the input dimension {k}")
    return k // group


def quantize_rtn(w: torch.Tensor, mode: str, group: int) -> QuantLinear:
    """Round-to-nearest quantization of `w` [n, k] (any float dtype, any device) exactly as the
    module docstring defines it: the scale (and minimum) are rounded to fp16 first, and the integers
    are rounded against those fp16 values, so dequantize() gives the nearest grid point the stored
    scale can express. torch.round rounds halves to even. Computed in fp32, on w's device, with the same bits on
    either: every division is by a tensor on that device (CUDA divides by a Python number as a multiplication by
    its reciprocal, which rounded some scales differently from the CPU: session 33, tests/gpu/test_gguf_gpu.py)."""
    n, k = w.shape
    g = _groups(k, group)
    wf = w.float().reshape(n, g, group)
    if mode == "int8":
        scale = (wf.abs().amax(-1) / wf.new_tensor(127.0)).half()         # [n, g]
        s = scale.float()[..., None]
        q = torch.where(s > 0, torch.round(wf / torch.where(s > 0, s, 1)), 0).clamp_(-127, 127)
        return QuantLinear("int8", n, k, group, q.to(torch.int8).reshape(n, k).contiguous(), scale, None)
    if mode == "int4":
        lo, hi = wf.amin(-1), wf.amax(-1)
        minv, scale = lo.half(), ((hi - lo) / wf.new_tensor(15.0)).half()
        s, m = scale.float()[..., None], minv.float()[..., None]
        nib = torch.where(s > 0, torch.round((wf - m) / torch.where(s > 0, s, 1)), 0).clamp_(0, 15)
        return QuantLinear("int4", n, k, group, pack_int4(nib.reshape(n, k)).contiguous(), scale, minv)
    raise ValueError(f"unknown quantization mode '{mode}' (choose from {', '.join(MODES[1:])})")


def empty_quant(n: int, k: int, mode: str, group: int, device="cpu") -> QuantLinear:
    """An uninitialised QuantLinear of the given layout (for filling in place)."""
    g = _groups(k, group)
    if mode == "int8":
        q = torch.empty(n, k, dtype=torch.int8, device=device)
    else:
        q = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
    minv = torch.empty(n, g, dtype=torch.float16, device=device) if mode == "int4" else None
    return QuantLinear(mode, n, k, group, q, torch.empty(n, g, dtype=torch.float16, device=device), minv)


# std of a uniform draw over the integers of each mode: -127..127 (int8), 0..15 (int4)
_UNIFORM_STD = {"int8": (((255 ** 2) - 1) / 12) ** 0.5, "int4": (((16 ** 2) - 1) / 12) ** 0.5}


def random_quant(ql: QuantLinear, std: float, gen: torch.Generator) -> QuantLinear:
    """Fill `ql` (its own tensors, in place: no float copy of the matrix is ever made) with seeded
    random weights whose dequantized values have mean ~0 and standard deviation ~`std`: uniform
    integers, per-group scales std/std(integers) * (1 + N(0, 0.1)), int4 minimum -7.5 * scale."""
    if ql.mode == "int8":
        ql.q.random_(-127, 128, generator=gen)
    else:
        ql.q.random_(0, 256, generator=gen)  # two uniform nibbles per byte
    base = std / _UNIFORM_STD[ql.mode]
    s = torch.empty(ql.scale.shape, dtype=torch.float32, device=ql.scale.device)
    s.normal_(1.0, 0.1, generator=gen).clamp_(min=0.5).mul_(base)
    ql.scale.copy_(s)
    if ql.minv is not None:
        ql.minv.copy_(ql.scale.float() * -7.5)
    return ql
