"""The one definition of sampling (docs/architecture.md "Sampling"), and the host sampler:
numpy, on a floor that both the client and the server process import.

The device samplers implement this same function another way (custom_kernels/csrc/sampling.cu,
and its torch reference server/reference_sampler.py), so client and device sampling agree
token for token except where a draw lies within fp32 rounding of a boundary.

    u = uniform(seed, position)              # counter-based: no RNG state anywhere
    p = softmax(logits / temperature)        # fp32
    keep the top_k most probable (0 = all), in descending order (ties: lower id first)
    keep the shortest prefix whose mass (of p, not renormalised) reaches top_p
    kept_mass = that prefix's cumulative mass, or (no cut) the sum of the kept top-k p
    renormalise, and return the first kept token whose cumulative mass exceeds u * kept_mass

`position` is the position of the token whose logits are sampled, i.e. the sequence
length T of the step that produced them (for a prompt of n tokens the first generated
token is drawn with position n-1; after a step at T, with position T). The device
sampler keys its draw the same way, so both sampling paths give the same tokens.
temperature == 0 is greedy.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from case4_errors import BadInput

_M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_FAST_M = 1024  # candidates tried before a full sort (exact: the full sort is the fallback)
# A temperature below this is greedy (vLLM's _SAMPLING_EPS): logits / 1e-45 overflow fp32 to inf, and
# inf - inf made the softmax NaN, so such a temperature drew the last id of the vocabulary every time.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t == float("inf"):
            raise BadInput(f"temperature must be a number >= 0, got {t!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise BadInput(f"top_k must be an integer >= 0, got {k!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise BadInput(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(s, bool) or not isinstance(s, int) or not -(1 << 63) <= s <= _M64:
            raise BadInput(f"seed must be a 64-bit integer (-2**63 .. 2**64-1), got {s!r}")
        if 0 < t < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)  # greedy, on every sampling path

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> "SamplingParams":
        if not isinstance(d, dict):
            raise BadInput(f"sampling params must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"temperature", "top_k", "top_p", "seed"}
        if unknown:
            raise BadInput(f"unknown sampling params: {sorted(unknown)}")
        return cls(**d)


def splitmix64(x: int) -> int:
    z = (x + GOLDEN) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform(seed: int, position: int) -> float:
    """A float in [0, 1): the top 24 bits of splitmix64(seed * GOLDEN + position)."""
    z = splitmix64((seed * GOLDEN + position) & _M64)
    return (z >> 40) / float(1 << 24)


def _top_k_ids(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest values of p, ascending; of those tied at the cut, the lowest
    (argpartition alone would keep an arbitrary few of them)."""
    kth = np.partition(p, len(p) - k)[len(p) - k]  # the k-th largest value
    above = np.flatnonzero(p > kth)
    return np.sort(np.concatenate([above, np.flatnonzero(p == kth)[:k - len(above)]]))


def _sorted_top(p: np.ndarray, pool: np.ndarray | None, m: int) -> np.ndarray:
    """Ids of the m most probable tokens of pool (None: all; else ascending ids), descending,
    ties lower id first."""
    ids = np.arange(len(p)) if pool is None else pool
    if m < len(ids):
        ids = ids[_top_k_ids(p[ids], m)]  # pool ascending: the lowest positions are the lowest ids
    return ids[np.lexsort((ids, -p[ids]))]


def sample(logits, params: SamplingParams, position: int) -> int:
    """Sample one token id from fp32 logits [V] (numpy array or torch tensor)."""
    x = np.asarray(logits, dtype=np.float32).reshape(-1)
    if params.temperature == 0:
        return int(np.argmax(x))  # lowest index on ties
    z = np.exp(x / np.float32(params.temperature) - (x.max() / np.float32(params.temperature)))
    p = (z / z.sum(dtype=np.float32)).astype(np.float32)
    V = len(p)
    k = params.top_k if 0 < params.top_k < V else V
    pool = _top_k_ids(p, k) if k < V else None
    kept_mass = np.float32(p.sum(dtype=np.float32) if pool is None else np.sort(p[pool]).sum(dtype=np.float32))
    u = np.float32(uniform(params.seed, position))
    # Sort only the m most probable first; widen to the whole top-k set when the answer
    # is not decided inside them. Both give exactly the same token.
    m = min(k, _FAST_M)
    while True:
        order = _sorted_top(p, pool, m)
        cum = np.cumsum(p[order], dtype=np.float32)  # sequential: a prefix of the full cumsum
        n = m
        if params.top_p < 1.0 and cum[-1] >= np.float32(params.top_p):
            n = int(np.argmax(cum >= np.float32(params.top_p))) + 1  # shortest prefix reaching top_p
            target = u * cum[n - 1]
        elif m == k or params.top_p >= 1.0:
            target = u * kept_mass
            if m < k and not cum[-1] > target:
                m = k
                continue
        else:  # the top_p prefix is longer than m
            m = k
            continue
        j = int(np.searchsorted(cum[:n], target, side="right"))
        return int(order[min(j, n - 1)])

