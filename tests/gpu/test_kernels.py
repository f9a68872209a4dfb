"""Each kernel against float64 on fresh random inputs, outputs poisoned (NaN) first.

Bounds (‖out − ref‖ / ‖ref‖ against an unrounded float64 reference): fp16 2e-3,
bf16 1.5e-2 for GEMVs; attention fp16 3e-3, bf16 2e-2 (its inputs are rounded RoPE
values, its output is rounded once).
"""
import math

import numpy as np
import pytest
import torch

from custom_kernels.ext import load_extension

pytestmark = pytest.mark.gpu
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DTI = {"float16": 0, "bfloat16": 1}
GEMV_TOL = {"float16": 2e-3, "bfloat16": 1.5e-2}
ATT_TOL = {"float16": 3e-3, "bfloat16": 2e-2}
STORE, RESID, SWIGLU, F32 = 0, 1, 2, 3


def rel(out, ref):
    out, ref = out.double().cpu(), ref.double().cpu()
    assert torch.isfinite(out).all(), "unwritten (NaN) or non-finite outputs"
    return float((out - ref).norm() / ref.norm())


def stream():
    return torch.cuda.current_stream().cuda_stream


# (N, K): SmolLM2 qkv/o/gu/down/lm_head, Llama-2-7B qkv/o/gu/down/lm_head, GQA 32/8 qkv; rows not a multiple of
# lm_small_kernel's 4 per warp with K < 576 (its lanes past the row's end)
GEMV_SHAPES = [(960, 576), (576, 576), (1536, 576), (576, 1536), (49152, 576),
               (12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (6144, 4096),
               (1001, 512), (1001, 136)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("N,K", GEMV_SHAPES)
def test_gemv_modes(N, K, dtype):
    ext = load_extension()
    dt, g = DT[dtype], torch.Generator(device="cuda").manual_seed(N * 7 + K)
    W = (torch.randn(2 * N, K, device="cuda", generator=g) / math.sqrt(K)).to(dt)
    x = torch.randn(K, device="cuda", generator=g).to(dt)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dt)
    Wd, xd = W.double(), x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * nw.double()
    for mode in (STORE, RESID, SWIGLU, F32):
        for norm in (False, True):
            xin = xn if norm else xd
            y = Wd[:N] @ xin
            if mode == STORE:
                out, ref = torch.full((N,), float("nan"), device="cuda", dtype=dt), y
            elif mode == RESID:
                base = torch.randn(N, device="cuda", generator=g).to(dt)
                out, ref = base.clone(), y + base.double()
            elif mode == SWIGLU:
                u = Wd[N:] @ xin
                out, ref = torch.full((N,), float("nan"), device="cuda", dtype=dt), y * torch.sigmoid(y) * u
            else:
                out, ref = torch.full((N,), float("nan"), device="cuda", dtype=torch.float32), y
            ext.gemv(W.data_ptr(), N, K, x.data_ptr(), nw.data_ptr() if norm else 0, 1e-5, out.data_ptr(), mode,
                     DTI[dtype], stream(), 0, 132 * 4)
            torch.cuda.synchronize()
            e = rel(out, ref)
            assert e < GEMV_TOL[dtype], f"mode {mode} norm {norm}: rel err {e:.2e}"


def rope64(x, pos, cos, sin, R):
    """x [heads, D] float64, HF half rotation of the first R dims."""
    c, s = cos[pos].double(), sin[pos].double()
    a, b, rest = x[:, :R // 2], x[:, R // 2:R], x[:, R:]
    return torch.cat([a * c - b * s, b * c + a * s, rest], dim=-1)


# (Hq, Hkv, D, R): SmolLM2, Llama-2-7B, GQA 32/8, tiny partial-rotary; G = 8; D = 256; 64 KV heads (the dynamic
# grid has 2 blocks per KV head on 132 SMs, so long sequences loop over block-chunks)
ATT_SHAPES = [(9, 3, 64, 64), (32, 32, 128, 128), (32, 8, 128, 128), (4, 2, 32, 16), (16, 2, 64, 64),
              (8, 2, 256, 128), (64, 64, 64, 64)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("Hq,Hkv,D,R", ATT_SHAPES)
@pytest.mark.parametrize("dynamic", [False, True])
# tuning: block row per query head, one block up to 2 block-chunks (default); per KV head; a block per block-chunk
@pytest.mark.parametrize("tuning", [0, 32, 1024])
def test_attention(Hq, Hkv, D, R, dtype, dynamic, tuning):
    ext = load_extension()
    ext.set_tuning(tuning)
    try:
        _check_attention(ext, Hq, Hkv, D, R, dtype, dynamic)
    finally:
        ext.set_tuning(0)


def _check_attention(ext, Hq, Hkv, D, R, dtype, dynamic):
    dt = DT[dtype]
    max_seq = 1100
    split = ext.SPLIT_LEN
    max_splits = -(-max_seq // split)
    inv = 1.0 / (10000.0 ** (torch.arange(0, R, 2).float() / R))
    fr = torch.arange(max_seq).float()[:, None] * inv[None]
    cos, sin = fr.cos().cuda(), fr.sin().cuda()
    part_acc = torch.empty(Hq * max_splits * D, device="cuda")
    part_ml = torch.empty(Hq * max_splits * 2, device="cuda")
    counters = torch.zeros(Hq, dtype=torch.int32, device="cuda")
    G = Hq // Hkv
    for pos in (0, 5, 63, 64, 200, 300, 1000):
        g = torch.Generator(device="cuda").manual_seed(pos + 13 * D)
        qkv = torch.randn((Hq + 2 * Hkv) * D, device="cuda", generator=g).to(dt)
        kc = torch.randn(Hkv, max_seq, D, device="cuda", generator=g).to(dt)
        vc = torch.randn(Hkv, max_seq, D, device="cuda", generator=g).to(dt)
        kc[:, pos:] = float("nan")  # row pos must be written, rows > pos never read
        vc[:, pos:] = float("nan")
        ctx = torch.full((Hq * D,), float("nan"), device="cuda", dtype=dt)
        pos_dev = torch.tensor([pos], dtype=torch.int32, device="cuda")
        for _ in range(2):  # twice: the last-block counters must have been reset
            ext.attention(qkv.data_ptr(), kc.data_ptr(), vc.data_ptr(), cos.data_ptr(), sin.data_ptr(), R, Hq, Hkv,
                          D, max_seq, pos, part_acc.data_ptr(), part_ml.data_ptr(), max_splits, counters.data_ptr(),
                          ctx.data_ptr(), DTI[dtype], stream(), pos_dev.data_ptr() if dynamic else 0)
        torch.cuda.synchronize()
        assert int(counters.abs().sum()) == 0
        q = rope64(qkv[:Hq * D].double().view(Hq, D), pos, cos, sin, R)
        k_new = rope64(qkv[Hq * D:(Hq + Hkv) * D].double().view(Hkv, D), pos, cos, sin, R)
        v_new = qkv[(Hq + Hkv) * D:].double().view(Hkv, D)
        assert rel(kc[:, pos], k_new) < ATT_TOL[dtype] and rel(vc[:, pos], v_new) == 0.0
        K = kc[:, :pos + 1].double().repeat_interleave(G, 0)
        V = vc[:, :pos + 1].double().repeat_interleave(G, 0)
        K[:, pos], V[:, pos] = k_new.repeat_interleave(G, 0), v_new.repeat_interleave(G, 0)
        p = torch.softmax((K @ q[:, :, None])[..., 0] / math.sqrt(D), dim=-1)
        ref = (p[:, None, :] @ V)[:, 0].reshape(-1)
        e = rel(ctx, ref)
        assert e < ATT_TOL[dtype], f"pos {pos}: rel err {e:.2e}"


def _device_sample(ext, logits, pos, params):
    tok = torch.full((1,), -1, dtype=torch.int32, device="cuda")
    pbuf = torch.zeros(ext.SAMPLE_PARAMS_BYTES, dtype=torch.uint8, device="cuda")
    ext.sample(logits.data_ptr(), logits.numel(), pos, float(params.temperature), params.top_k, float(params.top_p),
               params.seed, pbuf.data_ptr(), tok.data_ptr(), stream())
    torch.cuda.synchronize()
    return int(tok.item())


def test_argmax_exact():
    from case4_sampling import SamplingParams
    ext = load_extension()
    for i in range(20):
        g = torch.Generator(device="cuda").manual_seed(i)
        logits = torch.randn(49152, device="cuda", generator=g) * 4
        if i % 2:  # a tie: lowest id wins
            m = logits.max()
            logits[100], logits[40000] = m + 1, m + 1
        assert _device_sample(ext, logits, i, SamplingParams()) == int(torch.argmax(logits))


@pytest.mark.parametrize("N,K,max_blocks", [(32000, 4096, 528), (49152, 576, 528), (1000, 576, 0)])
def test_lm_head_argmax_partials(N, K, max_blocks):
    """lm_head's per-block argmax + the sampler's reduction of them == torch.argmax of the logits it
    wrote (first index of the maximum): random rows, rows tied at the top (copies of the best row at a
    lower and a higher index, in other blocks), NaN and -inf rows; all-NaN logits give token 0."""
    ext = load_extension()
    dt, g = torch.float16, torch.Generator(device="cuda").manual_seed(N + K)
    x = torch.randn(K, device="cuda", generator=g).to(dt)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dt)
    part = torch.empty(2 * 528, dtype=torch.int32, device="cuda")
    params = torch.zeros(ext.SAMPLE_PARAMS_BYTES, dtype=torch.uint8, device="cuda")
    tok = torch.full((1,), -7, dtype=torch.int32, device="cuda")
    for case in ("random", "tie", "nan", "all_nan"):
        W = (torch.randn(N, K, device="cuda", generator=g) / math.sqrt(K)).to(dt)
        if case in ("tie", "nan"):
            logits = torch.empty(N, dtype=torch.float32, device="cuda")
            ext.greedy_lm(W.data_ptr(), N, K, x.data_ptr(), nw.data_ptr(), 1e-5, logits.data_ptr(), part.data_ptr(),
                          params.data_ptr(), tok.data_ptr(), 0, stream(), max_blocks)
            best = int(torch.argmax(logits))
            lo, hi = max(0, best - 2 * 8 * 67 - 3), min(N - 1, best + 8 * 131 + 5)
            W[lo], W[hi] = W[best], W[best]  # the lowest of three equal maxima must win
            if case == "nan":
                W[best - 1 if best else best + 1] = float("nan")
                W[N // 2] = float("-inf")
        if case == "all_nan":
            W.fill_(float("nan"))
        logits = torch.full((N,), 123.0, dtype=torch.float32, device="cuda")
        n = ext.greedy_lm(W.data_ptr(), N, K, x.data_ptr(), nw.data_ptr(), 1e-5, logits.data_ptr(), part.data_ptr(),
                          params.data_ptr(), tok.data_ptr(), 0, stream(), max_blocks)
        torch.cuda.synchronize()
        assert 0 < n <= 528
        if case == "all_nan":
            assert int(tok) == 0
            continue
        finite = torch.where(torch.isnan(logits), torch.full_like(logits, -float("inf")), logits)
        assert int(tok) == int(torch.argmax(finite)), case  # torch.argmax: first index of the maximum
        if case == "tie":
            assert int(tok) == lo, "the lowest index of a tie"


def test_all_nan_logits_give_token_in_range():
    """No maximum exists: the sampler must still return an id the next step can gather (0)."""
    from case4_sampling import SamplingParams
    ext = load_extension()
    logits = torch.full((32000,), float("nan"), device="cuda")
    assert _device_sample(ext, logits, 3, SamplingParams()) == 0
    assert _device_sample(ext, logits, 3, SamplingParams(temperature=0.8, seed=1)) in range(32000)


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 50, 1.0), (1.0, 0, 0.9), (0.8, 40, 0.95), (1.5, 1, 1.0)])
def test_sampling_matches_client(t, k, p):
    """Device sampler == case4_sampling.py token for token (rounding ties aside: >= 98%)."""
    from case4_sampling import SamplingParams, sample
    ext = load_extension()
    agree, n = 0, 100
    for i in range(n):
        g = torch.Generator(device="cuda").manual_seed(1000 + i)
        logits = torch.randn(32000, device="cuda", generator=g) * 3
        params = SamplingParams(temperature=t, top_k=k, top_p=p, seed=i * 31 + 7)
        agree += _device_sample(ext, logits, 17 + i, params) == sample(logits.cpu().numpy(), params, 17 + i)
    assert agree >= 0.98 * n, f"{agree}/{n} agree"


def test_sampling_chi_square_and_seed():
    from case4_sampling import SamplingParams
    ext = load_extension()
    V = 64
    g = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(V, device="cuda", generator=g) * 1.5
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, seed=1234)
    N = 6000
    toks = [_device_sample(ext, logits, pos, params) for pos in range(N)]
    again = [_device_sample(ext, logits, pos, params) for pos in range(200)]
    assert again == toks[:200], "same seed and positions must give the same tokens"
    prob = torch.softmax(logits.double().cpu() / 0.9, -1).numpy()
    obs = np.bincount(toks, minlength=V)
    exp = prob * N
    keep = exp >= 5
    chi2 = float((((obs - exp) ** 2) / exp)[keep].sum())
    df = int(keep.sum()) - 1
    assert chi2 < df + 5 * math.sqrt(2 * df), f"chi2 {chi2:.1f} with {df} dof"
