"""The device sampler in torch: the reference of custom_kernels/csrc/sampling.cu, as
server/reference.py is of the decode kernels. The reference backend samples with it in
device mode (docs/architecture.md "Sampling").

It draws the same token as the host sampler (case4_sampling.py) by a different method, the
kernel's: no sort. Every kept set is a prefix of the order "descending logit, ascending id",
so each cut is a radix select over a 52-bit key (32 order-preserving bits of the logit,
then 20 bits of ~id), 8 bits per pass from the top, with 256-bin histograms of counts or of
probability mass:
    top-k cut -> the k-th largest key;
    top-p cut -> the first key (among those kept) whose cumulative mass reaches top_p;
    the token -> the first kept key whose cumulative mass exceeds u * kept_mass,
with u = uniform(seed, position) and the masses those of the softmax over the whole
vocabulary (not renormalised after a cut). Sums are fp32, as on the device; only their
order differs (the kernel's float atomics have none), so the two agree except where a draw
lies within fp32 rounding of a boundary.
"""
from __future__ import annotations

import struct

import torch

from case4_sampling import SamplingParams, uniform

ID_BITS = 20  # vocab < 2**20 (sampling.cu kIdBits)
_ID_MASK = (1 << ID_BITS) - 1


def _f32(x: float) -> float:
    """Round a Python float to fp32 (a sum of two fp32 values rounded so is the fp32 sum)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def sort_keys(logits: torch.Tensor) -> torch.Tensor:
    """int64 [V]: order-preserving bits of each fp32 logit, then ~id (sampling.cu sort_key)."""
    b = logits.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b | 0x80000000)
    ids = torch.arange(logits.numel(), device=logits.device, dtype=torch.int64)
    return (b << ID_BITS) | (_ID_MASK - ids)


def radix_find(keys: torch.Tensor, weight: torch.Tensor, target: float, strict: bool) -> int | None:
    """The largest key r with sum(weight of keys >= r) >= target (strict: > target), by a
    radix select 8 bits at a time from bit 48 down (sampling.cu radix_find); None if none.
    `keys` are the candidates (those at or above the current cut)."""
    prefix, above = 0, 0.0
    for shift in range(48, -1, -8):
        digit = (keys >> shift) & 255
        hist = torch.zeros(256, dtype=torch.float32, device=keys.device).index_add_(0, digit, weight)
        cum, chosen = above, -1
        for d, h in reversed(list(enumerate(hist.tolist()))):  # thread 0's scan, fp32 as there
            nxt = _f32(cum + h)
            if (nxt > target) if strict else (nxt >= target):
                chosen = d
                break
            cum = nxt
        if chosen < 0:
            return None
        above, prefix = cum, prefix | (chosen << shift)
        inside = digit == chosen  # the next pass looks only inside the chosen bucket
        keys, weight = keys[inside], weight[inside]
    return prefix


def device_sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """One token from fp32 logits [V] (on any torch device), as the CUDA finish kernel draws it."""
    x = logits.reshape(-1).float()
    V = x.numel()
    if not params.temperature > 0:  # greedy: the largest value, lowest id on ties; NaN never wins
        x = torch.where(torch.isnan(x), float("-inf"), x)
        m = x.max()
        if not m > float("-inf"):
            return 0  # no maximum (all -inf or NaN): token 0 keeps the next gather in bounds
        return int(torch.nonzero(x == m)[0, 0])
    temp = torch.tensor(params.temperature, dtype=torch.float32, device=x.device)
    mx = torch.where(torch.isnan(x), float("-inf"), x).max()
    e = torch.exp(x / temp - mx / temp)
    prob = e / e.sum()
    keys = sort_keys(x)
    cut = 0
    k = params.top_k if 0 < params.top_k < V else V
    if k < V:
        cut = radix_find(keys, torch.ones_like(prob), float(k), strict=False)
    kept = keys >= cut
    mass = float(prob[kept].sum())
    u = uniform(params.seed, position)
    target = _f32(u * mass)
    top_p = _f32(params.top_p)
    if top_p < 1.0 and mass >= top_p:
        cp = radix_find(keys[kept], prob[kept], top_p, strict=False)
        if cp is not None:
            cut = cp
            kept = keys >= cut
            target = _f32(u * float(prob[kept].sum()))
    key = radix_find(keys[kept], prob[kept], target, strict=True)
    if key is None:  # rounding: no kept token exceeds the target -> the last kept token
        key = int(keys[kept].min())
    return _ID_MASK - (key & _ID_MASK)
