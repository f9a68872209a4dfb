"""`case4 serve` on the CPU (docs/serve.md), driven by real clients: the official `openai`
package, curl for the SSE framing, httpx for raw requests. The model is synthetic:tiny saved
as an HF folder with a byte-level tokenizer (tests/conftest.py) plus a chat template, on the
reference backend. Every wait is bounded; the servers bind 127.0.0.1 on a free port."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
N = 24
START_S = 180  # the model load on a loaded two-core CI machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, byte_level_tokenizer) -> Path:
    from server.model.config import SYNTHETIC_SHAPES
    from server.model.weights import save_hf_folder, synthetic_weights
    folder = tmp_path_factory.mktemp("serve") / "m"
    save_hf_folder(synthetic_weights(SYNTHETIC_SHAPES["tiny"], "float32", "cpu", seed=1), folder)
    byte_level_tokenizer(folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": CHAT_TEMPLATE}))
    return folder


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for k in ("CASE4_USE_CUSTOM", "CASE4_DISABLE_EXT", "CASE4_KV_ONLY", "CASE4_BG_CAPTURE", "CASE4_SKIP_PRECAPTURE"):
        env.pop(k, None)
    return env


class Server:
    def __init__(self, model: Path, log: Path, *flags):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url, self.log = f"http://127.0.0.1:{self.port}", log
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "orchestrator.py"), "serve", "--model", str(model),
                                      "--backend", "reference", "--port", str(self.port), *flags],
                                     stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=_env(), cwd=ROOT)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"serve not healthy in {START_S} s: {log.read_text()}")

    def child_pid(self, name: str) -> int:
        return int(re.search(rf"{name} pid (\d+)", self.log.read_text()).group(1))

    def stop(self, sig=signal.SIGINT):
        """Ctrl-C (or SIGTERM): serve says it stopped, with no traceback; the children stop and the shared memory is
        unlinked (checked where Linux shows it)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise AssertionError(f"serve did not stop on {sig.name} within 30 s") from None
            log = self.log.read_text()
            assert "Traceback" not in log, log[-3000:]
            assert f"serve: stopped ({sig.name})" in log, log[-3000:]
        shm = re.search(r"shm (\S+)", self.log.read_text())
        if shm and Path("/dev/shm").is_dir():
            assert not (Path("/dev/shm") / shm.group(1)).exists(), "shared memory left behind"
        for name in ("server", "client"):
            pid = self.child_pid(name)
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)  # a child that exited may linger a moment as its parent reaps it
            try:
                state = Path(f"/proc/{pid}/stat").read_text().split()[2]
            except FileNotFoundError:
                continue
            assert state == "Z", f"the {name} process outlived serve"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    s = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--max-queue", "16")
    yield s
    s.stop()


def client(srv, key="none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=120)


def cli_greedy(model_dir, tmp_path, prompt, n, *flags):
    r = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--model", str(model_dir), "--backend",
                        "reference", "--prompt", prompt, "--max-tokens", str(n), "--output-dir", str(tmp_path),
                        "--run-name", "cli", *flags], capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    toks = [int(t) for t in (tmp_path / "cli_tokens.txt").read_text().split()]
    # the text file: the whole decode (stdout's streamed text may hold back a last incomplete character)
    return toks, (tmp_path / "cli_text.txt").read_text(), json.loads((tmp_path / "cli_metrics.json").read_text())


def test_greedy_completion_matches_the_cli(server, model_dir, tmp_path):
    toks, text, met = cli_greedy(model_dir, tmp_path, "Hello there", N)
    r = client(server).completions.create(model=str(model_dir), prompt="Hello there", max_tokens=N, temperature=0)
    assert r.choices[0].text == text
    assert r.usage.completion_tokens == len(toks) and r.usage.prompt_tokens == met["prompt_tokens"]
    assert r.choices[0].finish_reason == ("stop" if toks[-1] == 257 else "length")


def test_multi_turn_chat_builds_the_template(server, model_dir):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour"}]
    r = client(server).chat.completions.create(model=str(model_dir), messages=msgs, max_tokens=2, temperature=0)
    prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in msgs) + "<|assistant|>\n"
    assert r.usage.prompt_tokens == len(prompt.encode())  # the byte tokenizer: one token a byte
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in msgs]
    assert client(server).chat.completions.create(model=str(model_dir), messages=parts, max_tokens=2,
                                                  temperature=0).usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_matches_the_cli_and_streams_the_same_text(server, model_dir, tmp_path):
    msgs = [{"role": "user", "content": "Name a colour"}]
    c = client(server)
    r = c.chat.completions.create(model=str(model_dir), messages=msgs, max_tokens=N, temperature=0)
    toks, text, met = cli_greedy(model_dir, tmp_path, msgs[0]["content"], N, "--chat")
    assert r.choices[0].message.content == text and r.usage.completion_tokens == len(toks)
    assert r.usage.prompt_tokens == met["prompt_tokens"]
    chunks = list(c.chat.completions.create(model=str(model_dir), messages=msgs, max_tokens=N, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(toks)


def test_stop_string_across_tokens_not_emitted_and_counted_exactly(server, model_dir, tmp_path):
    from transformers import AutoTokenizer
    toks, full, _ = cli_greedy(model_dir, tmp_path, "Hello there", 48)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    # two characters of three or more bytes (tokens), not at the start (random weights: many are U+FFFD)
    stop = next(w for w in (full[i:i + 2] for i in range(1, len(full) - 2))
                if "\ufffd" not in w and len(w.encode()) >= 3)
    cut = full.find(stop)
    k = next(k for k in range(1, len(toks) + 1) if stop in tok.decode(toks[:k], skip_special_tokens=True))
    c = client(server)
    r = c.completions.create(model=str(model_dir), prompt="Hello there", max_tokens=48, temperature=0,
                             stop=[stop, "\x00never"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k
    s = list(c.completions.create(model=str(model_dir), prompt="Hello there", max_tokens=48, temperature=0,
                                  stop=stop, stream=True))
    assert "".join(ch.choices[0].text for ch in s) == full[:cut]


def test_seed_reproducible(server, model_dir):
    c = client(server)
    def go(seed):
        return c.completions.create(model=str(model_dir), prompt="abc", max_tokens=N, temperature=1.0,
                                    top_p=0.9, seed=seed).choices[0].text
    a = go(7)
    assert go(7) == a
    assert any(go(s) != a for s in (8, 9, 10))


def test_curl_sse_framing(server, model_dir):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed on this machine (the SSE framing test drives the server with it)")
    body = {"model": str(model_dir), "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    out = subprocess.run(["curl", "-sN", "--max-time", "60", server.url + "/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, timeout=90).stdout.decode("utf-8")
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    data = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    assert all(d["object"] == "chat.completion.chunk" for d in data)
    text = "".join(d["choices"][0]["delta"].get("content") or "" for d in data)
    ref = client(server).chat.completions.create(model=str(model_dir), messages=body["messages"], max_tokens=12,
                                                 temperature=0)
    assert text == ref.choices[0].message.content
    # completions with usage and logprobs: each token's entry in some chunk, the usage chunk last
    body = {"model": str(model_dir), "prompt": "Hi", "max_tokens": 12, "temperature": 0, "stream": True,
            "logprobs": 2, "stream_options": {"include_usage": True}}
    out = subprocess.run(["curl", "-sN", "--max-time", "60", server.url + "/v1/completions", "-H",
                          "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, timeout=90).stdout.decode("utf-8")
    events = out.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    data = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert data[-1]["choices"] == [] and all(d["usage"] is None for d in data[:-1])
    toks = [t for d in data[:-1] if d["choices"][0]["logprobs"] for t in d["choices"][0]["logprobs"]["tokens"]]
    assert len(toks) == data[-1]["usage"]["completion_tokens"]


def test_eight_concurrent_streams_each_equal_its_solo_run(server, model_dir):
    c = client(server)
    prompts = [f"Prompt number {i}:" for i in range(8)]
    solo = [c.completions.create(model=str(model_dir), prompt=p, max_tokens=N, temperature=0).choices[0].text
            for p in prompts]
    got = [None] * 8

    def one(i):
        got[i] = "".join(ch.choices[0].text for ch in client(server).completions.create(
            model=str(model_dir), prompt=prompts[i], max_tokens=N, temperature=0, stream=True))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == solo


def test_errors_have_openai_shape(server, model_dir):
    c, m = client(server), str(model_dir)
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Content-Type": "application/json"}, timeout=30)
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    typed = httpx.post(server.url + "/v1/completions", json={"model": m, "prompt": "a", "max_tokens": "many"}, timeout=30)
    assert typed.status_code == 400 and typed.json()["error"]["param"] == "max_tokens"
    # the generation endpoints validate the body themselves (serve.py `parse`, not FastAPI's): every shape of bad body
    for url, raw in (("/v1/completions", b""), ("/v1/completions", b"[1, 2]"), ("/v1/chat/completions", b"null"),
                     ("/v1/chat/completions", b'{"model": "x", "messages": []}')):
        r = httpx.post(server.url + url, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}, (url, raw, r.text)
    assert httpx.get(server.url + "/v1/completions", timeout=30).status_code == 405
    # stream_options is strict as the rest of the body: "yes" was taken as true
    r = httpx.post(server.url + "/v1/completions", timeout=30, json={"model": m, "prompt": "a", "max_tokens": 2,
                   "stream": True, "stream_options": {"include_usage": "yes"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.include_usage", r.text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-model", prompt="a", max_tokens=2)
    for kw, param in (({"n": 2}, "n"), ({"logprobs": 21}, "logprobs"), ({"stop": list("abcde")}, "stop")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=m, prompt="a", max_tokens=2, **kw)
        assert e.value.body["param"] == param
    # tool calls and constrained output are not produced: refused, not answered in plain text
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    msgs = [{"role": "user", "content": "a"}]
    for kw, param in (({"tools": [tool]}, "tools"), ({"tools": [tool], "tool_choice": "required"}, "tools"),
                      ({"tool_choice": "required"}, "tool_choice"),
                      ({"extra_body": {"functions": [tool["function"]]}}, "functions"),
                      ({"extra_body": {"function_call": {"name": "f"}}}, "function_call"),
                      ({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
                       "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=m, messages=msgs, max_tokens=2, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)
    ok = c.chat.completions.create(model=m, messages=msgs, max_tokens=2, temperature=0, tools=[tool],
                                   tool_choice="none", response_format={"type": "text"})
    plain = c.chat.completions.create(model=m, messages=msgs, max_tokens=2, temperature=0)
    old_form = c.chat.completions.create(model=m, messages=msgs, max_tokens=2, temperature=0,
                                         extra_body={"functions": [tool["function"]], "function_call": "none"})
    assert ok.choices[0].message.content == plain.choices[0].message.content == old_form.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=m, prompt="abc", max_tokens=600)
    assert re.search(r"prompt is \d+ tokens and max_tokens is 600.*context of 512", e.value.message)
    assert [x.id for x in c.models.list().data] == [m]
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert "case4_time_to_first_token_seconds_bucket" in metrics and "case4_queue_depth 0" in metrics
    # the reference backend has no graphs: the counters are there, at 0 (the cuda backend's come from its status)
    assert "case4_graphs_captured_total 0" in metrics and "case4_graph_misses_total 0" in metrics


def _tokens_out(srv) -> int:
    return int(re.search(r"case4_generation_tokens_total (\d+)", httpx.get(srv.url + "/metrics", timeout=30).text)[1])


def test_key_queue_disconnect_and_a_killed_server(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "serve.log", "--api-key", "k3y", "--max-queue", "1", "--slots", "1")
    try:
        m = str(model_dir)
        with pytest.raises(openai.AuthenticationError):
            client(srv, "wrong").completions.create(model=m, prompt="a", max_tokens=2)
        c = client(srv, "k3y")
        # A runs (long), B waits in the queue of one, C is refused with 429
        a = c.completions.create(model=m, prompt="long", max_tokens=500, temperature=0, stream=True)
        next(iter(a))
        b_result = {}
        # B ignores the EOS (vLLM's ignore_eos): sampled at temperature 1 with a random seed, it could otherwise stop
        # early (3 tokens in one CI run of session 30)
        b = threading.Thread(target=lambda: b_result.update(r=c.completions.create(
            model=m, prompt="b", max_tokens=4, extra_body={"ignore_eos": True})))
        b.start()
        deadline = time.monotonic() + 30
        while "case4_queue_depth 1" not in httpx.get(srv.url + "/metrics", timeout=30).text:
            assert time.monotonic() < deadline, "B never queued"
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=m, prompt="c", max_tokens=4)
        a.close()  # the client goes away: A stops early and B runs
        b.join(120)
        assert b_result["r"].usage.completion_tokens == 4
        assert _tokens_out(srv) < 500  # A's tokens (counted when it stopped) + B's 4
        # a server process killed mid-stream: an error event ends the stream, then 503s naming it
        with httpx.stream("POST", srv.url + "/v1/completions", headers={"Authorization": "Bearer k3y"}, timeout=60,
                          json={"model": m, "prompt": "x", "max_tokens": 500, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(srv.child_pid("server"), signal.SIGKILL)
            rest = [ln for ln in lines if ln]
        assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][len("data: "):])
        h = httpx.get(srv.url + "/health", timeout=30)
        assert h.status_code == 503 and "server process" in h.json()["cause"]
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model=m, prompt="a", max_tokens=2)
        assert e.value.status_code == 503 and "server process" in e.value.message
    finally:
        srv.stop()
    assert srv.proc.returncode is not None


def test_a_model_that_does_not_load_exits_2(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "serve", "--model", str(tmp_path / "none"),
                        "--port", "0"], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("case4: error:")]
    assert len(errors) == 1 and f"model '{tmp_path / 'none'}' does not exist" in errors[0]


@pytest.mark.parametrize("case", ["port in use", "unknown host", "stages file", "empty api key"])
def test_an_address_or_stages_file_that_cannot_be_used_exits_2(tmp_path, case):
    """Refused before the model loads, one line. Before: uvicorn's bind failed after the start (its ERROR line,
    'startup failed: handle is closed', exit 3); an unwritable CASE4_SERVE_STAGES was a traceback per stream;
    an empty --api-key made a server that refused every request."""
    flags, env, words = ["--port", "0"], {}, ""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        if case == "port in use":
            flags, words = ["--port", str(busy.getsockname()[1])], "Address already in use"
        elif case == "unknown host":
            flags, words = ["--host", "no.such.host.invalid", "--port", "0"], "cannot listen on --host no.such.host.invalid"
        elif case == "empty api key":  # was accepted: every request then answered 401
            flags, words = ["--port", "0", "--api-key", ""], "--api-key is empty"
        else:
            env, words = {"CASE4_SERVE_STAGES": str(tmp_path / "no" / "f.jsonl")}, "CASE4_SERVE_STAGES: cannot write"
        r = subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "serve", "--model", "synthetic:tiny",
                            "--backend", "reference", *flags], capture_output=True, text=True, timeout=120,
                           env={**_env(), **env}, cwd=ROOT)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("case4: error:"), r.stderr
    assert words in lines[0], lines[0]


def test_smollm2_chat_template_matches_the_cli(smollm2_dir, tmp_path):
    """The built-in model's own template: a one-turn chat equals `--chat` on the CLI, and a
    conversation tokenizes as HF's apply_chat_template."""
    from transformers import AutoTokenizer
    srv = Server(Path("smollm2"), tmp_path / "serve.log")
    try:
        c = client(srv)
        q = [{"role": "user", "content": "What is the tallest mountain on Earth?"}]
        r = c.chat.completions.create(model="smollm2", messages=q, max_tokens=16, temperature=0)
        toks, text, met = cli_greedy("smollm2", tmp_path, q[0]["content"], 16, "--chat")
        assert r.choices[0].message.content == text and r.usage.completion_tokens == len(toks)
        conv = q + [{"role": "assistant", "content": text}, {"role": "user", "content": "And the second?"}]
        r2 = c.chat.completions.create(model="smollm2", messages=conv, max_tokens=2, temperature=0)
        hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
        ids = hf(hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        assert r2.usage.prompt_tokens == len(ids["input_ids"])
    finally:
        srv.stop()


@pytest.mark.parametrize("pieces, stops, out", [
    (["ab", "c<", "/s", ">tail"], ["</s>"], "abc"),          # split over three pieces
    (["a<", "b"], ["</s>"], "a<b"),                           # a held prefix that was not a stop
    (["xy", "z"], ["yz", "xyz!"], "x"),                       # the earliest match wins
    (["hello"], ["\x00"], "hello"),                           # no match: all text, in order
])
def test_stop_text_cuts_at_the_first_stop(pieces, stops, out):
    from conductor.serve import StopText
    st = StopText(stops)
    got = ""
    for p in pieces:
        if not st.matched:
            got += st.feed(p)
    got += "" if st.matched else st.flush()
    assert got == out and st.matched == (out != "".join(pieces))


def test_metrics_text_carries_the_servers_graph_counters():
    from conductor.serve import Metrics
    txt = Metrics().text(0, 0, 4, 0, {"captured": 1999, "misses": 3, "replays": 99900})
    for line in ("case4_graphs_captured_total 1999", "case4_graph_misses_total 3", "case4_graph_replays_total 99900"):
        assert line in txt.splitlines()


def test_a_client_gone_mid_body_leaves_no_traceback(server, model_dir):  # noqa: F811
    """Headers and part of a body, then the connection closes: serve logs nothing (the generation endpoints are
    called by uvicorn directly, serve.py `asgi`) and answers the next request."""
    seen = len(server.log.read_text())
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\":")
        time.sleep(0.3)
    time.sleep(0.5)
    r = client(server).completions.create(model=str(model_dir), prompt="a", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert "Traceback" not in server.log.read_text()[seen:]


def test_stage_stamps_follow_each_streamed_request_to_its_first_token(model_dir, tmp_path, monkeypatch):  # noqa: F811
    """CASE4_SERVE_STAGES (docs/serve.md "Latency"): one JSON line per streamed request, its stages in the
    order a request passes them, on the clock of this process (CLOCK_MONOTONIC), between its send and its end."""
    monkeypatch.setenv("CASE4_SERVE_STAGES", str(tmp_path / "stages.jsonl"))
    srv = Server(model_dir, tmp_path / "serve.log")
    try:
        spans = []
        for n in (5, 40):
            ids = [256] + list(range(65, 65 + n))
            t0 = time.perf_counter()
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
                    "model": str(model_dir), "prompt": ids, "max_tokens": 3, "stream": True, "ignore_eos": True}) as r:
                lines = [ln for ln in r.iter_lines() if ln]
            spans.append((t0, time.perf_counter(), len(ids)))
            assert lines[-1] == "data: [DONE]"
        got = [json.loads(ln) for ln in (tmp_path / "stages.jsonl").read_text().splitlines()]
        order = ["asgi", "parsed", "worker", "prefilled.in", "prefilled.out", "prefilled", "sampled.in", "sampled.out",
                 "sampled", "queued", "loop", "sent"]
        assert len(got) == 2
        for (t0, t1, n), st in zip(spans, got):
            assert st["prompt_tokens"] == n
            ts = [st[k] for k in order]
            assert t0 <= ts[0] and ts == sorted(ts) and ts[-1] <= t1, st
    finally:
        srv.stop()
