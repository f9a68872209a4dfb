"""serve's slots: several KV sessions on the server, the scheduling of the requests over
them at batch 1, and the prompt cache (docs/serve.md "Scheduling", docs/decisions.md).

A slot is one KV session of the server and the token ids its KV holds. A request gets the
free slot whose held tokens share the longest prefix with its prompt, and only the rest of
the prompt is pre-filled (`kv_init {keep}`: llama.cpp's prompt cache). The worker thread
then runs the active slots:

- `rr` (the default): token by token, round robin: each active slot gets one decode step
  (`--rr-tokens`) in turn, so every stream advances and a new request waits one prefill, not the others'
  whole answers. A request alone runs one long decode loop, the CLI's fast path; a new
  request that finds a free slot ends it (CANCEL) at its next stream batch.
- `fcfs`: one request at a time to its end, the others wait in the queue.

Requests beyond the slots wait in a bounded first-come queue; beyond that, 429. A request
whose HTTP client went away (or whose stop string matched) stops within one step.
"""
from __future__ import annotations

import threading
import time
from collections import deque

from ipc.link import CANCEL, put_marker

from conductor.run import DEVICE_CHUNK, Generation

SCHEDULES = ("rr", "fcfs")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Slot:
    def __init__(self, session: int):
        self.session = session
        self.held: list[int] = []  # the token ids whose K/V the session holds, position 0 on
        self.gen: SlotGen | None = None
        self.used = 0.0            # when it last ended a generation (least recently used first)
        self.capturing = False     # background graph capture started for this session


class SlotGen(Generation):
    """One request's generation on a slot, run in turns: `start` pre-fills what the slot does
    not hold and samples the first token, each `turn` decodes up to n more tokens."""

    def __init__(self, procs, job, slot: Slot, device: bool):
        super().__init__(procs, job.req, job.on_text)
        self.job, self.slot, self.session = job, slot, slot.session
        self.device = device  # the server's sampler (--sampling device, no logprobs asked)
        self.client_args = {"session": slot.session}
        if job.logprobs is not None:
            self.client_args["logprobs"] = job.logprobs
        self.max_new = job.req.max_tokens
        self.T = 0             # the server's seq_len for the session
        self.tok = None        # the last sampled token, fed by the next turn
        self.refeed = False    # the last token was fed but its logits are gone (a loop ended early)
        self.cached = 0        # prompt tokens the slot already held
        self.yield_to = lambda: False  # the scheduler wants the slot's long loop to end

    @property
    def done(self) -> bool:
        return self.cancelled or len(self.tokens) >= self.max_new or (bool(self.tokens) and self.tokens[-1] in self.eos)

    def start(self) -> None:
        """Pre-fill what the slot lacks (at least the last prompt token: its logits give the
        first token), then the first token."""
        ids = self.prompt_ids
        keep = min(common_prefix(self.slot.held, ids), len(ids) - 1)
        self.slot.held = []  # from here on the session's content is this generation's
        self.cached, self.t0 = keep, time.perf_counter()
        self.prefill(ids, keep, first=True)
        self.t_first = self.t_decode = time.perf_counter()

    def prefill(self, ids: list[int], keep: int, first: bool = False) -> None:
        P = self.procs
        p = self.req.params
        rep = P.call(P.server, "kv_init", {"session": self.session, "input_ids": ids, "keep": keep,
                                           "sample": p.to_dict() if self.device else None},
                     label=f"prefill {len(ids) - keep}")
        self.T = rep["seq_len"]
        if first:  # the positions the server actually reused (it may pre-fill all again: plan_keep)
            self.job.stamp("prefilled", P.last_t)
            self.cached = rep.get("kept", keep)
        if self.device:
            tok = rep["token"]
            text = P.call(P.client, "detokenize", {"ids": [tok], "stream": True, "session": self.session,
                                                   "reset": first})["text"]
        else:
            c = P.call(P.client, "sample", {"slot": rep["slot"], "step": rep["step"], "params": p.to_dict(),
                                            "position": self.T - 1, "reset": first, **self.client_args})
            tok, text = c["token"], c["text"]
            self.logprobs.extend(c.get("logprobs", ()))
        if first:
            self.job.stamp("sampled", P.last_t)
        self.tok = tok
        self.emit([tok], text, time.perf_counter())

    def turn(self, n: int, eager: bool, spin: float | None = None) -> None:
        """Up to n tokens (fewer when the generation ends or the scheduler takes the slot back)."""
        n = min(n, self.max_new - len(self.tokens))
        if self.refeed:  # feed the last token again (the same step) to get its logits back
            self.refeed = False
            self.prefill(self.prompt_ids + self.tokens, self.T - 1)
            n -= 1
            if n <= 0 or self.done:
                return
        if self.device:
            P = self.procs
            rep = P.call(P.server, "kv_generate", {"session": self.session, "steps": n,
                         "sampling": self.req.params.to_dict(), "start_token": self.tok,
                         "stop_ids": sorted(self.eos)}, label=f"generate {n}")
            toks = rep["tokens"]
            text = P.call(P.client, "detokenize", {"ids": toks, "stream": True, "session": self.session})["text"]
            t_now, t_prev = time.perf_counter(), self.t_tok[-1]
            self.emit(toks, text, [t_prev + (t_now - t_prev) * (i + 1) / len(toks) for i in range(len(toks))])
            self.T, self.tok = rep["seq_len"], toks[-1]
            return
        self.cancel_sent = False
        self.tok, self.T = self.decode_loop(self.T, self.tok, eager, n, spin)
        # a loop ended by CANCEL: the server fed the last token before it read the end
        self.refeed = self.T == len(self.prompt_ids) + len(self.tokens) and not self.done

    def on_stream(self, item) -> None:
        super().on_stream(item)
        if not self.cancel_sent and self.loop is not None and self.yield_to():
            self.cancel_sent = True
            put_marker(self.procs.link.to_client, (self.loop, CANCEL))

    def end(self) -> None:
        """The slot keeps what its session holds (prompt + the tokens fed) for the next request."""
        self.stop_reason = ("eos" if self.tokens and self.tokens[-1] in self.eos else
                            "cancelled" if self.cancelled else "max_tokens")
        self.slot.held = (self.prompt_ids + self.tokens)[:self.T]


class Scheduler:
    """The slots, the bounded queue and the worker's loop over them. `run_job_start`,
    `finish_job` and `fail_job` are the engine's (conductor/serve.py): what a request's
    start, end and failure mean to its HTTP answer."""

    def __init__(self, n_slots: int, max_queue: int, schedule: str, quantum: int = 1):
        self.slots = [Slot(i) for i in range(n_slots)]
        self.max_queue, self.schedule = max_queue, schedule
        self.quantum = quantum  # tokens per turn in round robin (1: token by token)
        self.waiting: deque = deque()
        self.cond = threading.Condition()
        self.closing = False

    # -- the queue (HTTP threads)
    def offer(self, job) -> bool:
        """Queue a job; False when the queue is full."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                return False
            self.waiting.append(job)
            self.cond.notify()
            return True

    def withdraw(self, job) -> None:
        with self.cond:
            try:
                self.waiting.remove(job)
            except ValueError:
                pass

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    def active(self) -> list[Slot]:
        return [s for s in self.slots if s.gen is not None]

    def in_use(self) -> int:
        return len(self.active())

    # -- the worker
    def free_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.gen is None]

    def may_admit(self) -> bool:
        free = self.free_slots()
        return bool(free) and (self.schedule == "rr" or len(free) == len(self.slots))

    def pick(self, prompt: list[int]) -> Slot:
        """The free slot holding the longest prefix of the prompt; else the least recently used."""
        return max(self.free_slots(), key=lambda s: (common_prefix(s.held, prompt), -s.used))

    def next_jobs(self) -> list:
        """Wait for work; the queued jobs that may start now (empty: run the active slots)."""
        with self.cond:
            while not self.closing and not self.waiting and not self.active():
                self.cond.wait()
            if self.closing:
                return [None]
            out = []
            while self.waiting and len(out) < len(self.free_slots()) and (self.schedule == "rr" or (
                    not out and not self.active())):
                out.append(self.waiting.popleft())
            return out

    def wants_slot(self) -> bool:
        """A long loop ends early: rr, someone waits and a slot is free for them."""
        return self.schedule == "rr" and bool(self.waiting) and bool(self.free_slots())

    def run_round(self, eager: bool, on_done, on_error) -> None:
        """One round: each active slot decodes `quantum` tokens (round robin); a slot alone
        with no one to make room for decodes until it ends or someone arrives."""
        act = self.active()
        alone = len(act) == 1
        for s in act:
            g = s.gen
            try:
                if not g.done:
                    if alone:
                        g.yield_to = self.wants_slot
                        # the worker only takes the loop's stream batches (~10 ms apart) and the reply at its end:
                        # a spin there holds the GIL the event loop needs to write the stream (serve.md "Latency");
                        # short turns below keep the spin: their replies come within a few steps
                        g.turn(DEVICE_CHUNK if g.device else g.max_new, eager, spin=0.0)
                    else:
                        g.turn(self.quantum, eager)
                if g.done:
                    self.release(s, g)
                    on_done(g.job)
            except BaseException as e:  # noqa: BLE001
                self.release(s, g, ok=False)
                on_error(g.job, e)

    def release(self, s: Slot, g: SlotGen, ok: bool = True) -> None:
        if ok:
            g.end()
        else:
            s.held = []  # a failed step leaves the session's content unknown
        s.gen, s.used = None, time.monotonic()
