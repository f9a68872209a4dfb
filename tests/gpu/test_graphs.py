"""Graph modes: token identity with eager, background-capture stress, overlap in the trace."""
import random

import pytest
import torch

from tests.gpu.conftest import synthetic_model

pytestmark = pytest.mark.gpu


def make(shape, mode, sessions=1, max_seq=2048, dtype="float16"):
    from server.cuda_backend import CudaBackend
    return CudaBackend(synthetic_model(shape, dtype, max_seq), sessions=sessions, graph_mode=mode)


def greedy():
    from case4_sampling import SamplingParams
    return SamplingParams()


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


def ids_for(V, n=8, seed=0):
    r = random.Random(seed)
    return [r.randrange(V) for _ in range(n)]


# exact mode's allowed misses over the n device-sampled steps: none for 7B (a capture is ~20x faster than a
# replay: the window never drains, issue 6); SmolLM2 replays a step in ~0.36 ms, less than the ~0.25 ms + ~0.13 ms
# (p50) to capture and instantiate one graph, so over 1000 steps the 64-graph window drains and some steps take
# the eager fallback (docs/architecture.md, "Where the capture thread lives": a miss runs the same kernels eagerly; the tokens and logits below stay
# identical). Measured: 18 of 1000 (docs/decisions.md); allowed: 10 %
@pytest.mark.parametrize("shape,n,max_misses", [("smollm2-135m", 1000, 100), ("llama2-7b", 1000, 0)])
def test_graph_modes_equal_eager(shape, n, max_misses):
    runs, logits = {}, {}
    for mode in ("none", "exact", "dynamic"):
        be = make(shape, mode)
        try:
            ids = ids_for(be.cfg.vocab_size)
            tok = int(be.prefill(0, ids).argmax())
            if mode == "exact":
                be.bg_capture_start(0, 64)
                be.wait_precapture(0, 32, 120.0)
            runs[mode] = be.generate(0, tok, n, greedy())          # device sampling through the mode
            be.prefill(0, ids)
            if mode == "exact":
                be.wait_precapture(0, 32, 120.0)
            seq, t = [], tok                                        # client sampling: logits per step
            for _ in range(32):
                lg = be.replay(0, be.seq_len(0), t)
                seq.append(lg.clone())  # the backend returns its own buffer, valid until the next call
                t = int(lg.argmax())
            logits[mode] = torch.stack(seq)
            st = be.status()["graphs"]
            print(mode, st)
            if mode == "exact":
                exact_status = st
        finally:
            be.close()
    assert runs["exact"] == runs["none"]
    assert runs["dynamic"] == runs["none"]
    # the same kernels in the same order: bitwise equal logits
    assert torch.equal(logits["exact"], logits["none"])
    assert torch.equal(logits["dynamic"], logits["none"])
    assert exact_status["failures"] == 0
    assert exact_status["misses"] <= max_misses, exact_status


def test_dynamic_k_steps_per_graph():
    from server.cuda_backend import CudaBackend
    m = synthetic_model("smollm2-135m", "float16", 2048)
    ref = CudaBackend(m, sessions=1, graph_mode="none")
    try:
        ids = ids_for(m.cfg.vocab_size, seed=9)
        tok = int(ref.prefill(0, ids).argmax())
        want = ref.generate(0, tok, 203, greedy())
    finally:
        ref.close()
    be = CudaBackend(m, sessions=1, graph_mode="dynamic", steps_per_graph=8)
    try:
        be.prefill(0, ids)
        assert be.generate(0, tok, 203, greedy()) == want
        assert be.seq_len(0) == len(ids) + 203
    finally:
        be.close()


def test_stress_bg_capture_three_sessions():
    """5000 tokens over 3 sessions, client sampling through replay(), bg capture with window 1
    (forcing misses) then 48, stopped and restarted mid-run; equal to eager, zero errors."""
    shape, S = "smollm2-135m", 3
    eager = make(shape, "none", sessions=S, max_seq=2048)
    prompts = [ids_for(eager.cfg.vocab_size, 4 + s, seed=s) for s in range(S)]
    want = {}
    try:
        for s in range(S):
            tok = int(eager.prefill(s, prompts[s]).argmax())
            want[s] = [tok] + eager.generate(s, tok, 1700, greedy())
    finally:
        eager.close()
    be = make(shape, "exact", sessions=S, max_seq=2048)
    try:
        got = {}
        for s in range(S):
            got[s] = [int(be.prefill(s, prompts[s]).argmax())]
        window = 1
        for s in range(S):
            be.bg_capture_start(s, window)
        live_max, total = 0, 0
        for rnd in range(1700 // 50):
            if rnd == 8:                      # stop mid-run, replay eagerly for a while, restart larger
                be.bg_capture_stop()
            if rnd == 12:
                window = 48
                for s in range(S):
                    be.bg_capture_start(s, window)
                be.wait_precapture(0, 16, 60.0)
            for s in range(S):
                for _ in range(50):
                    lg = be.replay(s, be.seq_len(s), got[s][-1])
                    got[s].append(int(lg.argmax()))
                    total += 1
                st = be.graph_stats()
                live_max = max(live_max, st["live"])
                assert st["failures"] == 0, st
                assert st["live"] <= S * (window + 2), st
        st = be.graph_stats()
        print("stress:", total, "tokens", st)
        assert total >= 5000
        for s in range(S):
            assert got[s] == want[s][:len(got[s])], f"session {s} diverged"
        assert st["misses"] > 0 and st["replays"] > 0
        ev = be.trace_events()
        cap = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["tid"] == "capture"]
        rep = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["tid"] == "replay"]
        assert cap and rep
        # overlap: some replay interval lies inside some capture interval (sorted sweep)
        cap.sort()
        overlaps = 0
        j = 0
        for a, b in sorted(rep):
            while j < len(cap) and cap[j][1] < a:
                j += 1
            if j < len(cap) and cap[j][0] <= b:
                overlaps += 1
        print("replay intervals overlapping a capture:", overlaps)
        assert overlaps > 0
        # and the replay stream was busy (launch -> completion seen by the host) while graphs
        # were being captured: some capture lies inside a busy interval
        busy = [(e["ts"], e["ts"] + e["dur"]) for e in ev if e["tid"] == "replay stream"]
        inside = sum(any(a <= c0 and c1 <= b for a, b in busy) for c0, c1 in cap)
        print("captures inside a busy replay-stream interval:", inside, "of", len(cap))
        assert busy and inside > 0
    finally:
        be.close()


def test_lazy_prefill_graph_capture_during_bg_capture():
    """A prefill graph captured lazily (start-up captures every session's buckets up to 2048; session 1's are
    dropped here, as a bucket first met after start-up) while the engine's
    background thread is capturing session 0's decode graphs. torch.cuda.graph synchronizes the device,
    which is not permitted during another stream's capture (it failed so before the backend paused
    the thread around it): no capture failure, the background capture goes on afterwards, session 1's
    prompt logits equal the eager torch prefill's, session 0 decodes the same tokens as an eager
    backend, and session 1 decodes from its graph-written KV rows."""
    shape, window = "smollm2-135m", 512
    eager = make(shape, "none", sessions=2, max_seq=2048)
    V = eager.cfg.vocab_size
    p0, p1 = ids_for(V, 6, seed=1), ids_for(V, 40, seed=2)
    try:
        tok0 = int(eager.prefill(0, p0).argmax())
        want0 = [tok0] + eager.generate(0, tok0, 300, greedy())
        want1 = eager.prefill_dec.prefill(1, p1).float().cpu()  # the eager torch path
        torch.cuda.synchronize()
        eager.engine.set_seq_len(1, len(p1))
        tok1 = int(want1.argmax())
        want1_toks = eager.generate(1, tok1, 16, greedy())
    finally:
        eager.close()
    be = make(shape, "exact", sessions=2, max_seq=2048)
    try:
        assert (1, 64) in be.prefill_graphs.graphs, "start-up captures every session's buckets"
        for key in [k for k in be.prefill_graphs.graphs if k[0] == 1]:
            del be.prefill_graphs.graphs[key]
        n_prefill = be.graph_stats()["prefill_graphs"]
        got0 = [int(be.prefill(0, p0).argmax())]
        start = be.graph_stats()["captured"]
        be.bg_capture_start(0, window)
        be.wait_precapture(0, 2, 60.0)  # the capture thread is at work
        before = be.graph_stats()["captured"] - start
        got1 = be.prefill(1, p1).float().cpu()  # bucket 64 of session 1: captured now
        after = be.graph_stats()
        print("decode graphs captured before / after the lazy prefill capture:", before, after["captured"] - start)
        assert after["prefill_graphs"] == n_prefill + 1, after
        assert before < window, "the background capture had already finished: no overlap tested"
        be.wait_precapture(0, window, 120.0)
        for _ in range(300):
            got0.append(int(be.replay(0, be.seq_len(0), got0[-1]).argmax()))
        assert got0 == want0
        assert rel(got1, want1) < 1e-2
        if int(got1.argmax()) == tok1:
            assert be.generate(1, tok1, 16, greedy()) == want1_toks
        st = be.graph_stats()
        assert st["failures"] == 0, st
    finally:
        be.close()


def test_wait_precapture_timeout_and_stop_anytime():
    from case4_errors import BadInput
    from server.cuda_backend import PrecaptureTimeout
    be = make("llama2-7b", "exact", max_seq=2048)
    try:
        be.prefill(0, [1, 2, 3])
        be.bg_capture_start(0, 512)
        with pytest.raises(PrecaptureTimeout):
            be.wait_precapture(0, 512, 0.001)
        # the extension's typed errors (check.h): a timeout is a RuntimeError, a bad argument becomes BadInput
        assert issubclass(be.ext.PrecaptureTimeout, RuntimeError)
        with pytest.raises(BadInput):
            be.wait_precapture(0, 513, 1.0)       # count beyond the window
        with pytest.raises(BadInput):
            be.wait_precapture(1, 1, 1.0)         # no such session
        be.bg_capture_stop()                      # while capturing
        lg = be.replay(0, 3, 5)                   # not ready or ready: never hangs
        assert torch.isfinite(lg).all()
    finally:
        be.close()
