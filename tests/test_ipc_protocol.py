"""ipc/: validation, the shared-memory ring, dead-peer detection, and a live server
(synthetic:tiny on the reference backend) answering bad requests without dying."""
import os

import numpy as np
import pytest

from ipc import shm
from ipc.messages import SERVER_ALIASES, SERVER_OPS, ProtocolError, RemoteError, validate
from ipc.peers import Peer, PeerDied


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
    from client.sampler import SamplingParams, sample
    params = SamplingParams(0.9, 20, 0.95, 42)
    ids = [256] + list(b"Once")
    r = server.call("kv_init", {"input_ids": ids, "sample": params.to_dict()})["result"]
    first = r["token"]
    gen = server.call("kv_generate", {"steps": 10, "sampling": params.to_dict(), "start_token": first})["result"]
    # the same with logits through shared memory and the client's sampler
    r = server.call("kv_init", {"input_ids": ids})["result"]
    toks = [sample(server_channel(server).read(r["slot"], r["step"]), params, r["seq_len"] - 1)]
    assert toks[0] == first
    for _ in range(10):
        r = server.call("replay_seq", {"seq_len": r["seq_len"], "token": toks[-1]})["result"]
        toks.append(sample(server_channel(server).read(r["slot"], r["step"]), params, r["seq_len"] - 1))
    assert gen["tokens"] == toks[1:] and gen["seq_len"] == len(ids) + 10


def test_kv_generate_validates(server):
    assert "steps" in _err(server, "kv_generate", {"steps": 0, "sampling": {}, "start_token": 1})["message"]
    assert "top_p" in _err(server, "kv_generate", {"steps": 1, "sampling": {"top_p": 0}, "start_token": 1})["message"]


def test_remote_error_names_the_peer(server):
    with pytest.raises(RemoteError, match="server: kv_step: ProtocolError"):
        server.call("kv_step", {})


def test_ipc_overhead_bench_runs():
    """bench/ipc_overhead.py end to end (the number itself depends on the machine: see its output)."""
    from bench.ipc_overhead import bare_round_trip, measure
    us = measure(300, 512)
    assert 0 < us < 20000
    assert 0 < bare_round_trip(100) < 20000
