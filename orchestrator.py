"""Case4's CLI and the conductor of one generation (DESIGN §5).

    python orchestrator.py --model smollm2 --prompt "Hello" --max-tokens 64

Starts the server (model, KV cache, graphs) and the client (tokenizer, sampler) as spawn
processes, then: tokenize -> kv_init -> sample -> [bg_capture_start -> wait_precapture] ->
one decode loop in which the server and the client pass steps and tokens straight to each
other while the client streams tokens here (--sampling client; `--ipc calls`: a
replay_seq + sample request pair per token instead) or kv_generate chunks (--sampling
device) -> stream the text -> stop. Text goes to stdout; progress and the summary to stderr.
Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal failure (names the
process), 130 interrupted (partial outputs are written).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from case4_errors import BadInput
from case4_sampling import SamplingParams
from ipc.messages import RemoteError
from ipc.link import Link
from ipc.peers import Peer, PeerDied, PeerTimeout, context, watch_link
from ipc import shm

DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
DEVICE_CHUNK = 16  # tokens per kv_generate call in --sampling device (streaming granularity)
STARTUP_TIMEOUT_S = 1800.0  # first use prepares the built-in model; a dead child is seen at once

ENV_HELP = """environment defaults (a flag on the command line wins):
  CASE4_USE_CUSTOM=1       --backend cuda
  CASE4_DISABLE_EXT=1      --backend reference
  CASE4_KV_ONLY=1          --graph-mode none
  CASE4_BG_CAPTURE=0|1     --no-bg-capture / --bg-capture
  CASE4_SKIP_PRECAPTURE=1  --precapture 0
  CASE4_HOME               model cache (default ~/.cache/case4)

exit codes: 0 ok, 2 bad input, 1 internal failure, 130 interrupted (partial output kept)
"""


def _env(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else None


def build_parser() -> argparse.ArgumentParser:
    backend = "auto"
    if _env("CASE4_USE_CUSTOM") == "1":
        backend = "cuda"
    if _env("CASE4_DISABLE_EXT") == "1":
        backend = "reference"
    p = argparse.ArgumentParser(prog="case4", description="Case4: LLaMA-family inference, "
                                "server + client processes over multiprocessing queues.",
                                epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="smollm2", help="HF folder, hub id in the local cache, 'smollm2' "
      "(built-in, default) or synthetic:<shape>")
    a("--prompt", default=None, help=f"prompt text (default: a demo question in chat mode: {DEMO_PROMPT!r})")
    a("--prompt-len", type=int, default=None, metavar="N",
      help="instead of --prompt: a seeded random prompt of N tokens (benchmarks)")
    a("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    a("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a("--top-k", type=int, default=0, help="0 = off")
    a("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    a("--seed", type=int, default=0, help="sampling seed (and synthetic weights / random prompt)")
    a("--greedy", action="store_true", help="force greedy decoding (temperature 0)")
    a("--sampling", choices=("client", "device"), default="client",
      help="client: logits through shared memory to the client's sampler (default); "
           "device: the server samples (kv_generate)")
    a("--ipc", choices=("loop", "calls"), default="loop",
      help="--sampling client: loop: server and client exchange steps and tokens directly, "
           "the client streams the tokens here (default); calls: a replay_seq + sample request "
           "pair per token through this process (the protocol's per-token ops; slower)")
    a("--graph-mode", choices=("exact", "dynamic", "none"),
      default="none" if _env("CASE4_KV_ONLY") == "1" else "exact")
    a("--backend", choices=("auto", "cuda", "reference"), default=backend)
    a("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
      help="auto: float16 on a GPU, float32 on the CPU")
    a("--device", default="auto", help="auto | cpu | cuda[:N]")
    a("--gemm", choices=("custom", "cublas"), default="custom")
    a("--window", type=int, default=8, help="graphs captured ahead of the replay position")
    a("--precapture", type=int, default=0 if _env("CASE4_SKIP_PRECAPTURE") == "1" else 4,
      help="graphs to wait for before decoding starts")
    a("--bg-capture", action=argparse.BooleanOptionalAction,
      default=_env("CASE4_BG_CAPTURE") != "0", help="background graph capture (default on)")
    a("--max-seq", type=int, default=None, help="context to plan for (KV cache size)")
    a("--output-dir", default="output", help="where the outputs go (default ./output)")
    a("--run-name", default=None, help="prefix of the output files (default <model>-<time>)")
    a("--trace", action="store_true", help="also write a Chrome trace JSON and a PNG timeline")
    a("--timeout", type=float, default=300.0, help="seconds any one request may take")
    a("--quiet", action="store_true", help="no streamed text on stdout")
    a("--ignore-eos", action="store_true", help="generate exactly --max-tokens (benchmarks; as llama.cpp/vLLM)")
    return p


def check_args(args) -> SamplingParams:
    if args.max_tokens < 1:
        raise BadInput(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise BadInput(f"--prompt-len must be >= 1, got {args.prompt_len}")
    if args.window < 1 or args.precapture < 0:
        raise BadInput("--window must be >= 1 and --precapture >= 0")
    if args.precapture > args.window:  # asking for N graphs ahead implies a window of at least N
        args.window = args.precapture
    if args.max_seq is not None and args.max_seq < 2:
        raise BadInput(f"--max-seq must be >= 2, got {args.max_seq}")
    try:
        return SamplingParams(0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed)
    except BadInput as e:
        raise BadInput("--" + str(e).replace("_", "-")) from None


def _pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class Run:
    def __init__(self, args, params: SamplingParams):
        self.args, self.params = args, params
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.t_tok: list[float] = []     # perf_counter when each token was available
        self.events: list[dict] = []     # trace intervals (server / client replies)
        self.stop_reason = "error"
        self.info, self.status, self.prompt_ids = {}, {}, []
        self.graphs_note = ""
        self.text = None

    def log(self, msg: str) -> None:
        print(f"[case4] {msg}", file=sys.stderr, flush=True)

    # ---- calls with trace bookkeeping
    def call(self, peer: Peer, op: str, args: dict | None = None, label: str | None = None) -> dict:
        reply = peer.call(op, args, self.args.timeout, watch=self.watch[peer.name])
        if self.args.trace and "t" in reply:
            t0, t1 = reply["t"]
            self.events.append({"name": label or op, "ph": "X", "ts": t0, "dur": max(t1 - t0, 0.01),
                                "pid": peer.name, "tid": "requests"})
        return reply["result"]

    def emit(self, token_ids, text: str, t) -> None:
        """Tokens and their text; t: when they were available (one time, or one per token)."""
        for tok, ti in zip(token_ids, t if isinstance(t, list) else [t] * len(token_ids)):
            self.tokens.append(int(tok))
            self.t_tok.append(ti)
        self.pieces.append(text)
        if text and not self.args.quiet:
            sys.stdout.write(text)
            sys.stdout.flush()

    # ---- the whole run
    def go(self) -> int:
        a = self.args
        self.shm_name = shm.new_name(os.getpid())
        from client.process import client_main
        from server.process import server_main
        sopts = {"model": a.model, "backend": a.backend, "dtype": a.dtype, "device": a.device,
                 "graph_mode": a.graph_mode, "gemm": a.gemm, "seed": a.seed, "max_seq": a.max_seq,
                 "shm": self.shm_name, "slots": 4, "factory": os.environ.get("CASE4_SERVER_FACTORY")}
        self.link = Link(context())  # the decode loop's direct server <-> client channel
        self.loop_ids = itertools.count(1)
        self.server = Peer("server", server_main, ({**sopts, "link": self.link},))
        self.client = Peer("client", client_main, ({"link": self.link},))
        self.watch = {"server": (self.client,), "client": (self.server,)}
        self.t_start = time.perf_counter()
        try:
            self.server.start()
            self.client.start()
            watch_link(self.link, (self.server, self.client))  # a death wakes the survivor
            self.log(f"server pid {self.server.pid}, client pid {self.client.pid}, shm {self.shm_name}")
            self.start_up()
            self.generate()
            return 0
        except KeyboardInterrupt:
            self.stop_reason = "interrupted"
            self.log("interrupted")
            return 130
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
            self.finish()

    def start_up(self) -> None:
        a = self.args
        reply = self.server.recv(0, STARTUP_TIMEOUT_S, watch=(self.client,))
        if not reply["ok"]:
            raise RemoteError("server", "start", reply["error"])
        self.info = info = reply["result"]
        self.log(f"model {info['model']} loaded in {info['load_s']:.1f} s: backend {info['backend']}, "
                 f"vocab {info['vocab_size']}, context {info['max_seq_len']}")
        reply = self.client.recv(0, STARTUP_TIMEOUT_S, watch=(self.server,))
        if not reply["ok"]:
            raise RemoteError("client", "start", reply["error"])
        tinfo = self.call(self.client, "init", {
            "tokenizer_dir": info["tokenizer_dir"], "vocab_size": info["vocab_size"],
            "shm": self.shm_name, "slots": 4})
        self.eos = set() if a.ignore_eos else (set(info["eos_ids"]) or set(tinfo["eos_ids"]))
        if a.prompt is None and a.prompt_len is None:  # the demo: chat when the model has a template
            a.prompt, a.chat = DEMO_PROMPT, a.chat or tinfo["has_chat_template"]

    def prompt(self) -> list[int]:
        a, ctx = self.args, self.info["max_seq_len"]
        if a.prompt_len is not None:
            if a.prompt_len >= ctx:
                raise BadInput(f"--prompt-len {a.prompt_len} does not fit the context of {ctx} tokens")
            rng = random.Random(a.seed)
            hi = 256 if self.info["tokenizer_dir"] is None else self.info["vocab_size"]
            bos = [self.info["bos_id"]] if self.info["bos_id"] is not None else []
            return (bos + [rng.randrange(hi) for _ in range(a.prompt_len)])[:a.prompt_len]
        ids = self.call(self.client, "tokenize", {"text": a.prompt, "chat": a.chat,
                                                  "max_len": ctx - 1})["ids"]
        if not ids:
            raise BadInput("the prompt is empty")
        return ids

    def generate(self) -> None:
        a, p = self.args, self.params
        t0 = time.perf_counter()
        ids = self.prompt_ids = self.prompt()
        max_new = min(a.max_tokens, self.info["max_seq_len"] - len(ids))
        if max_new < a.max_tokens:
            self.log(f"--max-tokens {a.max_tokens} capped to {max_new} by the context")
        self.t0 = t0
        device = a.sampling == "device"
        r = self.call(self.server, "kv_init", {"session": 0, "input_ids": ids,
                                               "sample": p.to_dict() if device else None},
                      label=f"prefill {len(ids)}")
        T = r["seq_len"]
        if device:
            tok = r["token"]
            self.emit([tok], self.call(self.client, "detokenize", {"ids": [tok], "stream": True})["text"],
                      time.perf_counter())
        else:
            tok = self._sample(r, T - 1)
        self.t_first = time.perf_counter()
        use_graphs = self.start_graphs()
        self.t_decode = time.perf_counter()
        while len(self.tokens) < max_new and tok not in self.eos:
            if device:
                steps = min(DEVICE_CHUNK, max_new - len(self.tokens))
                r = self.call(self.server, "kv_generate", {"session": 0, "steps": steps,
                              "sampling": p.to_dict(), "start_token": tok, "stop_ids": sorted(self.eos)},
                              label=f"generate {steps}")
                toks = r["tokens"]
                text = self.call(self.client, "detokenize", {"ids": toks, "stream": True})["text"]
                # the chunk's tokens share its time: spread evenly since the previous token, so
                # per-token p50/p99 are chunk time / tokens (docs/ipc.md), not 0 and the chunk time
                t_now, t_prev = time.perf_counter(), self.t_tok[-1]
                self.emit(toks, text, [t_prev + (t_now - t_prev) * (i + 1) / len(toks) for i in range(len(toks))])
                T, tok = r["seq_len"], toks[-1]
            elif a.ipc == "loop":
                tok, T = self.decode_loop(T, tok, not use_graphs, max_new - len(self.tokens))
            elif use_graphs:
                r = self.call(self.server, "replay_seq", {"session": 0, "seq_len": T, "token": tok},
                              label=f"replay T={T}")
                tok, T = self._sample(r, T), T + 1
            else:
                r = self.call(self.server, "kv_step", {"session": 0, "token": tok}, label=f"step T={T}")
                tok, T = self._sample(r, T), T + 1
        self.stop_reason = "eos" if tok in self.eos else "max_tokens"
        self.stop_graphs(use_graphs)

    def decode_loop(self, T: int, tok: int, eager: bool, n: int) -> tuple[int, int]:
        """Up to n tokens in one decode_loop (server) + sample_loop (client) pair: per token
        the two children talk directly (ipc/link.py); this process only takes the client's
        stream messages, batched (STREAM_US), with the times the tokens were sampled."""
        loop = next(self.loop_ids)
        sid = self.server.send("decode_loop", {"session": 0, "seq_len": T, "token": tok, "loop": loop,
                                               "eager": eager})
        cid = self.client.send("sample_loop", {"loop": loop, "params": self.params.to_dict(), "position": T,
                                               "max_tokens": n, "stop_ids": sorted(self.eos)})
        crep = self.client.recv(cid, self.args.timeout, (self.server,), on_stream=self.on_stream)
        srep = self.server.recv(sid, self.args.timeout, (self.client,))
        for peer, op, rep in ((self.server, "decode_loop", srep), (self.client, "sample_loop", crep)):
            if not rep["ok"]:  # the server's error first: the client's then only says the loop ended
                raise RemoteError(peer.name, op, rep["error"])
        if self.args.trace:
            what = "step" if eager else "replay"
            self.events += [{"name": f"{what} T={T + i}", "ph": "X", "ts": t0, "dur": max(t1 - t0, 0.01),
                             "pid": "server", "tid": "requests"} for i, (t0, t1) in enumerate(srep["result"]["t"])]
        return self.tokens[-1], srep["result"]["seq_len"]

    def on_stream(self, item) -> None:
        toks, text, times = item  # times: (t0, t1) us of each token's sampling in the client
        self.emit(toks, text, [t1 / 1e6 for _, t1 in times])
        if self.args.trace:
            self.events += [{"name": "sample", "ph": "X", "ts": t0, "dur": max(t1 - t0, 0.01),
                             "pid": "client", "tid": "requests"} for t0, t1 in times]

    def _sample(self, r: dict, position: int) -> int:
        c = self.call(self.client, "sample", {"slot": r["slot"], "step": r["step"],
                                              "params": self.params.to_dict(), "position": position},
                      label="sample")
        self.emit([c["token"]], c["text"], time.perf_counter())
        return c["token"]

    def start_graphs(self) -> bool:
        a = self.args
        if a.graph_mode == "none":
            self.graphs_note = "off (--graph-mode none)"
            return False
        if not self.info["graphs_available"]:
            self.graphs_note = f"unavailable on the {self.info['backend']} backend (eager steps)"
            return True  # replay_seq still works: it runs the step eagerly
        try:
            if a.bg_capture:
                self.call(self.server, "bg_capture_start", {"session": 0, "window": a.window})
                if a.precapture:
                    self.log(f"pre-capturing {a.precapture} graphs ...")
                    self.call(self.server, "wait_precapture", {"session": 0, "count": a.precapture,
                                                               "timeout_s": float(a.timeout)})
            self.graphs_note = f"{a.graph_mode}, window {a.window}"
        except RemoteError as e:
            if e.type == "PrecaptureTimeout":  # decoding goes on: a graph not ready is a miss, not a hang
                self.log(f"pre-capture: {e.message}; decoding anyway")
                self.graphs_note = f"{a.graph_mode}, window {a.window} (pre-capture timed out)"
            elif e.type == "GraphsUnavailable":
                self.graphs_note = f"unavailable ({e.message}); eager steps"
            else:
                raise
        return True

    def stop_graphs(self, use_graphs: bool) -> None:
        if use_graphs and self.info.get("graphs_available") and self.args.bg_capture:
            self.call(self.server, "bg_capture_stop", {})

    # ---- the end: status, outputs, children, shared memory
    def finish(self) -> None:
        try:
            self.status = dict(self.info.get("status") or {})
            # after an interrupt or a failure a reply pipe may hold half a message: no more requests
            if self.stop_reason in ("eos", "max_tokens"):
                self.status = self.server.call("status", {"trace": self.args.trace}, timeout=30.0)["result"]
                self.text = self.client.call("detokenize", {"ids": self.tokens}, timeout=30.0)["result"]["text"]
            if self.tokens:
                self.write_outputs()
        finally:
            if self.stop_reason not in ("eos", "max_tokens"):
                self.link.abort()  # a child may be blocked in the decode loop
            self.client.stop()
            self.server.stop()
            self.link.close()
            shm.unlink(self.shm_name)

    def metrics(self) -> dict:
        a, n = self.args, len(self.tokens)
        gaps = [(t1 - t0) * 1e3 for t0, t1 in zip(self.t_tok, self.t_tok[1:])]
        decode_s = self.t_tok[-1] - self.t_tok[0] if n > 1 else 0.0
        g = self.status.get("graphs") or {}
        return {
            "model": self.info.get("model", a.model), "model_dir": self.info.get("tokenizer_dir"),
            "backend": self.info.get("backend"), "device": self.status.get("device"),
            "dtype": self.status.get("dtype"), "graph_mode": a.graph_mode, "graphs": self.graphs_note,
            "sampling": a.sampling, "params": self.params.to_dict(), "chat": bool(a.chat),
            "eos_ids": sorted(getattr(self, "eos", ())), "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": n, "stop_reason": self.stop_reason,
            "load_s": self.info.get("load_s"),
            "ttft_ms": (self.t_tok[0] - self.t0) * 1e3 if n else None,
            "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else None,
            "p50_ms": _pct(gaps, 50), "p99_ms": _pct(gaps, 99),
            "graphs_captured": g.get("captured"), "graph_misses": g.get("misses"),
            "capture_ms_p50": g.get("capture_ms_p50"), "capture_ms_p99": g.get("capture_ms_p99"),
            "total_s": time.perf_counter() - self.t_start, "server_status": self.status,
        }

    def write_outputs(self) -> None:
        a = self.args
        m = self.metrics()
        m["server_status"] = {k: v for k, v in self.status.items() if k != "trace_events"}
        text = self.text if self.text is not None else "".join(self.pieces)
        name = a.run_name or f"{a.model.replace('/', '_').replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
        out = Path(a.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}_tokens.txt").write_text(" ".join(map(str, self.tokens)) + "\n")
        (out / f"{name}_text.txt").write_text(text)
        (out / f"{name}_metrics.json").write_text(json.dumps(m, indent=2, default=str) + "\n")
        row = {"run_name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": m["model"],
               "backend": m["backend"], "graph_mode": a.graph_mode, "sampling": a.sampling,
               "prompt_tokens": m["prompt_tokens"], "new_tokens": m["generated_tokens"],
               "ttft_ms": m["ttft_ms"], "decode_tok_s": m["decode_tok_s"], "p50_ms": m["p50_ms"],
               "p99_ms": m["p99_ms"], "graphs_captured": m["graphs_captured"],
               "graph_misses": m["graph_misses"], "stop_reason": m["stop_reason"]}
        csv_path = out / "generate.csv"
        new = not csv_path.exists()
        with csv_path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
        written = [f"{name}_tokens.txt", f"{name}_text.txt", f"{name}_metrics.json", "generate.csv"]
        if a.trace:
            written += write_trace(out / f"{name}_trace", self.events + self.status.get("trace_events", []))
        self.summary(m, out, written)

    def summary(self, m: dict, out: Path, written: list[str]) -> None:
        f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
        lines = [
            "",
            f"--- case4: {m['model']} | {m['backend']} backend on {m['device']}, {m['dtype']} | graphs: {m['graphs']}",
            f"prompt {m['prompt_tokens']} tokens, generated {m['generated_tokens']} (stop: {m['stop_reason']}), "
            f"sampling {m['sampling']}",
            f"TTFT {f(m['ttft_ms'], '.1f')} ms | decode {f(m['decode_tok_s'], '.1f')} tok/s | "
            f"per token p50 {f(m['p50_ms'], '.2f')} ms, p99 {f(m['p99_ms'], '.2f')} ms",
        ]
        if m["graphs_captured"] is not None:
            lines.append(f"graphs captured {m['graphs_captured']}, misses {m['graph_misses']}, capture ms "
                         f"p50 {f(m['capture_ms_p50'], '.2f')} p99 {f(m['capture_ms_p99'], '.2f')}")
        lines.append(f"outputs in {out}/: {', '.join(written)}")
        if not self.args.quiet:
            print(flush=True)
        print("\n".join(lines), file=sys.stderr, flush=True)


# ---- trace: Chrome-trace JSON (open in Perfetto / chrome://tracing) + a PNG timeline

PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray")  # red = capture


def write_trace(base: Path, events: list[dict]) -> list[str]:
    """Write base.json and base.png from "X" events whose pid/tid may be names; the
    backend's own events (Backend.trace_events(), e.g. capture intervals per stream) are
    merged in by the server's status op. ts/dur are microseconds of time.perf_counter()."""
    events = [e for e in events if e.get("ph", "X") == "X" and "ts" in e]
    pids, tids, out = {}, {}, []
    for e in events:
        pid = pids.setdefault(str(e.get("pid", "server")), len(pids) + 1)
        tid = tids.setdefault((pid, str(e.get("tid", "main"))), len(tids) + 1)
        out.append({**e, "ph": "X", "pid": pid, "tid": tid, "dur": e.get("dur", 0)})
    t_min = min((e["ts"] for e in out), default=0)
    for e in out:
        e["ts"] -= t_min
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": n}} for n, pid in pids.items()]
    meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": n}}
             for (pid, n), tid in tids.items()]
    Path(f"{base}.json").write_text(json.dumps({"traceEvents": meta + out, "displayTimeUnit": "ms"}))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [Path(f"{base}.json").name]
    names = {pid: n for n, pid in pids.items()}
    tracks = sorted(tids.items(), key=lambda kv: kv[1])
    labels = [f"{names[pid]} / {t}" for (pid, t), _ in tracks]
    # second panel: a zoom on ~8 tokens around a capture in the middle of the run, where
    # individual capture intervals can be seen against the replays they overlap
    cap = sorted(e["ts"] for e in out if "captur" in labels[[t for _, t in tracks].index(e["tid"])].lower())
    rep = sorted(e["ts"] for e in out if labels[[t for _, t in tracks].index(e["tid"])].endswith("/ replay"))
    zoom = None
    if cap and len(rep) > 2:
        gaps = sorted(b - a for a, b in zip(rep, rep[1:]))
        width = 8 * max(gaps[len(gaps) // 2], 1.0)
        mid = cap[len(cap) // 2]
        zoom = ((mid - width / 2) / 1e3, (mid + width / 2) / 1e3)
    fig, axes = plt.subplots(2 if zoom else 1, 1, figsize=(12, (1 + 0.6 * len(tracks)) * (2 if zoom else 1)),
                             squeeze=False)
    for ax, window in zip(axes[:, 0], (None, zoom)):
        for row, ((pid, tname), tid) in enumerate(tracks):
            bars = [(e["ts"] / 1e3, max(e["dur"] / 1e3, 0.001)) for e in out if e["tid"] == tid]
            color = "tab:red" if "captur" in tname.lower() else PALETTE[row % len(PALETTE)]
            ax.broken_barh(bars, (row - 0.35, 0.7), color=color)
        ax.set_yticks(range(len(tracks)), labels)
        ax.set_xlabel("ms since the first event")
        if window:
            ax.set_xlim(*window)
            ax.set_title("zoom: ~8 tokens around a capture in the middle of the run")
        else:
            ax.set_title("Case4 timeline: capture vs replay intervals per process / stream")
    fig.tight_layout()
    fig.savefig(f"{base}.png", dpi=100)
    plt.close(fig)
    return [Path(f"{base}.json").name, Path(f"{base}.png").name]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return Run(args, check_args(args)).go()
    except BadInput as e:
        print(f"case4: error: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:
        if e.bad_input:
            print(f"case4: error: {e.message}", file=sys.stderr)
            return 2
        print(f"case4: internal failure in the {e.peer} process: {e.op}: {e.type}: {e.message}",
              file=sys.stderr)
        return 1
    except (PeerDied, PeerTimeout) as e:
        print(f"case4: internal failure: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"case4: internal failure in the orchestrator process: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
