"""The graph-generator server process: loads the model once, then serves the ops of
docs/ipc.md over its request queue until `stop` (or until its parent dies).

Start-up: the first message on the reply queue is the reply to request id 0: the model's
facts (vocab, context, eos ids, tokenizer folder, backend) or the load error (a BadInput
such as a missing model folder becomes exit code 2 in the orchestrator).

Logits never travel through the queue: they are written to the shared-memory ring
(ipc/shm.py) and the reply carries {slot, step}. In the decode loop (`decode_loop`, the
path of --sampling client) the server and the client hand steps and tokens to each other
over a direct link (ipc/link.py) and the orchestrator is off the per-token path.
"""
from __future__ import annotations

import importlib
import math
import time

from case4_errors import BadInput
from case4_sampling import SamplingParams
from ipc.link import ABORT
from ipc.messages import SERVER_ALIASES, SERVER_OPS, error_reply, now_us, ok_reply
from ipc.peers import LOOP_SPIN_S, PeerTimeout, child_setup, progress, serve, spin_get
from ipc.shm import LogitsChannel


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(opts: dict):
    """(model, backend) for the server options; opts["factory"] = "module:function" overrides."""
    if opts.get("factory"):
        mod, fn = opts["factory"].split(":")
        return getattr(importlib.import_module(mod), fn)(opts)
    from server.backends import load_backend
    device = _resolve_device(opts.get("device", "auto"))
    dtype = opts.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return load_backend(opts, device, dtype)


class Server:
    def __init__(self, model, backend, channel: LogitsChannel, link=None):
        self.model, self.backend, self.channel, self.link = model, backend, channel, link
        self.cfg = backend.cfg
        self.step = 0  # shared-memory step counter (every logits write gets the next one)
        self.legacy_ids: dict[int, list[int]] = {}  # session -> the ids its last `generate` fed

    def _logits_reply(self, session: int, logits, params: SamplingParams | None) -> dict:
        step = self.step
        self.step += 1
        out = {"slot": self.channel.write(step, logits), "step": step,
               "seq_len": self.backend.seq_len(session)}
        if params is not None:  # device sampling of this one token: the backend's sampler
            out["token"] = self.backend.sample(session, params, out["seq_len"] - 1)
        return out

    def decode_loop(self, a: dict) -> dict:
        """Step, put the logits in the ring, hand (loop, step) to the client, wait for its
        token, step again; until the client sends (loop, None) or the orchestrator ABORT."""
        if self.link is None:
            raise BadInput("decode_loop: this server has no link to a client")
        wait_s = float(a["timeout_s"])
        if not (wait_s > 0 and math.isfinite(wait_s)):
            raise BadInput(f"decode_loop: timeout_s must be a positive number of seconds, got {wait_s:g}")
        b, s, loop, eager, T, tok = self.backend, a["session"], a["loop"], a["eager"], a["seq_len"], a["token"]
        inbox, put, write = self.link.to_server, self.link.to_client.put, self.channel.write

        def next_msg():  # the client's answer; one that never comes ends the loop (no wedged server)
            try:
                return spin_get(inbox, LOOP_SPIN_S, wait_s)
            except TimeoutError:
                raise PeerTimeout(f"decode_loop: no token from the client in {wait_s:g} s "
                                  f"(after step {len(times)})") from None

        times = []  # (t0, t1) us of each step, for the trace
        try:
            while True:
                t0 = now_us()
                logits = b.step(s, tok) if eager else b.replay(s, T, tok)
                step = self.step
                self.step += 1
                write(step, logits)
                put((loop, step))
                times.append((t0, now_us()))
                T += 1
                msg = next_msg()
                while msg != ABORT and msg[0] != loop:  # left over from an earlier loop
                    msg = next_msg()
                if msg == ABORT or msg[1] is None:
                    break
                tok = msg[1]
        except Exception:
            put((loop, None))  # the client waits for this step: the loop is over (our reply says why)
            raise
        return {"steps": len(times), "seq_len": b.seq_len(s), "aborted": msg == ABORT, "t": times}

    # -- the seed's graph-mode RPCs (README "Seed compatibility")
    def generate(self, a: dict) -> dict:
        """`generate {seq_len, input_ids}`: the logits of the last of input_ids (in the ring).
        One step when the session holds input_ids[:-1] from the previous generate, else a prefill."""
        b, s, T, ids = self.backend, a["session"], a["seq_len"], a["input_ids"]
        if len(ids) != T:
            raise BadInput(f"generate: seq_len {T} must equal len(input_ids) = {len(ids)}")
        prev = self.legacy_ids.get(s)
        if T >= 2 and prev is not None and prev == ids[:-1] and b.seq_len(s) == T - 1:
            logits, path = b.replay(s, T - 1, ids[-1]), "step"
        else:
            logits, path = b.prefill(s, ids), "prefill"
        self.legacy_ids[s] = list(ids)
        return {**self._logits_reply(s, logits, None), "path": path}

    def prep_next(self, a: dict) -> dict:
        """`prep_next {prev_seq_len, next_seq_len}`: graphs ready for the positions in between."""
        b, s, prev, nxt = self.backend, a["session"], a["prev_seq_len"], a["next_seq_len"]
        cur = b.seq_len(s)
        if prev != cur:
            raise BadInput(f"prep_next: prev_seq_len {prev} does not match session {s}'s position {cur}")
        if not prev < nxt <= self.cfg.max_seq_len:
            raise BadInput(f"prep_next: next_seq_len must be in ({prev}, {self.cfg.max_seq_len}], got {nxt}")
        mode = getattr(b, "graph_mode", None)
        if not getattr(b, "supports_graphs", False) or mode != "exact":
            why = (f"graph mode {mode}: one graph serves every length" if getattr(b, "supports_graphs", False)
                   else f"the {b.name} backend has no per-length graphs")
            return {"ok": True, "captured": 0, "note": f"nothing to prepare ({why})"}
        n = nxt - prev  # the capture thread captures `window` ahead and deletes graphs behind the position
        window = max(n, getattr(b, "bg_windows", {}).get(s, 0))
        b.bg_capture_start(s, window)
        stats = b.wait_precapture(s, n, float(a["timeout_s"])) or {}
        return {"ok": True, "captured": n, "window": window, "note": f"graphs for seq_len {prev}..{nxt - 1} ready",
                "graphs": stats}

    # -- ops
    def handle(self, op: str, a: dict) -> dict:
        b = self.backend
        if op in ("kv_init", "replay_seq", "kv_step", "kv_generate", "decode_loop"):
            self.legacy_ids.pop(a["session"], None)  # the session no longer holds what generate fed
        if op == "generate":
            return self.generate(a)
        if op == "prep_next":
            return self.prep_next(a)
        if op in ("replay_seq", "kv_step", "kv_generate", "decode_loop") and b.seq_len(a["session"]) == 0:
            # a prefill leaves seq_len >= 1: at 0 these would decode from position 0 with no prompt
            raise BadInput(f"{op}: session {a['session']} has no prompt yet (send kv_init first)")
        if op in ("kv_init", "replay_seq", "kv_step"):
            # params are checked before the backend steps; it validates session, prompt and token ids
            s = a["session"]
            params = None if a["sample"] is None else SamplingParams.from_dict(a["sample"])
            kept = None
            if op == "kv_init":
                # serve's prompt cache: the session already holds input_ids[:keep]; the backend may
                # pre-fill the whole prompt instead where that is faster (plan_keep); "kept" says which
                kept = b.plan_keep(s, a["input_ids"], a["keep"]) if a["keep"] else 0
                if kept:
                    logits = b.prefill_from(s, a["input_ids"], kept)
                else:
                    logits = b.prefill(s, a["input_ids"])
            elif op == "replay_seq":
                logits = b.replay(s, a["seq_len"], a["token"])
            else:
                logits = b.step(s, a["token"])
            out = self._logits_reply(s, logits, params)
            if kept is not None:
                out["kept"] = kept
            return out
        if op == "kv_generate":
            s, steps = a["session"], a["steps"]
            if steps < 1:
                raise BadInput(f"kv_generate: steps must be >= 1, got {steps}")
            room = self.cfg.max_seq_len - b.seq_len(s)
            if steps > room:
                raise BadInput(f"kv_generate: {steps} steps do not fit the {room} positions left")
            params = SamplingParams.from_dict(a["sampling"])
            t0 = time.perf_counter()
            tokens = b.generate(s, a["start_token"], steps, params, tuple(a["stop_ids"]))
            return {"tokens": [int(t) for t in tokens], "elapsed_ms": (time.perf_counter() - t0) * 1e3,
                    "seq_len": b.seq_len(s)}
        if op == "decode_loop":
            return self.decode_loop(a)
        if op == "bg_capture_start":
            return b.bg_capture_start(a["session"], a["window"]) or {}
        if op == "wait_precapture":
            return b.wait_precapture(a["session"], a["count"], float(a["timeout_s"])) or {}
        if op == "bg_capture_stop":
            return b.bg_capture_stop() or {}
        if op == "status":
            st = dict(b.status())
            st.setdefault("backend", b.name)
            st["graphs_available"] = bool(getattr(b, "supports_graphs", False))
            st["step"] = self.step
            if a["trace"]:
                # the backend's own intervals (capture / replay streams) live in this process
                st["trace_events"] = [{**e, "pid": e["pid"] if isinstance(e.get("pid"), str) else "server"}
                                      for e in getattr(b, "trace_events", lambda: [])()]
            return st
        if op == "stop":
            return {}
        raise BadInput(f"op {op!r} is not implemented")  # unreachable: validate() knows the ops


def server_main(req, rep, opts: dict) -> None:
    child_setup()
    t0 = now_us()
    try:
        progress(rep, f"loading {opts.get('model')} ...")
        from custom_kernels import ext  # a first-use build reports through the start-up wait
        ext.set_progress(lambda text: progress(rep, text))
        model, backend = load(opts)
        channel = LogitsChannel(opts["shm"], opts.get("slots", 4), backend.cfg.vocab_size, create=True)
    except Exception as e:
        rep.put(error_reply(0, e))
        return
    cfg = backend.cfg
    tok_dir = getattr(model, "tokenizer_dir", None)
    info = {"model": getattr(model, "name", opts.get("model")), "backend": backend.name,
            "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len,
            "eos_ids": [int(i) for i in getattr(model, "eos_ids", cfg.eos_token_ids)],
            "bos_id": cfg.bos_token_id, "tokenizer_dir": str(tok_dir) if tok_dir else None,
            "graphs_available": bool(getattr(backend, "supports_graphs", False)),
            "status": backend.status(), "load_s": (now_us() - t0) / 1e6}
    rep.put(ok_reply(0, info, t0, now_us()))
    try:
        serve(req, rep, SERVER_OPS, Server(model, backend, channel, opts.get("link")).handle, SERVER_ALIASES)
    finally:
        backend.close()
        channel.close()
