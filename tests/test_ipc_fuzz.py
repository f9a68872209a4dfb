"""Protocol fuzz (issue 29 §4): malformed requests to a live server and a live client (synthetic:tiny,
reference backend). Each gets an error reply and the process keeps serving; a seeded generation (client
sampling through the decode loop) afterwards is token- and text-identical to the one before.

Two kinds of bad request: schema violations drawn from a seeded generator (every one is checked
to fail ipc/messages.py validate() here first, so none can be a valid request by chance, e.g. a
`stop`), and hand-written requests that pass the schema but not the op (huge ints, out-of-range
ids, garbage sampling params, a tokenizer folder that does not exist, ...). Bounded: a fixed
count, each reply awaited at most 30 s."""
import math
import os
import random

import pytest

from ipc import shm
from ipc.link import Link
from ipc.messages import CLIENT_OPS, REQUIRED, SERVER_ALIASES, SERVER_OPS, ProtocolError, request, validate
from ipc.peers import Peer, context, watch_link

SEED = 29
N_RANDOM = 150  # generated schema violations per process
PROMPT = [256] + list(b"Once upon")
PARAMS = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 42}

# values of every kind, nested ones included; None is left out (an argument given as None takes its default)
GARBAGE = [2**64, -2**100, 10**400, 7, -1, 0, True, False, math.nan, math.inf, -0.0, 1e308, 2.5, "", "x" * 1000,
           "\udcff", "kv_init", b"\x00\xff", bytearray(b"ab"), [], [1, [2, [3]]], [1, "2"], [2**70], [1.5],
           {"a": {"b": [1]}}, {1: 2}, (1, 2), {1, 2}, frozenset(), complex(1, 2), range(3), Ellipsis]
RAW = [b"", b"\x00\xffnot a pickle", b"cno_such_module_c4\nThing\n.", b"\x80\x04", b"\x80\x05\x95" + b"\xff" * 8,
       b"N."]  # the last: a pickled None (not a dict)


@pytest.fixture(scope="module")
def pair():
    from client.process import client_main
    from server.process import server_main
    name = shm.new_name(os.getpid())
    link = Link(context())
    server = Peer("server", server_main, ({"model": "synthetic:tiny", "backend": "reference", "device": "cpu",
                                           "shm": name, "slots": 4, "link": link},)).start()
    client = Peer("client", client_main, ({"lazy": True, "link": link},)).start()
    watch_link(link, (server, client))
    try:
        info = server.recv(0, timeout=300)["result"]
        assert client.recv(0, timeout=60)["ok"]
        client.call("init", {"tokenizer_dir": None, "vocab_size": info["vocab_size"], "shm": name, "slots": 4})
        yield server, client, name, info["vocab_size"]
    finally:
        client.stop()
        server.stop()
        link.close()
        shm.unlink(name)
    assert server.proc.exitcode == 0 and client.proc.exitcode == 0
    assert not os.path.exists(f"/dev/shm/{name}")


_loops = iter(range(1, 10**6))


def generation(server, client, n=24):
    """Prefill, the first token sampled by the client, then one decode loop of n tokens: (tokens, text)."""
    client.call("tokenize", {"text": "x"})  # a fresh detokenizer stream
    r = server.call("kv_init", {"input_ids": PROMPT})["result"]
    first = client.call("sample", {"slot": r["slot"], "step": r["step"], "params": PARAMS,
                                   "position": len(PROMPT) - 1})["result"]
    loop = next(_loops)
    sid = server.send("decode_loop", {"seq_len": r["seq_len"], "token": first["token"], "loop": loop})
    cid = client.send("sample_loop", {"loop": loop, "params": PARAMS, "position": r["seq_len"], "max_tokens": n})
    toks, text = [first["token"]], [first["text"]]

    def on_stream(item):
        toks.extend(item[0])
        text.append(item[1])
    assert client.recv(cid, 60, (server,), on_stream=on_stream)["ok"]
    assert server.recv(sid, 60, (client,))["ok"]
    return toks, "".join(text)


def malformed(rng: random.Random, ops: dict, aliases: dict) -> dict:
    """One request that validate() refuses (checked by the caller)."""
    names = sorted(ops) + sorted(aliases)
    op = rng.choice(names)
    spec = ops[aliases.get(op, op)]
    kind = rng.randrange(7)
    if kind == 0:  # unknown op, or an op that is not a string
        return {"id": 1, "op": rng.choice(["teleport", "KV_INIT", "kv_init ", "", "stop\x00", *GARBAGE[:12]]),
                "args": {}}
    if kind == 1:  # args that are not a dict
        return {"id": 1, "op": op, "args": rng.choice([a for a in GARBAGE if not isinstance(a, dict)])}
    args = {k: good_value(t) for k, (t, d) in spec.items() if d is REQUIRED or rng.random() < 0.5}
    if kind == 2 and any(d is REQUIRED for _, d in spec.values()):  # a required argument missing
        args.pop(rng.choice([k for k, (_, d) in spec.items() if d is REQUIRED]))
    elif kind in (2, 3) and spec:  # an argument of the wrong type (nested garbage for list[int])
        args[rng.choice(sorted(spec))] = rng.choice(GARBAGE)
    elif kind == 4:  # an argument the op does not have
        args[rng.choice(["colour", "Session", "", "args", "__class__"])] = rng.choice(GARBAGE)
    elif kind == 5:  # no op key / a message that is not a request record
        return rng.choice([{"id": 1, "args": args}, {"op": None, "args": args}, [op, args], (op,), op])
    else:  # a request id of any kind with an op whose arguments are wrong
        args[rng.choice(sorted(spec) or ["x"])] = rng.choice(GARBAGE)
        return {"id": rng.choice([2**80, "7", [7], -3]), "op": op, "args": args}
    return {"id": 1, "op": op, "args": args}


def good_value(typ):
    return {int: 1, float: 1.0, bool: False, str: "x", dict: {}, list: [], "list[int]": [1]}[typ]


def send_raw(p: Peer, msg) -> dict:
    """Send msg (a request, any object, or raw bytes) straight on the request pipe; its reply."""
    if isinstance(msg, bytes):
        p.req._writer.send_bytes(msg)
        rid = None
    else:
        p.req.put(msg)
        rid = msg.get("id") if isinstance(msg, dict) else None
    reply = p.recv(rid, timeout=30)
    assert p.proc.exitcode is None
    return reply


def server_cases(vocab: int) -> list[dict]:
    """Past the schema, refused by the op."""
    huge = [2**63, 2**64, 10**30, -1, -2**70]
    return [request(1, op, args) for op, args in [
        ("kv_init", {"input_ids": []}), ("kv_init", {"input_ids": [vocab]}), ("kv_init", {"input_ids": [2**70]}),
        ("kv_init", {"input_ids": [-1, 3]}), ("kv_init", {"input_ids": [1] * 100_000}),
        *[("kv_init", {"input_ids": [1], "session": s}) for s in huge],
        ("kv_init", {"input_ids": [1], "sample": {"temperature": "hot"}}),
        ("kv_init", {"input_ids": [1], "sample": {"seed": 2**64}}),
        *[("kv_step", {"token": t}) for t in huge], ("kv_step", {"token": 1, "session": 10**20}),
        *[("replay_seq", {"seq_len": t, "token": 1}) for t in huge],
        *[("kv_generate", {"steps": s, "sampling": {}, "start_token": 1}) for s in (0, -1, 10**12, 2**64)],
        ("kv_generate", {"steps": 2, "sampling": {"top_k": [1]}, "start_token": 1}),
        ("kv_generate", {"steps": 2, "sampling": {"nonsense": 1}, "start_token": 1}),
        ("kv_generate", {"steps": 2, "sampling": {"top_p": math.nan}, "start_token": 1}),
        ("kv_generate", {"steps": 2, "sampling": {}, "start_token": 2**40}),
        *[("decode_loop", {"seq_len": 2, "token": 1, "loop": 2**90, "timeout_s": t}) for t in (0.0, -1.0, math.nan)],
        ("bg_capture_start", {"window": 2**70}), ("wait_precapture", {"count": 10**9, "timeout_s": math.inf}),
    ]]


def client_cases(vocab: int, shm_name: str) -> list[dict]:
    return [request(1, op, args) for op, args in [
        ("init", {"tokenizer_dir": "/no/such/tokenizer", "vocab_size": vocab, "shm": shm_name, "slots": 4}),
        ("init", {"tokenizer_dir": None, "vocab_size": 5, "shm": "case4_no_such_block", "slots": 4}),
        ("init", {"tokenizer_dir": None, "vocab_size": 2**40, "shm": shm_name, "slots": 4}),
        ("init", {"tokenizer_dir": None, "vocab_size": vocab, "shm": shm_name, "slots": -3}),
        ("tokenize", {"text": "\udcff"}), ("tokenize", {"text": "abc", "max_len": -1}),
        *[("detokenize", {"ids": [72, t], "stream": True}) for t in (vocab, 2**40, -1, 2**64)],
        *[("sample", {"slot": s, "step": 0, "params": {}, "position": 1}) for s in (10**20, -1, 4)],
        ("sample", {"slot": 0, "step": 2**70, "params": {}, "position": 1}),
        ("sample", {"slot": 0, "step": 0, "params": {"top_p": 0}, "position": 1}),
        ("sample", {"slot": 0, "step": 0, "params": [], "position": 1}),
        ("sample_loop", {"loop": 2**90, "params": {}, "position": 1, "max_tokens": 0}),
        ("sample_loop", {"loop": 2**91, "params": {"temperature": -1}, "position": 1, "max_tokens": 3}),
    ]]


@pytest.mark.parametrize("target", ["server", "client"])
def test_malformed_requests_get_error_replies_and_change_nothing(pair, target):
    server, client, name, vocab = pair
    before = generation(server, client)
    assert len(before[0]) == 25
    p, ops, aliases = (server, SERVER_OPS, SERVER_ALIASES) if target == "server" else (client, CLIENT_OPS, {})
    rng = random.Random(SEED)
    sent = 0
    while sent < N_RANDOM:
        msg = malformed(rng, ops, aliases)
        try:
            validate(msg, ops, aliases)
            continue  # valid after all (e.g. garbage that happened to fit): not a malformed request
        except ProtocolError:
            pass
        reply = send_raw(p, msg)
        assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", (msg, reply)
        sent += 1
    for raw in RAW:
        reply = send_raw(p, raw)
        assert reply["ok"] is False and reply["error"]["type"] == "ProtocolError", (raw, reply)
    cases = server_cases(vocab) if target == "server" else client_cases(vocab, name)
    for msg in cases:
        reply = send_raw(p, msg)
        assert reply["ok"] is False and reply["error"]["message"], (msg, reply)
        if target == "client":  # a failed request changed nothing (a half-applied init would show here)
            assert client.call("detokenize", {"ids": [72, vocab - 1]})["ok"], msg
            assert send_raw(client, request(2, "detokenize", {"ids": [vocab]}))["ok"] is False, msg
    assert generation(server, client) == before
