"""The conductor: a server + client pair started once, and generations run on it (docs/ipc.md).

`Processes` starts the server (model, KV cache, graphs) and the client (tokenizer, sampler)
as spawn processes and keeps them for as many generations as asked. `Generation` is one
prompt on that pair: tokenize -> kv_init -> sample -> [bg_capture_start -> wait_precapture]
-> one decode loop in which the server and the client pass steps and tokens straight to
each other while the client streams tokens here (--sampling client; `--ipc calls`: a
replay_seq + sample request pair per token instead) or kv_generate chunks (--sampling
device) -> stop. Its text goes to a callback (the CLI's stdout). `Run` is the CLI's
one-shot use: one pair, one generation, then outputs and clean-up (conductor/outputs.py).
"""
from __future__ import annotations

import itertools
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from case4_errors import BadInput
from case4_sampling import SamplingParams
from ipc import shm
from ipc.link import CANCEL, Link, put_marker
from ipc.messages import RemoteError
from ipc.peers import Peer, StallGuard, context, watch_link

from conductor.outputs import silence_stdout, write_outputs

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
DEVICE_CHUNK = 16  # tokens per kv_generate call in --sampling device (streaming granularity)
STARTUP_TIMEOUT_S = 1800.0  # first use prepares the built-in model; a dead child is seen at once
SLOTS = 4  # shared-memory logits slots between the server and the client


def log(msg: str) -> None:
    print(f"[case4] {msg}", file=sys.stderr, flush=True)


@dataclass
class ProcessOptions:
    """What the pair is started with: fixed for all its generations."""
    model: str = "smollm2"
    backend: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    graph_mode: str = "exact"
    gemm: str = "custom"
    seed: int = 0              # synthetic weights
    max_seq: int | None = None
    window: int = 8            # graphs captured ahead of the replay position
    precapture: int = 4        # graphs to wait for before decoding starts
    bg_capture: bool = True
    timeout: float = 300.0     # seconds any one request may take
    trace: bool = False        # keep request intervals for the Chrome trace
    sessions: int = 1          # KV sessions on the server (serve's slots)
    attn: str | None = None    # hf backend: attention implementation (None: sdpa)
    quant: str | None = None   # none | int8 | int4; None: none (a GGUF: its own blocks); hf: int8 = bitsandbytes
    group_size: int | None = None  # int4/int8 group; None: the mode's default
    force_flash: bool = False  # hf backend: decode attention through sdp_single_q


@dataclass
class Request:
    """One generation. prompt None and prompt_len None: the demo question (in chat mode
    when the model has a chat template)."""
    params: SamplingParams
    prompt: str | None = None
    prompt_len: int | None = None  # a seeded random prompt of N tokens (benchmarks)
    chat: bool = False
    max_tokens: int = 128
    sampling: str = "client"       # client | device
    ipc: str = "loop"              # loop | calls (--sampling client)
    ignore_eos: bool = False
    messages: list[dict] | None = None  # a chat conversation instead of prompt (conductor/serve.py)


class Processes:
    """The server and the client, started once; generations run on them one at a time."""

    def __init__(self, opts: ProcessOptions):
        self.opts = opts
        self.info: dict = {}   # the server's start reply (model, backend, vocab, context, ...)
        self.tinfo: dict = {}  # the client's init reply (eos ids, chat template)
        self.events: list[dict] = []  # trace intervals (server / client replies)
        self.last_t: tuple | None = None  # the last call's reply interval in the peer, us of its perf_counter
        self.shm_name = shm.new_name(os.getpid())
        from client.process import client_main
        from server.process import server_main
        o = opts
        sopts = {"model": o.model, "backend": o.backend, "dtype": o.dtype, "device": o.device,
                 "graph_mode": o.graph_mode, "gemm": o.gemm, "seed": o.seed, "max_seq": o.max_seq,
                 "shm": self.shm_name, "slots": SLOTS, "sessions": o.sessions,
                 "factory": os.environ.get("CASE4_SERVER_FACTORY"),
                 "attn": o.attn, "quant": o.quant, "group_size": o.group_size,
                 "force_flash": o.force_flash}
        self.link = Link(context())  # the decode loop's direct server <-> client channel
        self.loop_ids = itertools.count(1)
        self.server = Peer("server", server_main, ({**sopts, "link": self.link},))
        self.client = Peer("client", client_main, ({"link": self.link},))
        self.watch = {"server": (self.client,), "client": (self.server,)}

    def start(self) -> None:
        """Spawn both, wait for the model and the tokenizer (a dead child is seen at once)."""
        self.server.start()
        self.client.start()
        watch_link(self.link, (self.server, self.client))  # a death wakes the survivor
        log(f"server pid {self.server.pid}, client pid {self.client.pid}, shm {self.shm_name}")
        reply = self.server.recv(0, STARTUP_TIMEOUT_S, watch=(self.client,))
        if not reply["ok"]:
            raise RemoteError("server", "start", reply["error"])
        self.info = info = reply["result"]
        log(f"model {info['model']} loaded in {info['load_s']:.1f} s: backend {info['backend']}, "
            f"vocab {info['vocab_size']}, context {info['max_seq_len']}")
        reply = self.client.recv(0, STARTUP_TIMEOUT_S, watch=(self.server,))
        if not reply["ok"]:
            raise RemoteError("client", "start", reply["error"])
        self.tinfo = self.call(self.client, "init", {
            "tokenizer_dir": info["tokenizer_dir"], "vocab_size": info["vocab_size"],
            "shm": self.shm_name, "slots": SLOTS})

    def call(self, peer: Peer, op: str, args: dict | None = None, label: str | None = None) -> dict:
        """One request, its reply interval kept for the trace."""
        reply = peer.call(op, args, self.opts.timeout, watch=self.watch[peer.name])
        self.last_t = reply.get("t")  # the peer's (start, end) of the op, us (serve's first-token stages)
        if self.opts.trace and "t" in reply:
            t0, t1 = reply["t"]
            self.events.append({"name": label or op, "ph": "X", "ts": t0, "dur": max(t1 - t0, 0.01),
                                "pid": peer.name, "tid": "requests"})
        return reply["result"]

    def status(self) -> dict:
        """The server's status (graphs, device, its trace events with --trace)."""
        return self.server.call("status", {"trace": self.opts.trace}, timeout=30.0)["result"]

    def detokenize(self, ids: list[int]) -> str:
        return self.client.call("detokenize", {"ids": ids}, timeout=30.0)["result"]["text"]

    def close(self, clean: bool) -> None:
        """Stop both and unlink the shared memory. clean False (an interrupt or a failure): a
        child may be blocked in the decode loop, so the link is aborted first."""
        try:
            if not clean:
                self.link.abort()
            self.client.stop()
            self.server.stop()
            self.link.close()
        finally:
            shm.unlink(self.shm_name)


class Generation:
    """One request on a started pair. Its state (tokens, their times, the stop reason) is
    readable at any moment, so an interrupted generation still has its partial output."""

    def __init__(self, procs: Processes, req: Request, on_text: Callable[[str], None] | None = None):
        self.procs, self.req, self.on_text = procs, req, on_text
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.t_tok: list[float] = []     # perf_counter when each token was available
        self.prompt_ids: list[int] = []
        self.stop_reason = "error"
        self.graphs_note = ""
        self.eos = set() if req.ignore_eos else (set(procs.info["eos_ids"]) or set(procs.tinfo["eos_ids"]))
        self.prompt, self.chat = req.prompt, req.chat
        if req.prompt is None and req.prompt_len is None:  # the demo: chat when the model has a template
            self.prompt, self.chat = DEMO_PROMPT, req.chat or procs.tinfo["has_chat_template"]
        self.t0 = self.t_first = self.t_decode = None
        self.stall: StallGuard | None = None  # the running decode loop's
        self.cancelled = False  # cancel(): stop at the next token (serve: a stop string, a gone client)
        self.loop: int | None = None  # the decode loop running now, if any
        self.cancel_sent = False
        self.session = 0  # the KV session (serve: its slot's)
        self.client_args: dict = {}  # more arguments of the client's sample ops (serve: session, logprobs)
        self.logprobs: list = []  # per token, when client_args asks for them (client/process.py)

    def cancel(self) -> None:
        """Stop early, from the callback or another thread: the decode loop is asked to end
        (ipc/link.py CANCEL) at the next stream message; other paths stop before the next step."""
        self.cancelled = True

    @property
    def ok(self) -> bool:
        return self.stop_reason in ("eos", "max_tokens", "cancelled")

    def emit(self, token_ids, text: str, t) -> None:
        """Tokens and their text; t: when they were available (one time, or one per token)."""
        for tok, ti in zip(token_ids, t if isinstance(t, list) else [t] * len(token_ids)):
            self.tokens.append(int(tok))
            self.t_tok.append(ti)
        self.pieces.append(text)
        # tokens whose text is still empty (a byte token inside a UTF-8 character, or an id with no text) go on
        # too: a serve request that asked for logprobs streams them as they come (conductor/serve.py on_text)
        if token_ids and self.on_text is not None:
            self.on_text(text)

    def prompt_tokens(self) -> list[int]:
        r, info, ctx = self.req, self.procs.info, self.procs.info["max_seq_len"]
        if r.prompt_len is not None:
            if r.prompt_len >= ctx:
                raise BadInput(f"--prompt-len {r.prompt_len} does not fit the context of {ctx} tokens")
            rng = random.Random(r.params.seed)
            hi = 256 if info["tokenizer_dir"] is None else info["vocab_size"]
            bos = [info["bos_id"]] if info["bos_id"] is not None else []
            return (bos + [rng.randrange(hi) for _ in range(r.prompt_len)])[:r.prompt_len]
        ids = self.procs.call(self.procs.client, "tokenize", {
            "text": self.prompt or "", "chat": self.chat or r.messages is not None,
            "messages": r.messages, "max_len": ctx - 1})["ids"]
        if not ids:
            raise BadInput("the prompt is empty")
        return ids

    def run(self) -> None:
        r, p, P = self.req, self.req.params, self.procs
        t0 = time.perf_counter()
        ids = self.prompt_ids = self.prompt_ids or self.prompt_tokens()  # serve tokenizes first
        max_new = min(r.max_tokens, P.info["max_seq_len"] - len(ids))
        if max_new < r.max_tokens:
            log(f"--max-tokens {r.max_tokens} capped to {max_new} by the context")
        self.t0 = t0
        device = r.sampling == "device"
        if self.will_precapture():  # said before the answer starts streaming, not inside its first line
            log(f"pre-capturing {P.opts.precapture} graphs ...")
        rep = P.call(P.server, "kv_init", {"session": self.session, "input_ids": ids,
                                           "sample": p.to_dict() if device else None},
                     label=f"prefill {len(ids)}")
        T = rep["seq_len"]
        if device:
            tok = rep["token"]
            self.emit([tok], P.call(P.client, "detokenize", {"ids": [tok], "stream": True})["text"],
                      time.perf_counter())
        else:
            tok = self._sample(rep, T - 1)
        self.t_first = time.perf_counter()
        use_graphs = self.start_graphs()
        self.t_decode = time.perf_counter()
        while len(self.tokens) < max_new and tok not in self.eos and not self.cancelled:
            if device:
                steps = min(DEVICE_CHUNK, max_new - len(self.tokens))
                rep = P.call(P.server, "kv_generate", {"session": self.session, "steps": steps,
                             "sampling": p.to_dict(), "start_token": tok, "stop_ids": sorted(self.eos)},
                             label=f"generate {steps}")
                toks = rep["tokens"]
                text = P.call(P.client, "detokenize", {"ids": toks, "stream": True})["text"]
                # the chunk's tokens share its time: spread evenly since the previous token, so
                # per-token p50/p99 are chunk time / tokens (docs/ipc.md), not 0 and the chunk time
                t_now, t_prev = time.perf_counter(), self.t_tok[-1]
                self.emit(toks, text, [t_prev + (t_now - t_prev) * (i + 1) / len(toks) for i in range(len(toks))])
                T, tok = rep["seq_len"], toks[-1]
            elif r.ipc == "loop":
                tok, T = self.decode_loop(T, tok, not use_graphs, max_new - len(self.tokens))
            elif use_graphs:
                rep = P.call(P.server, "replay_seq", {"session": self.session, "seq_len": T, "token": tok},
                             label=f"replay T={T}")
                tok, T = self._sample(rep, T), T + 1
            else:
                rep = P.call(P.server, "kv_step", {"session": self.session, "token": tok}, label=f"step T={T}")
                tok, T = self._sample(rep, T), T + 1
        self.stop_reason = "eos" if tok in self.eos else "cancelled" if self.cancelled else "max_tokens"
        self.stop_graphs(use_graphs)

    def decode_loop(self, T: int, tok: int, eager: bool, n: int, spin: float | None = None) -> tuple[int, int]:
        """Up to n tokens in one decode_loop (server) + sample_loop (client) pair: per token
        the two children talk directly (ipc/link.py); this process only takes the client's
        stream messages, batched (STREAM_US), with the times the tokens were sampled. spin: how long
        each read of that stream spins before it sleeps (None: ipc/peers.py SPIN_S; serve's worker passes 0 for
        a long loop, conductor/serve_slots.py run_round)."""
        P = self.procs
        loop = self.loop = next(P.loop_ids)
        sid = P.server.send("decode_loop", {"session": self.session, "seq_len": T, "token": tok, "loop": loop,
                                            "eager": eager, "timeout_s": float(P.opts.timeout)})
        cid = P.client.send("sample_loop", {"loop": loop, "params": self.req.params.to_dict(), "position": T,
                                            "max_tokens": n, "stop_ids": sorted(self.eos),
                                            **self.client_args})
        # a stalled child (stopped, wedged) is named within seconds, not after --timeout (docs/ipc.md "Stalls")
        self.stall = StallGuard(P.server, P.client, P.link)
        try:
            crep = P.client.recv(cid, P.opts.timeout, (P.server,), on_stream=self.on_stream, stall=self.stall,
                                 spin=spin)
        finally:
            self.loop = None
        srep = P.server.recv(sid, P.opts.timeout, (P.client,), stall=self.stall)
        for peer, op, rep in ((P.server, "decode_loop", srep), (P.client, "sample_loop", crep)):
            if not rep["ok"]:  # the server's error first: the client's then only says the loop ended
                raise RemoteError(peer.name, op, rep["error"])
        if P.opts.trace:
            what = "step" if eager else "replay"
            P.events += [{"name": f"{what} T={T + i}", "ph": "X", "ts": t0, "dur": max(t1 - t0, 0.01),
                          "pid": "server", "tid": "requests"} for i, (t0, t1) in enumerate(srep["result"]["t"])]
        return self.tokens[-1], srep["result"]["seq_len"]

    def on_stream(self, item) -> None:
        toks, text, times = item[:3]  # times: (t0, t1) us of each token's sampling in the client
        if len(item) > 3:  # the tokens' logprobs, when asked
            self.logprobs.extend(item[3])
        self.emit(toks, text, [t1 / 1e6 for _, t1 in times])
        if self.stall is not None:
            self.stall.note([t1 for _, t1 in times])
        if self.cancelled and not self.cancel_sent and self.loop is not None:
            self.cancel_sent = True  # once: the client ends the loop and tells the server
            put_marker(self.procs.link.to_client, (self.loop, CANCEL))
        if self.procs.opts.trace:
            self.procs.events += [{"name": "sample", "ph": "X", "ts": t0, "dur": max(t1 - t0, 0.01),
                                   "pid": "client", "tid": "requests"} for t0, t1 in times]

    def _sample(self, r: dict, position: int) -> int:
        P = self.procs
        c = P.call(P.client, "sample", {"slot": r["slot"], "step": r["step"],
                                        "params": self.req.params.to_dict(), "position": position},
                   label="sample")
        self.emit([c["token"]], c["text"], time.perf_counter())
        return c["token"]

    def will_precapture(self) -> bool:
        """start_graphs will wait for pre-captured graphs (bg capture on a graph backend, --precapture > 0)."""
        P, o = self.procs, self.procs.opts
        return o.graph_mode != "none" and bool(P.info["graphs_available"]) and o.bg_capture and bool(o.precapture)

    def start_graphs(self) -> bool:
        P, o = self.procs, self.procs.opts
        if o.graph_mode == "none":
            self.graphs_note = "off (--graph-mode none)"
            return False
        if not P.info["graphs_available"]:
            self.graphs_note = (P.info["status"].get("graphs_note") if P.info["backend"] == "hf"
                                else f"unavailable on the {P.info['backend']} backend (eager steps)")
            return True  # replay_seq still works: it runs the step eagerly
        try:
            if o.bg_capture:
                P.call(P.server, "bg_capture_start", {"session": self.session, "window": o.window})
                if self.will_precapture():  # announced by run(), before the prefill
                    P.call(P.server, "wait_precapture", {"session": self.session, "count": o.precapture,
                                                         "timeout_s": float(o.timeout)})
            self.graphs_note = f"{o.graph_mode}, window {o.window}"
        except RemoteError as e:
            if e.type == "PrecaptureTimeout":  # decoding goes on: a graph not ready is a miss, not a hang
                log(f"pre-capture: {e.message}; decoding anyway")
                self.graphs_note = f"{o.graph_mode}, window {o.window} (pre-capture timed out)"
            elif e.type == "GraphsUnavailable":
                self.graphs_note = f"unavailable ({e.message}); eager steps"
            else:
                raise
        return True

    def stop_graphs(self, use_graphs: bool) -> None:
        P = self.procs
        if use_graphs and P.info.get("graphs_available") and P.opts.bg_capture:
            P.call(P.server, "bg_capture_stop", {})


# C0 controls but newline and tab, DEL and C1 controls -> \xNN, for text shown on a terminal:
# random weights produce NUL, ESC and the like, which a terminal would act on
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0, 32), *range(127, 160)) if chr(c) not in "\n\t"}


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it ends the run as Ctrl-C does."""


class StdoutClosed(Exception):
    """stdout's reader went away (`| head`): the run stops as after Ctrl-C, quietly."""


def _on_sigterm(signum, frame):
    raise Terminated()


class Run:
    """The CLI's one-shot use: start the pair, run one generation, write the outputs, stop.
    Exit codes of go(): 0 ok; 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 141 stdout
    closed: partial outputs and the summary are written in all three. Errors propagate
    (conductor/cli.py maps them)."""

    def __init__(self, opts: ProcessOptions, req: Request, out_dir: Path, run_name: str | None,
                 quiet: bool = False):
        self.opts, self.req, self.out_dir, self.run_name, self.quiet = opts, req, out_dir, run_name, quiet
        self.procs: Processes | None = None
        self.gen: Generation | None = None
        self.tty = not quiet and sys.stdout.isatty()  # the text files keep the raw text either way

    def write_text(self, text: str) -> None:
        if self.quiet:
            return
        try:
            sys.stdout.write(escape_controls(text) if self.tty else text)
            sys.stdout.flush()
        except BrokenPipeError:
            silence_stdout()
            raise StdoutClosed() from None

    def go(self) -> int:
        self.procs = Processes(self.opts)
        self.t_start = time.perf_counter()
        main_thread = threading.current_thread() is threading.main_thread()
        old_term = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            self.procs.start()
            self.gen = Generation(self.procs, self.req, self.write_text)
            self.gen.run()
            return 0
        except KeyboardInterrupt as e:
            term = isinstance(e, Terminated)
            self._stopped("terminated" if term else "interrupted")
            return 143 if term else 130
        except StdoutClosed:
            self._stopped("stdout closed")
            return 141
        finally:
            if main_thread:  # a second Ctrl-C or SIGTERM must not skip the clean-up
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                self.finish()
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, old_term)

    def _stopped(self, why: str) -> None:
        if self.gen is not None:
            self.gen.stop_reason = why
        log(why)

    def finish(self) -> None:
        """Status, outputs, then the children and the shared memory, whatever happened."""
        P, gen = self.procs, self.gen
        ok = gen is not None and gen.ok
        try:
            status = dict(P.info.get("status") or {})
            text = None
            # after an interrupt or a failure a reply pipe may hold half a message: no more requests
            if ok:
                status = P.status()
                text = P.detokenize(gen.tokens)
            if gen is not None and gen.tokens:
                write_outputs(gen, status, text, self.out_dir, self.run_name, self.t_start, self.quiet)
        finally:
            P.close(clean=ok)
