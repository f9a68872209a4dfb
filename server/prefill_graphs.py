"""CUDA graphs of the prompt forward (prefill) for the cuda backend.

The prefill runs the reference decoder's torch path in the model dtype (cuBLAS GEMMs + SDPA):
~55 small torch ops per layer, so an eager prefill is bound by the host (Python + launches,
~25 ms for 32 layers on the H100 machines, whatever the prompt length). Here it is captured
once per (session, bucket) and replayed: the host cost is one replay.

  * bucket: the prompt is padded with token 0 to the next power of two >= MIN_BUCKET (at most
    max_seq). A fresh prompt (start 0) is plain causal, so the padding rows never reach the real
    ones; they write KV rows n..bucket-1, which are past seq_len: decode writes row T before it
    reads it and never reads rows > T.
  * static inputs: the token ids [bucket] and the index of the last real row [1]; static output:
    that row's fp32 logits [1, V]. The session's KV slice is baked into the graph (one graph per
    session and bucket).
  * one memory pool for all the graphs (they never run at the same time; a graph's output is read
    right after its replay).
  * capture in thread-local mode; still, torch.cuda.graph synchronizes the device first, which is
    not permitted while the engine's background thread captures a decode graph, so the backend
    pauses that thread around a capture made here (CudaBackend.prefill).

Continuation prompts (start > 0) and prompts longer than max_seq's bucket run eagerly.
Serve's prompt cache runs a continuation only when that is the faster way (`recompute_cheaper`): start-up times
one replay of each bucket and one eager prefill (`replay_ms`, `eager_ms`); an eager continuation is bound by
the host, so a cached prefix of a prompt that a graph covers is usually pre-filled again whole, in its graph
(H100, 7B, 512-token prompt: graph 19-23 ms, eager continuation of 16 tokens 29-50 ms; docs/serve.md).
Kept apart from the model code (server/reference.py), as the decode graphs are
(custom_kernels/csrc/graphs.cpp).
"""
from __future__ import annotations

import torch

MIN_BUCKET = 16


class PrefillGraphs:
    def __init__(self, dec, max_seq: int):
        self.dec = dec                 # ReferenceDecoder in the model dtype (compute_dtype = dtype)
        self.max_seq = max_seq
        self.graphs: dict[tuple[int, int], tuple] = {}  # (session, bucket) -> (graph, tok, last, out)
        self.pool = None
        self.replays = 0
        self.replay_ms: dict[int, float] = {}  # bucket -> one replay's wall time (start-up, session 0)
        self.eager_ms: float | None = None     # one eager prefill of MIN_BUCKET tokens (start-up)

    def recompute_cheaper(self, session: int, n: int, new: int) -> bool:
        """Serve's prompt cache, a prompt of n tokens whose first n - new the session holds: True when the
        graph of the whole prompt is expected to beat the eager continuation of the new tokens. The eager
        path costs its host time (eager_ms, nearly constant) or, for long continuations, about the GPU time
        of its own bucket's graph, whichever is larger. Unmeasured (no timings yet, no graph for this
        session and bucket, or one new token: a decode step) -> False."""
        b = self.bucket(n)
        if new <= 1 or b is None or (session, b) not in self.graphs or self.eager_ms is None:
            return False
        full = self.replay_ms.get(b)
        part = self.replay_ms.get(self.bucket(new) or 0)
        if full is None:
            return False
        return full < max(self.eager_ms, part or 0.0)

    def bucket(self, n: int) -> int | None:
        b = max(MIN_BUCKET, 1 << max(0, n - 1).bit_length())
        return b if b <= self.max_seq else None

    def buckets(self, up_to: int) -> list[int]:
        """Every bucket that prompts of up to `up_to` tokens fill exactly (start-up captures)."""
        return [MIN_BUCKET << i for i in range(max(0, up_to // MIN_BUCKET).bit_length())]

    def ready(self, session: int, n: int) -> bool:
        """False when run(session, n tokens) would capture a graph first."""
        b = self.bucket(n)
        return b is None or (session, b) in self.graphs

    def _capture(self, session: int, b: int):
        dev = self.dec.w.arena.device
        tok = torch.zeros(b, dtype=torch.long, device=dev)
        last = torch.zeros(1, dtype=torch.long, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture (library handles, kernel choice)
            for _ in range(2):
                self.dec.forward_tokens(session, tok, 0, last=last)
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
            out = self.dec.forward_tokens(session, tok, 0, last=last)
        self.pool = g.pool()
        return g, tok, last, out

    def run(self, session: int, ids: list[int]) -> torch.Tensor | None:
        """fp32 logits [V] of the last position of prompt `ids` (checked by the caller) written
        into `session` from position 0, or None when no graph applies (run it eagerly)."""
        n = len(ids)
        b = self.bucket(n)
        if b is None:
            return None
        entry = self.graphs.get((session, b))
        if entry is None:
            entry = self.graphs[(session, b)] = self._capture(session, b)
        g, tok, last, out = entry
        host = torch.zeros(b, dtype=torch.long)
        host[:n] = torch.tensor(ids, dtype=torch.long)
        tok.copy_(host, non_blocking=False)
        last.fill_(n - 1)
        g.replay()
        self.replays += 1
        return out[0]

    def stats(self) -> dict:
        return {"prefill_graphs": len(self.graphs), "prefill_replays": self.replays}
