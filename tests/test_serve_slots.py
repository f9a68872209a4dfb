"""`case4 serve` with several slots (conductor/serve_slots.py, docs/serve.md "Scheduling"):
round robin among concurrent streams, the prompt cache, logprobs against a float64 oracle,
a disconnect that frees its slot, a killed child under several streams. Real clients (the
official openai package, sync and async; httpx for raw streams); the oracle is the
reference model run in this process on the same weights."""
import asyncio
import os
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import torch

from test_serve import Server, client, model_dir  # noqa: F401  (model_dir: the module's fixture)

N = 32


@pytest.fixture(scope="module")
def rr(model_dir, tmp_path_factory):  # noqa: F811
    s = Server(model_dir, tmp_path_factory.mktemp("rr") / "serve.log", "--slots", "4", "--max-queue", "64")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def one(model_dir, tmp_path_factory):  # noqa: F811
    """One slot, first come, the device sampler (the reference backend's torch one)."""
    s = Server(model_dir, tmp_path_factory.mktemp("one") / "serve.log", "--slots", "1", "--schedule", "fcfs",
               "--sampling", "device")
    yield s
    s.stop(signal.SIGTERM)  # a service manager's stop


@pytest.fixture(scope="module")
def oracle(model_dir):  # noqa: F811
    """The reference model in this process: greedy tokens and each step's logits."""
    from server.model.resolve import resolve_model
    from server.reference_backend import ReferenceBackend
    b = ReferenceBackend(resolve_model(str(model_dir), dtype="float32", device="cpu"), sessions=1)

    def run(ids: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
        toks, logits = [], [b.prefill(0, ids).numpy().astype(np.float64)]
        while True:
            toks.append(int(np.argmax(logits[-1])))  # greedy: the lowest id among equal maxima
            if len(toks) == n or toks[-1] == 257:
                return toks, logits
            logits.append(b.step(0, toks[-1]).numpy().astype(np.float64))
    return run


def log_softmax64(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def _metric(srv, name: str) -> int:
    for ln in httpx.get(srv.url + "/metrics", timeout=30).text.splitlines():
        if ln.startswith(name + " "):
            return int(float(ln.split()[1]))
    raise AssertionError(f"no metric {name}")


def test_sixteen_streams_interleave_and_each_equals_its_solo_run(rr, model_dir):  # noqa: F811
    m = str(model_dir)
    prompts = [f"Stream {i} says" for i in range(16)]
    solo = [client(rr).completions.create(model=m, prompt=p, max_tokens=N, temperature=0).choices[0].text
            for p in prompts]

    async def main():
        c = openai.AsyncOpenAI(base_url=rr.url + "/v1", api_key="none", max_retries=0, timeout=300)

        async def one(p):
            parts, first = [], None
            async for ch in await c.completions.create(model=m, prompt=p, max_tokens=N, temperature=0, stream=True):
                if ch.choices and ch.choices[0].text and first is None:
                    first = time.monotonic()
                parts.append(ch.choices[0].text if ch.choices else "")
            return "".join(parts), first, time.monotonic()
        return await asyncio.gather(*(one(p) for p in prompts))
    got = asyncio.run(asyncio.wait_for(main(), 600))
    assert [g[0] for g in got] == solo
    # round robin: streams run together (with fcfs no stream's tokens begin before another's end)
    overlap = sum(1 for i, a in enumerate(got) for b in got[i + 1:]
                  if a[1] is not None and b[1] is not None and a[1] < b[2] and b[1] < a[2])
    assert overlap >= 4, got
    assert _metric(rr, "case4_kv_slots_in_use") == 0 and _metric(rr, "case4_queue_depth") == 0


def test_a_new_request_takes_a_slot_from_a_long_solo_loop(rr, model_dir):  # noqa: F811
    """A alone runs one long decode loop; B's arrival ends it (CANCEL) and both then go round
    robin: A's text is still its solo text (the token fed before the loop ended is fed again)."""
    m, c = str(model_dir), client(rr)
    long = c.completions.create(model=m, prompt="A long one:", max_tokens=300, temperature=0).choices[0].text
    short = c.completions.create(model=m, prompt="B:", max_tokens=N, temperature=0).choices[0].text
    a = c.completions.create(model=m, prompt="A long one:", max_tokens=300, temperature=0, stream=True)
    it = iter(a)
    parts = [next(it).choices[0].text]
    b = c.completions.create(model=m, prompt="B:", max_tokens=N, temperature=0)
    parts += [ch.choices[0].text for ch in it]
    assert b.choices[0].text == short and "".join(parts) == long


def test_a_disconnect_frees_its_slot_within_a_step(rr, model_dir):  # noqa: F811
    m = str(model_dir)
    streams = [client(rr).completions.create(model=m, prompt=f"Hold {i}", max_tokens=400, temperature=0,
                                             stream=True) for i in range(3)]
    its = [iter(s) for s in streams]
    for it in its:
        next(it)
    deadline = time.monotonic() + 30
    while _metric(rr, "case4_kv_slots_in_use") != 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    streams[0].close()
    deadline = time.monotonic() + 10
    while _metric(rr, "case4_kv_slots_in_use") != 2:  # the other two still run
        assert time.monotonic() < deadline, "the slot of a closed stream was not freed"
        time.sleep(0.02)
    for s in streams[1:]:
        s.close()


def test_prompt_cache_prefills_only_the_new_tokens_and_changes_nothing(one, model_dir, oracle):  # noqa: F811
    m, c = str(model_dir), client(one)
    ids1 = [256] + list(b"Turn one, a question?")
    toks1, _ = oracle(ids1, 16)
    r1 = c.completions.create(model=m, prompt=ids1, max_tokens=16, temperature=0)
    assert r1.usage.completion_tokens == len(toks1)
    # the next turn starts with turn one's prompt + answer: the slot holds them but the last
    # token (sampled, never fed)
    ids2 = ids1 + toks1 + list(b" Turn two.")
    warm = c.completions.create(model=m, prompt=ids2, max_tokens=16, temperature=0)
    assert warm.usage.prompt_tokens_details.cached_tokens == len(ids1) + len(toks1) - 1
    c.completions.create(model=m, prompt=[256] + list(b"zzz"), max_tokens=4, temperature=0)  # evicts
    cold = c.completions.create(model=m, prompt=ids2, max_tokens=16, temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 1  # BOS only
    toks2, _ = oracle(ids2, 16)
    from client.tokenizer import ByteTokenizer
    assert warm.choices[0].text == cold.choices[0].text == ByteTokenizer().decode(toks2)
    assert warm.usage.completion_tokens == cold.usage.completion_tokens == len(toks2)
    # the same prompt again: all but its last token come from the cache
    again = c.completions.create(model=m, prompt=ids2, max_tokens=16, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids2) - 1
    assert again.choices[0].text == cold.choices[0].text


def test_a_backend_that_prefills_the_whole_prompt_again_reports_no_cached_tokens(model_dir, oracle, tmp_path,
                                                                                monkeypatch):  # noqa: F811
    """Backend.plan_keep may answer 0 (the cuda backend, where a prompt's prefill graph beats the eager
    continuation): the whole prompt is pre-filled again, usage says 0 cached tokens, the text is the same."""
    monkeypatch.setenv("CASE4_SERVER_FACTORY", "tests.serve_factories:recompute_prefix")
    s = Server(model_dir, tmp_path / "serve.log", "--slots", "1")
    try:
        m, c = str(model_dir), client(s)
        ids1 = [256] + list(b"Turn one?")
        r1 = c.completions.create(model=m, prompt=ids1, max_tokens=8, temperature=0)
        ids2 = ids1 + oracle(ids1, 8)[0] + list(b" Two.")
        warm = c.completions.create(model=m, prompt=ids2, max_tokens=8, temperature=0)
        assert r1.usage.completion_tokens == 8 and warm.usage.prompt_tokens_details.cached_tokens == 0
        from client.tokenizer import ByteTokenizer
        assert warm.choices[0].text == ByteTokenizer().decode(oracle(ids2, 8)[0])
    finally:
        s.stop()


def recompute_cheaper_case(replay_ms: dict, eager_ms, graphs=((0, 16), (0, 512), (0, 2048))):
    from server.prefill_graphs import PrefillGraphs
    pg = PrefillGraphs(None, 4096)
    pg.replay_ms, pg.eager_ms = dict(replay_ms), eager_ms
    pg.graphs = {k: None for k in graphs}
    return pg


def test_the_prompt_cache_recomputes_only_where_the_graph_is_measured_faster():
    """PrefillGraphs.recompute_cheaper with the H100 7B figures of docs/serve.md: a 512-token prompt's graph
    (~20 ms) beats a 16-token eager continuation (host-bound, ~29 ms); a 2048-token one (~70 ms) does not;
    a long continuation costs at least its own bucket's graph; nothing unmeasured recomputes."""
    pg = recompute_cheaper_case({16: 4.0, 512: 20.0, 2048: 70.0}, 29.0)
    assert pg.recompute_cheaper(0, 512, 16)            # 20 < max(29, 4)
    assert pg.recompute_cheaper(0, 500, 400)           # bucket 512: 20 < max(29, 20)
    assert not pg.recompute_cheaper(0, 2000, 16)       # 70 > 29
    assert not pg.recompute_cheaper(0, 2000, 1500)     # equal costs (both the 2048 graph's): keep the cache
    assert not pg.recompute_cheaper(0, 512, 1)         # one new token: a decode step
    assert not pg.recompute_cheaper(1, 512, 16)        # no graph for session 1's bucket
    assert not pg.recompute_cheaper(0, 5000, 16)       # beyond max_seq's bucket
    assert not recompute_cheaper_case({16: 4.0, 512: 20.0}, None).recompute_cheaper(0, 512, 16)  # no eager timing
    assert not recompute_cheaper_case({16: 4.0}, 29.0).recompute_cheaper(0, 512, 16)  # bucket not timed


def test_chat_logprobs_equal_a_float64_log_softmax(one, model_dir, oracle):  # noqa: F811
    """With --sampling device a logprobs request is decoded on the host path (the client
    process reads the logits); the values are the log-softmax of the raw logits."""
    from client.tokenizer import ByteTokenizer
    m, c, bt = str(model_dir), client(one), ByteTokenizer()
    msgs = [{"role": "user", "content": "Logprobs, please"}]
    ids = list(b"<|user|>\nLogprobs, please\n<|assistant|>\n")  # test_serve's CHAT_TEMPLATE, no BOS
    toks, logits = oracle(ids, 12)
    r = c.chat.completions.create(model=m, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                  top_logprobs=20)
    assert r.usage.prompt_tokens == len(ids)
    content = r.choices[0].logprobs.content
    assert len(content) == len(toks) == r.usage.completion_tokens
    for e, tok, lg in zip(content, toks, logits):
        lp = log_softmax64(lg)
        order = sorted(range(len(lp)), key=lambda i: (-lp[i], i))[:20]
        text = {256: "<s>", 257: "</s>", 258: "<pad>"}.get(tok) or bt.decode([tok])
        assert e.token == text and e.bytes == list(text.encode()) and abs(e.logprob - lp[tok]) < 1e-4
        assert [t.logprob for t in e.top_logprobs] == pytest.approx([lp[i] for i in order], abs=1e-4)
        assert [t.token for t in e.top_logprobs] == [{256: "<s>", 257: "</s>", 258: "<pad>"}.get(i) or bt.decode([i])
                                                     for i in order]
    chunks = list(c.chat.completions.create(model=m, messages=msgs, max_tokens=12, temperature=0, logprobs=True,
                                            top_logprobs=20, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)


def test_completion_logprobs_shape(rr, model_dir, oracle):  # noqa: F811
    m, c = str(model_dir), client(rr)
    ids = [256] + list(b"Completion logprobs")
    toks, logits = oracle(ids, 8)
    r = c.completions.create(model=m, prompt=ids, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(toks)
    for v, top, tok, lg in zip(lp.token_logprobs, lp.top_logprobs, toks, logits):
        ref = log_softmax64(lg)
        assert abs(v - ref[tok]) < 1e-4
        assert max(top.values()) == pytest.approx(ref.max(), abs=1e-4) and 1 <= len(top) <= 4
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=m, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                  top_logprobs=3)  # top_logprobs without logprobs


def test_a_killed_client_process_ends_every_running_stream(model_dir, tmp_path, oracle):  # noqa: F811
    # Greedy, and the oracle shows neither prompt reaches EOS within 400 tokens: a sampled stream
    # could end on its own before the kill (CI once saw finish_reason "stop" here).
    prompts = [[256] + list(f"Run {i}".encode()) for i in range(2)]
    for ids in prompts:
        assert 257 not in oracle(ids, 400)[0]
    srv = Server(model_dir, tmp_path / "serve.log", "--slots", "2")
    try:
        m = str(model_dir)
        out = [None, None]

        def stream(i):
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                              json={"model": m, "prompt": prompts[i], "max_tokens": 400, "temperature": 0,
                                    "stream": True}) as r:
                out[i] = [ln for ln in r.iter_lines() if ln]
        ts = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 30
        while _metric(srv, "case4_kv_slots_in_use") != 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(srv.child_pid("client"), signal.SIGKILL)
        for t in ts:
            t.join(60)
        for lines in out:
            assert lines[-1] == "data: [DONE]" and '"error"' in lines[-2]
        h = httpx.get(srv.url + "/health", timeout=30)
        assert h.status_code == 503 and "client process" in h.json()["cause"]
        with pytest.raises(openai.InternalServerError):
            client(srv).completions.create(model=m, prompt="a", max_tokens=2)
    finally:
        srv.stop()


def test_prefill_from_equals_a_cold_prefill_on_the_reference_backend():
    """Backend.prefill_from, the reference backend's batched one and the default (one decode step
    a token), against a cold prefill of the whole prompt; a bad keep is a BadInput."""
    from case4_errors import BadInput
    from server.backend import Backend
    from server.model.resolve import resolve_model
    from server.reference_backend import ReferenceBackend
    b = ReferenceBackend(resolve_model("synthetic:tiny", dtype="float32", device="cpu", seed=3), sessions=2)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 256, (40,), generator=g).tolist()
    cold = b.prefill(0, ids).clone()
    for fn in (b.prefill_from, lambda s, i, k: Backend.prefill_from(b, s, i, k)):
        b.prefill(1, ids[:24])
        for t in torch.randint(0, 256, (5,), generator=g).tolist():  # overwritten by the new tokens
            b.step(1, t)
        warm = fn(1, ids, 24)
        assert b.seq_len(1) == 40 and torch.allclose(warm, cold, atol=1e-4, rtol=0)
    for keep in (40, -1, 41):
        with pytest.raises(BadInput, match="keep must be"):
            b.prefill_from(1, ids, keep)


def test_bad_serve_flags_exit_2():
    import subprocess
    import sys
    from test_serve import ROOT, _env
    for flags, msg in ((["--slots", "0"], "--slots must be"), (["--rr-tokens", "0"], "--rr-tokens must be")):
        r = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "serve", "--model", "synthetic:tiny", *flags],
                           capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"case4: error: {msg}")


def test_the_load_bench_runs_with_no_failures(tmp_path):
    import json
    import subprocess
    import sys
    from test_serve import ROOT, _env
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_load.py"), "--model", "synthetic:tiny", "--backend",
                        "reference", "--schedules", "rr", "--clients", "1,3", "--max-tokens", "6", "--cache-prompt", "40",
                        "--cache-repeats", "1", "--ttft-repeats", "3", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=300,
                       env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob("serve-*-tiny-*.json")).read_text())
    (run,) = res["runs"]
    assert [lv["clients"] for lv in run["levels"]] == [1, 3] and all(lv["failures"] == 0 for lv in run["levels"])
    assert all(lv["tok_per_s"] > 0 and lv["ttft_p50_ms"] > 0 for lv in run["levels"])
    assert run["prompt_cache"]["cached_tokens"] == [40]  # the second turn reused the first turn's prompt
    assert "device: cpu" in r.stderr
    # the CLI on the same model in the same run, and the rows issue 27 compares to it
    base = res["cli_baseline"]
    assert base["prompt_tokens"] == 56 and base["decode_p50_ms"] > 0 and base["ttft_ms"] > 0
    cmp = run["against_cli"]
    assert cmp["itl_1_client_over_cli"] > 0
    assert cmp["cold_ttft_minus_cli_ms"] == round(run["prompt_cache"]["cold_ttft_ms"] - base["ttft_ms"], 3)
    # the lean client's TTFT, and the stages it passed, from the server's CASE4_SERVE_STAGES file
    lean = run["lean_ttft"]
    assert lean["repeats"] == 3 and 0 < lean["cold_ttft_p10_ms"] <= lean["cold_ttft_ms"] <= lean["cold_ttft_p90_ms"]
    assert cmp["lean_cold_ttft_minus_cli_ms"] == round(lean["cold_ttft_ms"] - base["ttft_ms"], 3)
    st = lean["cold_stages_ms"]
    assert list(st)[0] == "send > asgi" and list(st)[-2:] == ["loop > first event", "loop > sent"]
    assert all(v >= 0 for v in st.values())
    assert 0 < lean["serve_overhead_ms"] < lean["cold_ttft_ms"]
