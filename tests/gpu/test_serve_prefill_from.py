"""`CudaBackend.prefill_from` (serve's prompt cache, docs/serve.md "Scheduling"): a session
that holds a prefix of the prompt pre-fills only the rest, and gives the logits of a cold
prefill of the whole prompt; one new token is exactly a decode step (serve feeds a token
again after a decode loop ended early)."""
import random

import pytest
import torch

from tests.gpu.conftest import synthetic_model


def make(shape, sessions=2, max_seq=2048, dtype="float16"):
    from server.cuda_backend import CudaBackend
    return CudaBackend(synthetic_model(shape, dtype, max_seq), sessions=sessions, graph_mode="exact")


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("shape", ["smollm2-135m", "llama2-7b"])
def test_prefill_from_equals_a_cold_prefill_and_decodes_the_same(shape):
    from case4_sampling import SamplingParams
    b = make(shape)
    try:
        V = b.cfg.vocab_size
        r = random.Random(1)
        ids = [r.randrange(V) for _ in range(40)]
        other = [r.randrange(V) for _ in range(6)]
        cold = b.prefill(0, ids).clone()
        b.prefill(1, ids[:24])
        for t in other:  # the slot's previous answer, past the shared prefix: overwritten
            b.step(1, t)
        warm = b.prefill_from(1, ids, 24).clone()
        assert b.seq_len(1) == 40
        assert rel(warm, cold) < 2e-2 and int(warm.argmax()) == int(cold.argmax())
        assert b.sample(1, SamplingParams(), 39) == int(cold.argmax())  # the device sampler reads it too
        toks = {}
        for s in (0, 1):  # greedy decode from both sessions: the same tokens
            tok, out = int(cold.argmax()), []
            for _ in range(8):
                out.append(tok)
                tok = int(b.step(s, tok).argmax())
            toks[s] = out
        assert toks[0] == toks[1]
    finally:
        b.close()


def test_prefill_from_one_token_is_the_decode_step():
    b = make("smollm2-135m", sessions=1)
    try:
        V = b.cfg.vocab_size
        r = random.Random(2)
        ids = [r.randrange(V) for _ in range(31)]
        b.prefill(0, ids[:30])
        stepped = b.step(0, ids[30]).clone()
        again = b.prefill_from(0, ids, 30).clone()
        assert b.seq_len(0) == 31 and torch.equal(again, stepped)
    finally:
        b.close()


def test_start_up_times_the_prefill_paths_and_plan_keep_follows_them():
    """Start-up times one replay of every prefill graph and one eager continuation (PrefillGraphs.replay_ms,
    eager_ms); plan_keep recomputes a held prefix exactly where recompute_cheaper says so, and either path gives
    a cold prefill's logits. Printed: the figures docs/serve.md "Prompt cache" quotes."""
    b = make("llama2-7b")
    try:
        pg = b.prefill_graphs
        cap = b.cfg.max_seq_len - 2  # the warm-up's buckets: those that prompts of up to cap tokens fill
        assert set(pg.replay_ms) == set(pg.buckets(min(2048, cap))) and pg.eager_ms and pg.eager_ms > 0
        print("\nprefill graph replay ms:", {k: round(v, 2) for k, v in sorted(pg.replay_ms.items())},
              "eager continuation ms:", round(pg.eager_ms, 2))
        V = b.cfg.vocab_size
        r = random.Random(3)
        for n, keep in ((512, 496), (2000, 1984), (300, 299)):
            ids = [r.randrange(V) for _ in range(n)]
            cold = b.prefill(0, ids).clone()
            b.prefill(1, ids[:keep])
            kept = b.plan_keep(1, ids, keep)
            assert kept == (0 if pg.recompute_cheaper(1, n, n - keep) else keep)
            warm = (b.prefill_from(1, ids, kept) if kept else b.prefill(1, ids)).clone()
            print(f"prompt {n}, held {keep}: kept {kept}")
            assert b.seq_len(1) == n and rel(warm, cold) < 2e-2 and int(warm.argmax()) == int(cold.argmax())
    finally:
        b.close()
