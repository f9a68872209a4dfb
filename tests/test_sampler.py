"""case4_sampling.py: the counter RNG, the exact host sampling rule, and its statistics."""
import numpy as np
import pytest

from case4_errors import BadInput
from case4_sampling import SamplingParams, sample, splitmix64, uniform


def naive_sample(logits, p: SamplingParams, position: int) -> int:
    """docs/architecture.md "Sampling", written the slow, obvious way (full sort)."""
    x = np.asarray(logits, dtype=np.float32)
    if p.temperature == 0:
        return int(np.argmax(x))
    z = np.exp(x / np.float32(p.temperature) - x.max() / np.float32(p.temperature))
    prob = (z / z.sum(dtype=np.float32)).astype(np.float32)
    order = np.lexsort((np.arange(len(prob)), -prob))
    k = p.top_k if 0 < p.top_k < len(prob) else len(prob)
    order = order[:k]
    cum = np.cumsum(prob[order], dtype=np.float32)
    if p.top_p < 1 and cum[-1] >= np.float32(p.top_p):
        n = int(np.argmax(cum >= np.float32(p.top_p))) + 1
        mass = cum[n - 1]
    else:
        n, mass = k, np.sort(prob[order]).sum(dtype=np.float32) if k < len(prob) else prob.sum(dtype=np.float32)
    j = int(np.searchsorted(cum[:n], np.float32(uniform(p.seed, position)) * np.float32(mass), side="right"))
    return int(order[min(j, n - 1)])


def test_splitmix64_reference_vector():
    assert splitmix64(0) == 0xE220A8397B1DCDAF  # the first output of splitmix64 seeded with 0


def test_uniform_is_deterministic_and_uniform():
    us = np.array([uniform(7, i) for i in range(20000)])
    assert uniform(7, 3) == uniform(7, 3) and uniform(7, 3) != uniform(8, 3)
    assert us.min() >= 0 and us.max() < 1
    assert abs(us.mean() - 0.5) < 0.01
    hist, _ = np.histogram(us, bins=10, range=(0, 1))
    assert hist.min() > 1800 and hist.max() < 2200


def test_greedy_is_argmax_lowest_index_on_ties():
    x = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    assert sample(x, SamplingParams(), 5) == 1


@pytest.mark.parametrize("params", [
    SamplingParams(0.7, 0, 1.0, 1), SamplingParams(1.0, 40, 1.0, 2), SamplingParams(0.9, 0, 0.9, 3),
    SamplingParams(1.3, 50, 0.8, 4), SamplingParams(2.0, 0, 0.999, 5), SamplingParams(1.0, 3000, 0.95, 6),
])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat (full-sort fallback) to peaked (fast path)
def test_fast_path_equals_the_definition(params, scale):
    rng = np.random.default_rng(int(scale * 10))
    for pos in range(25):
        x = (rng.standard_normal(5000) * scale).astype(np.float32)
        assert sample(x, params, pos) == naive_sample(x, params, pos)


def test_frequencies_match_softmax():
    x = np.log(np.array([0.5, 0.25, 0.15, 0.1], dtype=np.float32))
    n = 20000
    counts = np.bincount([sample(x, SamplingParams(1.0, seed=11), i) for i in range(n)], minlength=4)
    assert np.allclose(counts / n, [0.5, 0.25, 0.15, 0.1], atol=0.015)


def test_top_k_and_top_p_restrict_the_support():
    x = np.log(np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32))
    got_k = {sample(x, SamplingParams(1.0, top_k=2, seed=1), i) for i in range(2000)}
    assert got_k == {0, 1}
    got_p = {sample(x, SamplingParams(1.0, top_p=0.65, seed=1), i) for i in range(2000)}
    assert got_p == {0, 1}  # 0.4 < 0.65 <= 0.7
    assert {sample(x, SamplingParams(5.0, top_k=1, seed=3), i) for i in range(200)} == {0}


def test_top_k_ties_at_the_cut_keep_the_lowest_ids():
    x = np.zeros(1000, dtype=np.float32)
    x[[700, 900]] = 1.0
    got = {sample(x, SamplingParams(1.0, top_k=5, seed=9), i) for i in range(3000)}
    assert got == {700, 900, 0, 1, 2}  # the two largest, then the lowest ids of the 998 tied


def test_ties_across_the_fast_path_keep_id_order():
    """All equal: the draw is the token at u * V in id order, also where the first candidates
    (_FAST_M of them) decide it, i.e. ties at their edge must keep the lowest ids too."""
    V = 5000
    x = np.zeros(V, dtype=np.float32)
    for i in range(300):
        want = uniform(4, i) * V
        assert abs(sample(x, SamplingParams(1.0, seed=4), i) - want) < 1.5, (i, want)  # 1.5: fp32 cumsum


def test_seeded_sampling_is_reproducible():
    x = np.random.default_rng(0).standard_normal(49152).astype(np.float32) * 4
    p = SamplingParams(0.8, 40, 0.95, 1234)
    a = [sample(x, p, i) for i in range(50)]
    assert a == [sample(x, p, i) for i in range(50)]
    assert a != [sample(x, SamplingParams(0.8, 40, 0.95, 1235), i) for i in range(50)]


def test_seeds_of_64_bits_are_taken():
    for s in (0, 2**64 - 1, -2**63, -1):
        assert SamplingParams(seed=s).seed == s
    assert uniform(2**64 - 1, 5) == uniform(-1, 5)  # the draw keys on the seed mod 2**64, as the device does


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                dict(seed=1.5), dict(temperature=float("nan")), dict(seed=2**64),
                                dict(seed=-2**63 - 1), dict(seed=2**70)])
def test_bad_params_are_bad_input(kw):
    with pytest.raises(BadInput):
        SamplingParams(**kw)
    with pytest.raises(BadInput):
        SamplingParams.from_dict({"bogus": 1})


@pytest.mark.parametrize("t", [1e-300, 1e-45, 1e-40, 9e-6])
def test_a_temperature_too_small_for_fp32_is_greedy(t):
    """A positive temperature below 1e-5 (vLLM's threshold) is greedy on both sampling paths: logits / 1e-45
    overflowed fp32 to inf, the softmax was NaN, and the host drew the last id of the vocabulary every time."""
    import torch
    from server.reference_sampler import device_sample
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    p = SamplingParams(t, 0, 1.0, 3)
    assert p.greedy and p.temperature == 0.0
    assert sample(x, p, 5) == device_sample(torch.from_numpy(x), p, 5) == int(np.argmax(x))


# ---- the two implementations: host (numpy, above) and device (server/reference_sampler.py, the torch
# reference of custom_kernels/csrc/sampling.cu), on fresh random logits and params every run

def _random_case(rng, ties: bool):
    V = int(rng.choice([7, 64, 1000, 32000, 49152]))
    x = (rng.standard_normal(V) * rng.choice([0.1, 1.0, 3.0, 10.0])).astype(np.float32)
    if ties:  # many equal logits (+0.0 only: the device orders -0.0 below +0.0, see test below)
        x = np.round(x * 4) + np.float32(0.0)
    params = SamplingParams(float(rng.choice([0.0, 0.5, 1.0, 1.7])), int(rng.choice([0, 1, 5, 50, 1000])),
                            float(rng.choice([1.0, 0.99, 0.9, 0.5])), int(rng.integers(0, 2**63)))
    return x, params, int(rng.integers(0, 1 << 20))


@pytest.mark.parametrize("ties", [False, True])
def test_host_and_device_samplers_agree(ties):
    """Token for token; a mismatch only where the float64 oracle puts the draw within fp32 rounding
    of a boundary (tests/sampling_oracle.py), and few of those. Every draw of either is one the
    oracle allows, so the two cannot agree on a wrong token either."""
    import torch
    from sampling_oracle import ambiguous
    from server.reference_sampler import device_sample
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    n, mismatches = 150, []
    for i in range(n):
        x, params, pos = _random_case(rng, ties)
        host, dev = sample(x, params, pos), device_sample(torch.from_numpy(x), params, pos)
        if params.greedy:
            assert host == dev, (seed, i)
            continue
        allowed = ambiguous(x, params, pos)
        assert host in allowed and dev in allowed, (seed, i, params, pos, host, dev, sorted(allowed)[:10])
        if host != dev:
            mismatches.append(i)
    # measured (2,200 sampled draws each): 0.3 % continuous, 0.8 % tie-heavy; the bound is ~10x that
    assert len(mismatches) <= (n // 15 if ties else n // 30), (seed, mismatches)


def test_device_orders_like_the_kernel():
    """The device sampler's order is the kernel's sort key: descending logit bits, then ascending id,
    so -0.0 ranks below +0.0 (the host ranks equal probabilities by id only)."""
    import torch
    from server.reference_sampler import device_sample, sort_keys
    x = torch.tensor([-0.0, 0.0, 1.0, -1.0, 1.0, float("-inf")])
    order = sorted(range(6), key=lambda i: -int(sort_keys(x)[i]))
    assert order == [2, 4, 1, 0, 3, 5]
    assert device_sample(x, SamplingParams(1.0, top_k=3, seed=0), 0) in {2, 4, 1}
    assert device_sample(x, SamplingParams(), 0) == 2  # greedy: lowest id of the maximum
    assert device_sample(torch.full((5,), float("nan")), SamplingParams(), 0) == 0  # no maximum: token 0
