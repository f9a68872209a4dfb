"""GPU: the hf backend's graph path and --force-flash (issue 28).

- `sdp_single_q` (Case4's decode attention kernel as a torch op) against SDPA in fp32 on fresh
  random q/k/v, for GQA groups 1..8, head dims 64/128, lengths across split boundaries, fp16/bf16;
  another scale is refused.
- The hf backend with --force-flash: decode logits against the same backend with SDPA, the op
  really called for every layer of every decode step (and never for the prefill).
- The hf backend's StaticCache + CUDA graph (graph mode exact) against its eager DynamicCache path
  and HF's full forward: greedy tokens equal, logits close; status names the mode.
- prep_next on the cuda backend captures the graphs it names (a legacy RPC, through the server)."""
import math

import pytest
import torch

from case4_sampling import SamplingParams


def _sdpa_ref(q, k, v, scale):
    Hq, D = q.shape
    Hkv = k.shape[0]
    kk = k.float().repeat_interleave(Hq // Hkv, 0)
    vv = v.float().repeat_interleave(Hq // Hkv, 0)
    w = torch.softmax((q.float()[:, None, :] @ kk.transpose(1, 2))[:, 0] * scale, -1)  # [Hq, S]
    return (w[:, None, :] @ vv)[:, 0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Hq,Hkv,D", [(8, 8, 64), (8, 2, 64), (16, 2, 128), (32, 4, 128)])
@pytest.mark.parametrize("S", [1, 63, 64, 65, 300, 1500])
def test_sdp_single_q_matches_sdpa(dtype, Hq, Hkv, D, S):
    from custom_kernels.torch_ops import register_sdp_single_q
    register_sdp_single_q()
    g = torch.Generator(device="cuda").manual_seed(Hq * 1000 + S)
    q = torch.randn(Hq, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(Hkv, S, D, device="cuda", generator=g).to(dtype)
    v = torch.randn(Hkv, S, D, device="cuda", generator=g).to(dtype)
    k0, v0 = k.clone(), v.clone()
    out = torch.ops.case4.sdp_single_q(q, k, v, 1 / math.sqrt(D))
    want = _sdpa_ref(q, k0, v0, 1 / math.sqrt(D))
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert out.shape == (Hq, D) and out.dtype == dtype
    assert (out.float() - want).abs().max().item() < tol
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[None, :, None], k[None], v[None], enable_gqa=Hq != Hkv)[0, :, 0]
    assert (out.float() - sdpa.float()).abs().max().item() < tol
    assert torch.equal(k, k0) and torch.equal(v, v0)  # the row the kernel rewrites keeps its values


def test_sdp_single_q_refuses_another_scale():
    from custom_kernels.torch_ops import register_sdp_single_q
    register_sdp_single_q()
    q = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(4, 10, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="scales by 1/sqrt"):
        torch.ops.case4.sdp_single_q(q, k, k, 0.5)


def _load(model="synthetic:tiny", **opts):
    from server.backends import load_backend
    return load_backend({"model": model, "backend": "hf", "seed": 3, **opts}, "cuda", "float16")[1]


def _decode(b, ids, n):
    """Greedy: prefill, then n steps; (tokens, logits of every step)."""
    logits = [b.prefill(0, ids)]
    toks = [int(logits[-1].argmax())]
    for _ in range(n - 1):
        logits.append(b.step(0, toks[-1]))
        toks.append(int(logits[-1].argmax()))
    return toks, torch.stack(logits)


def test_force_flash_decode_matches_sdpa():
    from server.hf_backend import _FlashCounter
    ids = [256] + list(range(40, 90))
    ref_toks, ref = _decode(_load(graph_mode="none"), ids, 24)
    b = _load(graph_mode="none", force_flash=True)
    c0, d0 = _FlashCounter.calls, _FlashCounter.deferred
    toks, got = _decode(b, ids, 24)
    L = b.cfg.num_layers
    assert _FlashCounter.calls - c0 == 23 * L        # every decode step, every layer
    assert _FlashCounter.deferred - d0 == L          # the prefill kept SDPA
    assert (got - ref).abs().max().item() < 5e-2
    assert toks == ref_toks
    st = b.status()
    assert st["force_flash"] is True and st["hf_mode"] == "dynamic-cache+eager"


@pytest.mark.parametrize("graph_mode", ["exact", "dynamic"])
def test_static_cache_graphs_match_eager(graph_mode):
    ids = [256] + list(range(100, 140))
    eager_toks, eager = _decode(_load(graph_mode="none"), ids, 40)
    b = _load(graph_mode=graph_mode)
    toks, got = _decode(b, ids, 40)
    st = b.status()
    assert st["hf_mode"] == "static-cache+cuda-graph" and "graph_error" not in st, st
    assert b.graphs[0].graph is not None  # captured, and the later steps replayed it
    assert toks == eager_toks
    assert (got - eager).abs().max().item() < 5e-2
    # a second prompt on the same session reuses the graph over the zeroed static cache
    toks2, _ = _decode(b, ids, 40)
    assert toks2 == eager_toks
    # device sampling through the graph path = the reference sampler on the eager path
    p = SamplingParams(0.9, 50, 0.95, 77)
    outs = []
    for bb in (b, _load(graph_mode="none")):
        bb.prefill(0, ids)
        first = bb.sample(0, p, len(ids) - 1)
        outs.append([first] + bb.generate(0, first, 20, p))
    assert outs[0] == outs[1]


def test_prep_next_captures_on_the_cuda_backend():
    from server.backends import load_backend
    from server.process import Server

    class _Ring:
        def write(self, step, logits):
            return step % 4

    model, b = load_backend({"model": "synthetic:tiny", "backend": "cuda", "graph_mode": "exact"}, "cuda", "float16")
    try:
        srv = Server(model, b, _Ring())
        b.prefill(0, [256, 1, 2, 3])
        r = srv.prep_next({"session": 0, "prev_seq_len": 4, "next_seq_len": 10, "timeout_s": 60.0})
        assert r["ok"] and r["captured"] == 6 and r["window"] >= 6
        st = b.graph_stats()
        assert st["captured"] >= 6 and st["live"] >= 6 and st["window"] >= 6, st
        misses = st["misses"]
        for T in range(4, 10):  # the prepared lengths replay their graphs: no eager miss
            b.replay(0, T, 5)
        assert b.graph_stats()["misses"] == misses
    finally:
        b.close()
