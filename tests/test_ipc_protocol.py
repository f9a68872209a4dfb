"""ipc/: validation, the shared-memory ring, dead-peer detection, a live server
(synthetic:tiny on the reference backend) answering bad requests without dying, and the
decode loop (server and client over their direct link), its errors and dead peers."""
import os
import signal
import time

import numpy as np
import pytest

from ipc import shm
from ipc.messages import SERVER_ALIASES, SERVER_OPS, ProtocolError, RemoteError, validate
from ipc.link import Link
from ipc.peers import Peer, PeerDied, context, watch_link


# ---- records and validation

def test_validate_fills_defaults_and_maps_aliases():
    rid, op, args = validate({"id": 3, "op": "devgraph_replay_seq_custom", "args": {"seq_len": 4, "token": 1}},
                             SERVER_OPS, SERVER_ALIASES)
    assert (rid, op, args) == (3, "replay_seq", {"session": 0, "seq_len": 4, "token": 1, "sample": None})


@pytest.mark.parametrize("msg, words", [
    ({"id": 1, "op": "fly"}, "unknown op"),
    ({"id": 1}, "no op"),
    ("kv_init", "must be a dict"),
    ({"id": 1, "op": "kv_init", "args": {}}, "missing argument 'input_ids'"),
    ({"id": 1, "op": "kv_init", "args": {"input_ids": "hello"}}, r"must be list\[int\]"),
    ({"id": 1, "op": "kv_init", "args": {"input_ids": [1, 2.5]}}, r"must be list\[int\]"),
    ({"id": 1, "op": "kv_step", "args": {"token": True}}, "must be int"),
    ({"id": 1, "op": "kv_step", "args": {"token": 1, "colour": 2}}, "unknown argument"),
    ({"id": 1, "op": "status", "args": [1]}, "args must be a dict"),
])
def test_validate_rejects(msg, words):
    with pytest.raises(ProtocolError, match=words):
        validate(msg, SERVER_OPS, SERVER_ALIASES)


def test_logits_channel_roundtrip_and_stale_step():
    name = shm.new_name(os.getpid())
    w = shm.LogitsChannel(name, 2, 10, create=True)
    try:
        r = shm.LogitsChannel(name, 2, 10)
        slot = w.write(5, np.arange(10, dtype=np.float32))
        assert np.array_equal(r.read(slot, 5), np.arange(10))
        w.write(7, np.zeros(10))  # same slot, later step
        with pytest.raises(ValueError, match="holds step 7"):
            r.read(slot, 5)
        r.close()
    finally:
        w.close()
        assert shm.unlink(name)
    assert not os.path.exists(f"/dev/shm/{name}") and not shm.unlink(name)


def _exit_with(req, rep, code):
    os._exit(code)


def test_dead_peer_is_reported_by_name_and_exit_code():
    p = Peer("client", _exit_with, (3,)).start()
    with pytest.raises(PeerDied, match=r"client process died \(exit code 3\)"):
        p.recv(1, timeout=10)
    p.stop()


# ---- the server process does not import the client package

def test_server_does_not_import_the_client_package():
    """Statically (no server module names it) and at run time (what server_main and both
    backends import, in a fresh interpreter): sampling comes from case4_sampling, not client/."""
    import ast
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    for f in sorted((root / "server").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "client" or n.startswith("client.") for n in names), (f.name, names)
    code = ("import sys, server.process, server.backends, server.model.resolve, server.reference_backend, "
            "server.cuda_backend; from server.process import load; "
            "bad = [m for m in sys.modules if m == 'client' or m.startswith('client.')]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---- a live server

@pytest.fixture(scope="module")
def server():
    from server.process import server_main
    name = shm.new_name(os.getpid())
    p = Peer("server", server_main, ({"model": "synthetic:tiny", "backend": "reference", "device": "cpu",
                                      "shm": name, "slots": 4},)).start()
    info = p.recv(0, timeout=300)
    assert info["ok"], info
    p.info, p.shm_name, p.channel = info["result"], name, None
    yield p
    if p.channel is not None:
        p.channel.close()
    p.stop()
    assert p.proc.exitcode == 0
    shm.unlink(name)
    assert not os.path.exists(f"/dev/shm/{name}")


def _err(p, op, args=None):
    reply = p.recv(p.send(op, args), timeout=60)
    assert not reply["ok"], reply
    assert set(reply["error"]) >= {"type", "message"}
    return reply["error"]


def test_bad_requests_get_error_replies_and_the_server_keeps_serving(server):
    assert "unknown op" in _err(server, "teleport")["message"]
    assert "missing argument" in _err(server, "kv_init")["message"]
    assert "must be list[int]" in _err(server, "kv_init", {"input_ids": "abc"})["message"]
    assert "must be int" in _err(server, "kv_step", {"token": "x"})["message"]
    assert "out of range" in _err(server, "kv_init", {"input_ids": [1, 10**6]})["message"]
    assert "session" in _err(server, "kv_step", {"session": 9, "token": 1})["message"]
    server.req.put("not a dict")  # garbage straight on the queue
    assert server.recv(None, timeout=30)["ok"] is False
    r = server.call("kv_init", {"input_ids": [256, 72, 105]})["result"]
    assert r["seq_len"] == 3
    assert "does not match" in _err(server, "replay_seq", {"seq_len": 7, "token": 1})["message"]
    assert server.call("status")["ok"]


@pytest.mark.parametrize("payload", [
    b"\x00\xffnot a pickle",                # raw bytes
    b"cno_such_module_c4\nThing\n.",          # a pickle of a class the server cannot import
    b"\x80\x04",                            # a truncated pickle (pickle raises EOFError: not a closed pipe)
])
def test_unreadable_bytes_get_an_error_reply_and_the_server_keeps_serving(server, payload):
    server.req._writer.send_bytes(payload)  # straight on the request pipe, past the queue's pickling
    reply = server.recv(None, timeout=30)
    assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", reply
    assert "unreadable request" in reply["error"]["message"]
    assert server.call("status")["ok"] and server.proc.exitcode is None


def test_graph_ops_say_unavailable_and_replay_runs_eagerly(server):
    for op, args in [("bg_capture_start", {"window": 4}), ("wait_precapture", {"count": 2}),
                     ("bg_capture_stop", {}), ("devgraph_bg_capture_start_custom", {"window": 4}),
                     ("devgraph_wait_precapture_custom", {"count": 1}), ("devgraph_bg_capture_stop", {})]:
        e = _err(server, op, args)
        assert e["type"] == "GraphsUnavailable" and "unavailable" in e["message"]
    st = server.call("status")["result"]
    assert st["graphs_available"] is False and st["backend"] == "reference"
    # replay_seq (eager) and kv_step give the same logits for the same history
    ids = [256, 65, 66]
    a = server.call("kv_init", {"input_ids": ids})["result"]
    r1 = server.call("devgraph_replay_seq_custom", {"seq_len": 3, "token": 67})["result"]
    l1 = np.array(server_channel(server).read(r1["slot"], r1["step"]))
    server.call("kv_init", {"input_ids": ids})
    r2 = server.call("kv_step", {"token": 67})["result"]
    l2 = np.array(server_channel(server).read(r2["slot"], r2["step"]))
    assert a["seq_len"] == 3 and r1["seq_len"] == r2["seq_len"] == 4
    np.testing.assert_array_equal(l1, l2)


def server_channel(p):
    if p.channel is None:
        p.channel = shm.LogitsChannel(p.shm_name, 4, p.info["vocab_size"])
    return p.channel


def test_kv_generate_equals_step_by_step_sampling(server):
    """kv_generate == one replay_seq / kv_step per token with `sample` set (both: the backend's
    device sampler, keyed by the fed token's position); the host sampler on the same logits
    from shared memory agrees (tests/test_sampler.py bounds where the two may differ)."""
    from case4_sampling import SamplingParams, sample
    params = SamplingParams(0.9, 20, 0.95, 42)
    ids = [256] + list(b"Once")
    r = server.call("kv_init", {"input_ids": ids, "sample": params.to_dict()})["result"]
    first = r["token"]
    gen = server.call("kv_generate", {"steps": 10, "sampling": params.to_dict(), "start_token": first})["result"]
    r = server.call("kv_init", {"input_ids": ids, "sample": params.to_dict()})["result"]
    toks, host = [r["token"]], [sample(server_channel(server).read(r["slot"], r["step"]), params, r["seq_len"] - 1)]
    for i in range(10):
        op, args = ("replay_seq", {"seq_len": r["seq_len"]}) if i % 2 else ("kv_step", {})
        r = server.call(op, {**args, "token": toks[-1], "sample": params.to_dict()})["result"]
        toks.append(r["token"])
        host.append(sample(server_channel(server).read(r["slot"], r["step"]), params, r["seq_len"] - 1))
    assert toks[0] == first and gen["tokens"] == toks[1:] and gen["seq_len"] == len(ids) + 10
    assert host == toks


@pytest.mark.parametrize("op, args", [("replay_seq", {"seq_len": 0, "token": 65}), ("kv_step", {"token": 65}),
                                      ("kv_generate", {"steps": 3, "sampling": {}, "start_token": 65}),
                                      ("decode_loop", {"seq_len": 0, "token": 65, "loop": 9})])
def test_decoding_a_session_without_a_prompt_is_refused(op, args):
    """Before any kv_init a session is at position 0: stepping it would decode from nothing."""
    from server.process import server_main
    name = shm.new_name(os.getpid())
    p = Peer("server", server_main, ({"model": "synthetic:tiny", "backend": "reference", "device": "cpu",
                                            "shm": name, "slots": 4, "sessions": 2},)).start()
    try:
        assert p.recv(0, timeout=300)["ok"]
        for session in (0, 1):
            e = _err(p, op, {**args, "session": session})
            assert e["bad_input"] and f"{op}: session {session} has no prompt yet" in e["message"], e
        p.call("kv_init", {"input_ids": [256, 65], "session": 1})
        assert "no prompt" in _err(p, op, {**args, "session": 0})["message"]  # the other session still has none
        if op != "decode_loop":  # (needs a client on a link)
            ok = p.call(op, {**args, "session": 1, **({"seq_len": 2} if "seq_len" in args else {})})["result"]
            assert ok["seq_len"] > 2
    finally:
        p.stop()
        shm.unlink(name)


def test_kv_generate_validates(server):
    assert "steps" in _err(server, "kv_generate", {"steps": 0, "sampling": {}, "start_token": 1})["message"]
    assert "top_p" in _err(server, "kv_generate", {"steps": 1, "sampling": {"top_p": 0}, "start_token": 1})["message"]


def test_a_seed_beyond_64_bits_is_bad_input(server, pair):
    """On every path that takes sampling params: kv_init / kv_generate on the server, sample on the client."""
    big = {"temperature": 1.0, "seed": 2**64}
    server.call("kv_init", {"input_ids": [256, 65]})
    for op, args in [("kv_init", {"input_ids": [256, 65], "sample": big}),
                     ("kv_generate", {"steps": 2, "sampling": big, "start_token": 66})]:
        e = _err(server, op, args)
        assert e["bad_input"] and "seed must be a 64-bit integer" in e["message"], e
    psrv, client = pair
    s = psrv.call("kv_init", {"input_ids": [256, 65]})["result"]
    e = _err(client, "sample", {"slot": s["slot"], "step": s["step"], "params": big, "position": 1})
    assert e["bad_input"] and "seed must be a 64-bit integer" in e["message"], e


def test_remote_error_names_the_peer(server):
    with pytest.raises(RemoteError, match="server: kv_step: ProtocolError"):
        server.call("kv_step", {})


def test_ipc_overhead_bench_runs(capsys):
    """bench/ipc_overhead.py end to end: both IPC paths run a real orchestrator against the no-op
    server and get every token (measure() raises otherwise), and the report is printed. The
    numbers depend on the machine: the bench reports them; no test bounds them."""
    from bench.ipc_overhead import main
    assert main(["--tokens", "100", "--vocab", "512"]) == 0
    out = capsys.readouterr().out
    assert "us/token over 100 tokens" in out and "--ipc calls" in out and "bare queue round trip" in out, out


# ---- the decode loop: server and client talk directly (ipc/link.py)

def _start_pair(server_opts: dict, link=None, server_target=None, client_target=None):
    """A server and a client on one link (either may be replaced by a stand-in target)."""
    from client.process import client_main
    from server.process import server_main
    link = link or Link(context())
    server = Peer("server", server_target or server_main, (dict(server_opts, link=link),)).start()
    client = Peer("client", client_target or client_main, ({"lazy": True, "link": link},)).start()
    watch_link(link, (server, client))
    return server, client, link


@pytest.fixture(scope="module")
def pair():
    name = shm.new_name(os.getpid())
    server, client, link = _start_pair({"model": "synthetic:tiny", "backend": "reference", "device": "cpu",
                                        "shm": name, "slots": 4})
    info = server.recv(0, timeout=300)["result"]
    client.recv(0, timeout=60)
    client.call("init", {"tokenizer_dir": None, "vocab_size": info["vocab_size"], "shm": name, "slots": 4})
    yield server, client
    client.stop()
    server.stop()
    assert server.proc.exitcode == 0 and client.proc.exitcode == 0
    link.close()
    shm.unlink(name)


def _loop(server, client, loop, seq_len, token, n, params, stop_ids=()):
    """Run one decode loop as the orchestrator does; (streamed tokens, server reply, client reply)."""
    sid = server.send("decode_loop", {"seq_len": seq_len, "token": token, "loop": loop})
    cid = client.send("sample_loop", {"loop": loop, "params": params, "position": seq_len, "max_tokens": n,
                                      "stop_ids": list(stop_ids)})
    streamed = []
    crep = client.recv(cid, 60, (server,), on_stream=lambda item: streamed.extend(item[0]))
    return streamed, server.recv(sid, 60, (client,)), crep


def test_decode_loop_equals_kv_generate_and_stops_without_a_wasted_step(pair):
    from case4_sampling import SamplingParams
    server, client = pair
    params = SamplingParams(0.9, 20, 0.95, 42).to_dict()
    ids = [256] + list(b"Once")
    first = server.call("kv_init", {"input_ids": ids, "sample": params})["result"]["token"]
    gen = server.call("kv_generate", {"steps": 10, "sampling": params, "start_token": first})["result"]["tokens"]
    server.call("kv_init", {"input_ids": ids})
    toks, srep, crep = _loop(server, client, 1, len(ids), first, 10, params)
    assert toks == gen
    assert srep["result"]["steps"] == 10 and srep["result"]["seq_len"] == len(ids) + 10
    assert crep["result"]["stop_reason"] == "max_tokens" and crep["result"]["tokens"] == 10
    assert len(srep["result"]["t"]) == 10
    # a stop id ends the loop where it is sampled: the server takes no step after it
    k = gen.index(gen[3])
    server.call("kv_init", {"input_ids": ids})
    toks, srep, crep = _loop(server, client, 2, len(ids), first, 10, params, stop_ids=[gen[3]])
    assert toks == gen[:k + 1] and crep["result"]["stop_reason"] == "eos"
    assert srep["result"]["steps"] == k + 1 and srep["result"]["seq_len"] == len(ids) + k + 1


@pytest.mark.parametrize("bad", [2**40, -1, 10**6])
def test_out_of_vocab_detokenize_is_refused_and_poisons_nothing(pair, bad):
    from server.model.config import SYNTHETIC_SHAPES
    server, client = pair
    vocab = SYNTHETIC_SHAPES["tiny"].vocab_size  # the pair's model
    client.call("tokenize", {"text": "x"})  # a new stream (earlier tests streamed on this client)
    r = client.recv(client.send("detokenize", {"ids": [72, bad], "stream": True}), timeout=30)
    assert not r["ok"] and r["error"]["bad_input"] and f"token id {bad} out of range" in r["error"]["message"], r
    # the stream and sampling go on as if the bad request had not come
    assert client.call("detokenize", {"ids": [72, 105], "stream": True})["result"]["text"] == "Hi"
    s = server.call("kv_init", {"input_ids": [256, 65]})["result"]
    got = client.call("sample", {"slot": s["slot"], "step": s["step"], "params": {}, "position": 1})["result"]
    assert 0 <= got["token"] < vocab


def test_a_failed_stream_push_leaves_the_stream_as_it_was(smollm2_dir):
    """The HF tokenizer raises OverflowError on id 2**40 (what used to break every later sample):
    the incremental detokenizer drops the failed push, and the next one decodes as if it had not come."""
    from client.tokenizer import HFTokenizer, IncrementalDetokenizer
    tok = HFTokenizer(str(smollm2_dir))
    ids = tok.encode("Hello world", add_special_tokens=False)
    d = IncrementalDetokenizer(tok)
    d.push(ids[:1])
    with pytest.raises(OverflowError):
        d.push([2**40])
    d.push(ids[1:])
    assert d.text() == "Hello world" and d.ids == ids


def test_decode_loop_errors_end_both_halves_and_both_keep_serving(pair):
    server, client = pair
    params = {"temperature": 0.0}
    server.call("kv_init", {"input_ids": [256, 65]})
    _, srep, crep = _loop(server, client, 3, 7, 66, 5, params)  # wrong seq_len: the server fails
    assert not srep["ok"] and "does not match" in srep["error"]["message"]
    assert not crep["ok"] and "server ended the decode loop" in crep["error"]["message"]
    _, srep, crep = _loop(server, client, 4, 2, 66, 0, params)  # bad max_tokens: the client fails
    assert not crep["ok"] and "max_tokens" in crep["error"]["message"]
    assert srep["ok"] and srep["result"]["steps"] == 1  # it stepped once, then was told to stop
    # messages of the failed loops were left on the link; the next loop ignores them
    server.call("kv_init", {"input_ids": [256, 65]})
    toks, srep, crep = _loop(server, client, 5, 2, 66, 4, params)
    assert srep["ok"] and crep["ok"] and len(toks) == 4
    assert server.call("status")["ok"] and client.call("detokenize", {"ids": toks})["ok"]


def _hold(req, rep, opts):
    """A stand-in peer on the link that never answers (killed by the test)."""
    time.sleep(600)


@pytest.mark.parametrize("victim", ["client", "server"])
def test_a_dead_peer_wakes_the_one_blocked_on_the_link(victim):
    """Kill the client while the server waits on the link for its token, and vice versa:
    the watchdog aborts the link, the survivor ends its loop at once and keeps serving."""
    from client.process import client_main
    from server.process import server_main
    name = shm.new_name(os.getpid())
    opts = {"factory": "bench.ipc_overhead:make_noop", "vocab": 512, "shm": name, "slots": 4}
    server, client, link = _start_pair(opts, server_target=_hold if victim == "server" else server_main,
                                       client_target=_hold if victim == "client" else client_main)
    dead, survivor = (server, client) if victim == "server" else (client, server)
    own = None
    try:
        if victim == "client":
            server.recv(0, timeout=60)
            server.call("kv_init", {"input_ids": [1, 2, 3]})
            rid = server.send("decode_loop", {"seq_len": 3, "token": 65, "loop": 1})
            assert link.to_client.get()[0] == 1  # the server stepped and now waits for a token
        else:
            own = shm.LogitsChannel(name, 4, 512, create=True)
            client.recv(0, timeout=60)
            client.call("init", {"tokenizer_dir": None, "vocab_size": 512, "shm": name, "slots": 4})
            rid = client.send("sample_loop", {"loop": 1, "params": {}, "position": 3, "max_tokens": 5})
            time.sleep(0.3)  # the client waits for a step
        os.kill(dead.pid, signal.SIGKILL)
        t0 = time.monotonic()
        reply = survivor.recv(rid, 10)  # the survivor was woken: its loop ended
        assert time.monotonic() - t0 < 5 and reply["ok"], reply
        dead.proc.join(5)
        with pytest.raises(PeerDied, match=rf"{victim} process died \(exit code -9\)"):
            dead.check()
        assert reply["result"].get("aborted") or reply["result"].get("stop_reason") == "aborted"
        assert survivor.call("stop")["ok"]
    finally:
        survivor.stop()
        dead.stop()
        if own:
            own.close()
        link.close()
        shm.unlink(name)


def test_decode_loop_without_a_client_ends_with_an_error_reply():
    """A server in decode_loop whose client never answers is not wedged: after `timeout_s` with
    no token it ends the loop (telling the link's other end with (loop, None)), replies with an
    error, and keeps serving."""
    from server.process import server_main
    name = shm.new_name(os.getpid())
    link = Link(context())
    server = Peer("server", server_main, ({"model": "synthetic:tiny", "backend": "reference", "device": "cpu",
                                           "shm": name, "slots": 4, "link": link},)).start()
    watch_link(link, (server,))
    try:
        assert server.recv(0, timeout=300)["ok"]
        server.call("kv_init", {"input_ids": [256, 65]})
        for bad in (0.0, -1.0, float("nan"), float("inf")):
            e = _err(server, "decode_loop", {"seq_len": 2, "token": 66, "loop": 1, "timeout_s": bad})
            assert e["bad_input"] and "timeout_s must be a positive number" in e["message"], e
        t0 = time.monotonic()
        reply = server.recv(server.send("decode_loop", {"seq_len": 2, "token": 66, "loop": 2, "timeout_s": 1.0}),
                            timeout=30)
        took = time.monotonic() - t0
        assert not reply["ok"] and reply["error"]["type"] == "PeerTimeout", reply
        assert "no token from the client in 1 s (after step 1)" in reply["error"]["message"], reply
        assert 1.0 <= took < 10, took
        step = link.to_client.get()
        assert step[0] == 2 and isinstance(step[1], int)  # the one step it took
        assert link.to_client.get() == (2, None)          # then: the loop is over
        assert server.call("status")["result"]["positions"] == [3]  # prompt (2) + the one step
        assert server.call("kv_init", {"input_ids": [256, 65]})["result"]["seq_len"] == 2
    finally:
        server.stop()
        link.close()
        shm.unlink(name)
    assert server.proc.exitcode == 0
