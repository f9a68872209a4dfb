"""Per-token cost of the IPC round trip with a no-op model step.

One token = replay_seq request to the server -> (no-op step) -> logits written to the
shared-memory ring -> reply -> client `sample` request (reads the logits from shared
memory, samples greedily, detokenizes) -> reply. Target: <= 100 us per token.

    python bench/ipc_overhead.py [--tokens 2000] [--vocab 32000]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class NoopBackend:
    """Implements just what the server process needs; every step returns the same logits."""
    name, supports_graphs, sessions = "noop", False, 1

    def __init__(self, vocab: int):
        import numpy as np
        self.cfg = SimpleNamespace(vocab_size=vocab, max_seq_len=1 << 30, bos_token_id=None, eos_token_ids=())
        self.logits = np.zeros(vocab, dtype=np.float32)
        self.logits[65] = 1.0  # greedy picks byte 'A'
        self.pos = 0

    def reset(self, s): self.pos = 0
    def seq_len(self, s): return self.pos

    def prefill(self, s, ids):
        self.pos = len(ids)
        return self.logits

    def step(self, s, token):
        self.pos += 1
        return self.logits

    def replay(self, s, seq_len, token): return self.step(s, token)
    def status(self): return {"backend": "noop", "device": "cpu", "dtype": "float32"}
    def close(self): pass


def make_noop(opts: dict):
    """Server factory (CASE4_SERVER_FACTORY=bench.ipc_overhead:make_noop)."""
    vocab = int(opts.get("vocab", 0) or os.environ.get("CASE4_NOOP_VOCAB", 512))
    b = NoopBackend(vocab)
    return SimpleNamespace(name="noop", tokenizer_dir=None, eos_ids=()), b


def measure(tokens: int, vocab: int) -> float:
    from client.process import client_main
    from ipc import shm
    from ipc.peers import Peer
    from server.process import server_main
    name = shm.new_name(os.getpid())
    server = Peer("server", server_main, ({"factory": "bench.ipc_overhead:make_noop", "vocab": vocab,
                                           "shm": name, "slots": 4},)).start()
    client = Peer("client", client_main, ({"lazy": True},)).start()
    try:
        info = server.recv(0, 60)["result"]
        client.recv(0, 60)
        client.call("init", {"tokenizer_dir": None, "vocab_size": info["vocab_size"], "shm": name, "slots": 4})
        params = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
        r = server.call("kv_init", {"input_ids": [1, 2, 3]})["result"]
        T, tok = r["seq_len"], 65

        def one():
            nonlocal T
            r = server.call("replay_seq", {"session": 0, "seq_len": T, "token": tok}, watch=(client,))["result"]
            client.call("sample", {"slot": r["slot"], "step": r["step"], "params": params,
                                   "position": T}, watch=(server,))
            T += 1
        for _ in range(200):  # warm-up
            one()
        t0 = time.perf_counter()
        for _ in range(tokens):
            one()
        return (time.perf_counter() - t0) / tokens * 1e6
    finally:
        client.stop()
        server.stop()
        shm.unlink(name)


def _echo(req, rep):
    while True:
        m = req.get()
        if m is None:
            return
        rep.put(m)


def bare_round_trip(n: int) -> float:
    """The floor on this machine: one small message to a process and back (us)."""
    from ipc.peers import context
    ctx = context()
    req, rep = ctx.SimpleQueue(), ctx.SimpleQueue()
    p = ctx.Process(target=_echo, args=(req, rep), daemon=True)
    p.start()
    msg = {"id": 1, "op": "replay_seq", "args": {"session": 0, "seq_len": 5, "token": 7}}
    for _ in range(200):
        req.put(msg)
        rep.get()
    t0 = time.perf_counter()
    for _ in range(n):
        req.put(msg)
        rep.get()
    us = (time.perf_counter() - t0) / n * 1e6
    req.put(None)
    p.join(5)
    return us


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args(argv)
    us = measure(a.tokens, a.vocab)
    bare = bare_round_trip(a.tokens)
    print(f"IPC per token (replay_seq + logits through shared memory + client greedy sample + reply), "
          f"vocab {a.vocab}: {us:.1f} us/token over {a.tokens} tokens "
          f"({'within' if us <= 100 else 'ABOVE'} the 100 us target)")
    print(f"floor on this machine: 2 bare queue round trips = {2 * bare:.1f} us "
          f"(one round trip {bare:.1f} us); protocol overhead {us - 2 * bare:.1f} us/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
