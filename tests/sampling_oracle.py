"""The float64 oracle that judges a disagreement between the two sampler implementations
(host: case4_sampling.py in numpy; device: sampling.cu, or its torch reference
server/reference_sampler.py). Both compute in fp32 and sum in different orders, so they may
pick different tokens only where the draw lies within fp32 rounding of a boundary: the
target u * kept_mass against a cumulative mass, the top-p cut against top_p, or two tokens
whose fp32 probabilities tie but whose logits differ (the device orders by the logit's
bits, so it also puts +0.0 above -0.0; the host orders by fp32 probability, then id).

`ambiguous` evaluates the rule in float64 and returns every token that a decision moved
by at most the fp32 error bound can give. The bound of a cumulative mass over j terms is
the classic one for a recursive fp32 sum, j * 2**-24 * the sum (SLACK times over, for the
rounding of the probabilities themselves and the two orders of summation); it is tight
where it matters: a peaked distribution gives one or two candidates."""
from __future__ import annotations

import numpy as np

from case4_sampling import SamplingParams, uniform

EPS32 = 2.0 ** -24
SLACK = 4.0


def _candidates(p64: np.ndarray, order: np.ndarray, params: SamplingParams, u: float) -> set[int]:
    k = params.top_k if 0 < params.top_k < len(order) else len(order)
    order = order[:k]
    cum = np.cumsum(p64[order])
    err = SLACK * EPS32 * (np.arange(k) + 1) * cum + 1e-12  # bound on each fp32 cumulative mass
    lens = {k}
    top_p = float(np.float32(params.top_p))
    if params.top_p < 1.0 and cum[-1] + err[-1] >= top_p:  # a cut may apply: every length it may have
        reach = np.flatnonzero(cum + err >= top_p)          # prefixes that may reach top_p
        short = np.flatnonzero(cum - err >= top_p)          # prefixes that surely do
        last = short[0] if len(short) else k - 1
        lens = set(range(int(reach[0]) + 1, int(last) + 2))
        if cum[-1] - err[-1] < top_p:
            lens.add(k)  # the kept mass may fall short of top_p: no cut
    out = set()
    for n in lens:
        target, t_err = u * cum[n - 1], u * err[n - 1]
        # token j is drawn when cum[j-1] <= target < cum[j]; allow each side its error
        lo = np.flatnonzero(cum[:n] + err[:n] > target - t_err)
        hi = np.flatnonzero(np.concatenate([[0.0], cum[:n - 1] - err[:n - 1]]) <= target + t_err)
        first = int(lo[0]) if len(lo) else n - 1
        out.update(int(t) for t in order[first:max(first, int(hi[-1])) + 1])
    return out


def ambiguous(logits, params: SamplingParams, position: int) -> set[int]:
    """Every token the rule can give within fp32 rounding of its decisions (float64 masses)."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    if params.temperature == 0:
        return {int(np.argmax(x))}
    ids = np.arange(len(x))
    x64 = x.astype(np.float64) / float(np.float32(params.temperature))
    p64 = np.exp(x64 - x64.max())
    p64 /= p64.sum()
    z = np.exp(x / np.float32(params.temperature) - x.max() / np.float32(params.temperature))
    p32 = z / z.sum(dtype=np.float32)
    orders = (np.lexsort((ids, np.signbit(x), -x)),  # the device's: descending logit (+0 above -0), then id
              np.lexsort((ids, -p32)))               # the host's: descending fp32 probability, then id
    u = uniform(params.seed, position)
    return set().union(*(_candidates(p64, o, params, u) for o in orders))


def explained(logits, params: SamplingParams, position: int, a: int, b: int) -> bool:
    """True when tokens a and b are both draws the float64 rule allows within rounding."""
    return a == b or {a, b} <= ambiguous(logits, params, position)
