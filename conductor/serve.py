"""`case4 serve`: an OpenAI-compatible HTTP front end in the orchestrator process (docs/serve.md).

The server + client pair (conductor/run.py `Processes`) starts once, with one KV session
per slot; each HTTP request becomes one generation on a slot. One worker thread schedules
them (conductor/serve_slots.py: round robin token by token, or first come; a bounded queue
beyond the slots, then 429; the prompt cache). The worker hands each request's events —
start (prompt tokens), text (+ logprobs), end, error — to the request's asyncio queue; the
handler turns them into a JSON answer or server-sent events. Stop strings are matched here across token
boundaries and never emitted; a match, or a client that goes away, cancels the generation
(ipc/link.py CANCEL). A dead server or client process makes every later request a 503 and
/health names it.
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (local pydantic models)

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Literal

from case4_errors import BadInput
from case4_sampling import SamplingParams
from ipc.messages import RemoteError
from ipc.peers import PeerDied, PeerTimeout

from conductor.run import Processes, Request, log
from conductor.serve_slots import SCHEDULES, Scheduler, SlotGen

MAX_STOPS = 4
MAX_LOGPROBS = 20
DISCONNECT_POLL_S = 0.5  # how often a queued request checks that its HTTP client is still there
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# CASE4_SERVE_STAGES=FILE: each streamed request's way to its first token, stage by stage, appended to FILE as
# one JSON line (bench/serve_load.py reads it; docs/serve.md "Latency"). Times are seconds of perf_counter
# (CLOCK_MONOTONIC, the same clock in every process here and in a client on the host). Read once; when unset
# a stamp is one test and no ASGI wrapper is installed.
STAGES_FILE = os.environ.get("CASE4_SERVE_STAGES") or None


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- stop strings

class StopText:
    """Text out of a stream with the stop strings cut: a suffix that may begin a stop string
    is held back until the next text decides it, so a stop split over tokens is still found
    and no part of it is emitted."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.matched = [s for s in stops if s], "", False

    def feed(self, text: str) -> str:
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self.held = True, ""
            return buf[:min(hits)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


# -- metrics (Prometheus text format)

class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum, self.n = self.sum + v, self.n + 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def text(self, name: str) -> list[str]:
        out = [f"# TYPE {name} histogram"]
        out += [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (endpoint, status) -> count
        self.tokens_in = self.tokens_out = 0
        self.ttft, self.itl = Histogram(TTFT_BUCKETS), Histogram(ITL_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            k = (endpoint, str(status))
            self.requests[k] = self.requests.get(k, 0) + 1

    def generation(self, n_in: int, n_out: int, ttft: float | None, itls: list[float]) -> None:
        with self.lock:
            self.tokens_in, self.tokens_out = self.tokens_in + n_in, self.tokens_out + n_out
            if ttft is not None:
                self.ttft.observe(ttft)
            for d in itls:
                self.itl.observe(d)

    def text(self, queue_depth: int, running: int, slots: int = 1, cached: int = 0,
             graphs: dict | None = None) -> str:
        g = graphs or {}  # the server's graph counters after the last generation (none: reference, hf eager)
        with self.lock:
            out = ["# TYPE case4_requests_total counter"]
            out += [f'case4_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            out += ["# TYPE case4_prompt_tokens_total counter", f"case4_prompt_tokens_total {self.tokens_in}",
                    "# TYPE case4_generation_tokens_total counter", f"case4_generation_tokens_total {self.tokens_out}",
                    "# TYPE case4_queue_depth gauge", f"case4_queue_depth {queue_depth}",
                    "# TYPE case4_requests_running gauge", f"case4_requests_running {running}",
                    "# TYPE case4_kv_slots gauge", f"case4_kv_slots {slots}",
                    "# TYPE case4_kv_slots_in_use gauge", f"case4_kv_slots_in_use {running}",
                    "# TYPE case4_prompt_cached_tokens_total counter", f"case4_prompt_cached_tokens_total {cached}",
                    "# TYPE case4_graphs_captured_total counter", f"case4_graphs_captured_total {g.get('captured', 0)}",
                    "# TYPE case4_graph_misses_total counter", f"case4_graph_misses_total {g.get('misses', 0)}",
                    "# TYPE case4_graph_replays_total counter", f"case4_graph_replays_total {g.get('replays', 0)}"]
            out += self.ttft.text("case4_time_to_first_token_seconds")
            out += self.itl.text("case4_inter_token_latency_seconds")
        return "\n".join(out) + "\n"


# -- the engine: the pair, the queue, the worker

class Job:
    """One HTTP request's generation. Events go from the worker thread to the handler's
    asyncio queue: ("start", prompt_tokens) | ("text", str, logprobs) | ("end", dict) | ("error", ApiError).
    logprobs: None (not asked), or the top count; the text events then carry the logprob
    entries (client/process.py `logprob_entries`) of the tokens since the last event."""

    def __init__(self, req: Request, max_tokens: int | None, stops: list[str], aloop, logprobs: int | None = None):
        self.req, self.max_tokens, self.stop = req, max_tokens, StopText(stops)
        self.aloop, self.events = aloop, asyncio.Queue()
        self.logprobs, self.lp_sent = logprobs, 0
        self.ids: list[int] | None = None  # a prompt given as token ids (completions)
        self.gen: SlotGen | None = None
        self.cancelled = False
        self.t_arrival = time.perf_counter()
        self.fed = []       # the generation's text so far, as streamed (before the stop strings)
        self.n_stop = None  # tokens when the stop string was found
        self.stamps: dict | None = {} if STAGES_FILE else None  # stage -> perf_counter s (CASE4_SERVE_STAGES)

    def stamp(self, stage: str, peer_t: tuple | None = None) -> None:
        """Note when `stage` was reached (the first time only); peer_t: the (start, end) us of the peer's op
        that just replied, noted as stage.in / stage.out."""
        if self.stamps is None or stage in self.stamps:
            return
        self.stamps[stage] = time.perf_counter()
        if peer_t:
            self.stamps[stage + ".in"], self.stamps[stage + ".out"] = peer_t[0] / 1e6, peer_t[1] / 1e6

    def put(self, *ev) -> None:
        self.aloop.call_soon_threadsafe(self.events.put_nowait, ev)

    def cancel(self) -> None:
        self.cancelled = True
        if self.gen is not None:
            self.gen.cancel()

    def take_logprobs(self, upto: int | None = None) -> list:
        lps = self.gen.logprobs[self.lp_sent:upto]
        self.lp_sent += len(lps)
        return lps

    def on_text(self, text: str) -> None:  # worker thread, in the generation's callback
        if self.stop.matched:
            return
        self.fed.append(text)
        out = self.stop.feed(text)
        # the logprobs of a batch that completes a stop string wait for the exact count (finish)
        lps = self.take_logprobs() if self.logprobs is not None and not self.stop.matched else []
        # the first token always makes an event, even with no text yet (a byte inside a UTF-8 character, a held-back
        # stop-string prefix): a stream's first event is its first token, whatever the client, as /metrics' TTFT is
        if out or lps or len(self.fed) == 1:
            self.stamp("queued")
            self.put("text", out, lps)
        if self.stop.matched:
            self.n_stop = len(self.gen.tokens)
            self.gen.cancel()


class Engine:
    def __init__(self, opts, max_queue: int, model_ids: set[str], sampling: str = "client",
                 slots: int = 1, schedule: str = "rr", quantum: int = 1):
        self.opts, self.model_ids, self.sampling = opts, model_ids, sampling
        self.procs: Processes | None = None
        self.state, self.dead = "loading", None  # loading | ready | dead; dead: the named cause
        self.sched = Scheduler(slots, max_queue, schedule, quantum)
        self.closed = False  # the children stopped (close_procs)
        self.cached_total = 0  # prompt tokens served from the slots' KV
        self.graphs: dict = {}  # the server's graph counters after the last generation (refresh_graphs)
        self.metrics = Metrics()
        self.thread = threading.Thread(target=self.work, name="case4-serve-worker", daemon=True)
        self.exit_code = 0  # a failed start: 2 (bad input, e.g. no such model) or 1; the server then exits
        self.on_failed_start = lambda: None

    @property
    def running(self) -> int:
        return self.sched.in_use()

    def start(self) -> None:
        self.thread.start()

    def check_alive(self) -> None:
        """A child that died while idle is seen here, before any request waits on it."""
        P = self.procs
        if self.state == "ready" and P is not None:
            for peer in (P.server, P.client):
                if peer.proc.exitcode is not None:
                    self.die(f"{peer.name} process died (exit code {peer.proc.exitcode})")

    def die(self, cause: str) -> None:
        if self.state == "dead":
            return
        self.state, self.dead = "dead", cause
        log(f"serve: {cause}; every request now answers 503")

    def unavailable(self) -> ApiError:
        if self.state == "loading":
            return ApiError(503, "the model is loading", "service_unavailable", code="loading")
        return ApiError(503, f"the model is unavailable: {self.dead}", "service_unavailable", code="process_died")

    def submit(self, job: Job) -> None:
        self.check_alive()
        if self.state != "ready":
            raise self.unavailable()
        if not self.sched.offer(job):
            raise ApiError(429, f"the queue is full ({self.sched.max_queue} requests waiting); retry later",
                           "rate_limit_exceeded", code="queue_full") from None

    def withdraw(self, job: Job) -> None:
        """A queued job whose client went away leaves the queue (a running one is cancelled)."""
        job.cancel()
        self.sched.withdraw(job)

    def work(self) -> None:
        try:
            P = Processes(self.opts)
            self.procs = P
            P.start()
            self.state = "ready"
            log(f"serve: ready ({P.info['model']}, context {P.info['max_seq_len']}, "
                f"{len(self.sched.slots)} slots, schedule {self.sched.schedule})")
        except Exception as e:  # noqa: BLE001
            bad = isinstance(e, BadInput) or (isinstance(e, RemoteError) and e.bad_input)
            self.exit_code = 2 if bad else 1
            self.die(f"startup failed: {e.message if isinstance(e, RemoteError) else e}")
            print(f"case4: error: {self.dead}", file=sys.stderr, flush=True)
            self.on_failed_start()
        eager = self.opts.graph_mode == "none"
        while True:
            jobs = self.sched.next_jobs()
            if jobs == [None]:
                return
            for job in jobs:
                self.begin(job)
            if self.state == "ready":
                self.sched.run_round(eager, self.job_done, self.fail)
            if self.state == "dead":  # a process died: every running request ends with an error
                for s in self.sched.active():
                    job = s.gen.job
                    self.sched.release(s, s.gen, ok=False)
                    job.put("error", self.unavailable())
                self.close_procs()

    def begin(self, job: Job) -> None:
        """Tokenize, check the context, take a slot, pre-fill what it lacks, the first token."""
        job.stamp("worker")
        if job.cancelled:  # its client went away while it waited
            return
        if self.state != "ready":
            job.put("error", self.unavailable())
            return
        P, r = self.procs, job.req
        try:
            ctx = P.info["max_seq_len"]
            ids = job.ids
            if ids is None:
                ids = P.call(P.client, "tokenize", {"text": r.prompt or "", "chat": r.messages is not None,
                                                    "messages": r.messages, "max_len": ctx - 1, "reset": False})["ids"]
            bad = [i for i in ids if not 0 <= i < P.info["vocab_size"]]
            if bad:
                raise ApiError(400, f"prompt: token id {bad[0]} out of range [0, {P.info['vocab_size']})", param="prompt")
            if not ids:
                raise BadInput("the prompt is empty")
            n = len(ids)
            max_tokens = job.max_tokens if job.max_tokens is not None else ctx - n
            if max_tokens < 1 or n + max_tokens > ctx:
                raise ApiError(400, f"the prompt is {n} tokens and max_tokens is {max_tokens}: together "
                               f"{n + max_tokens}, more than the context of {ctx} tokens", param="max_tokens",
                               code="context_length_exceeded")
            r.max_tokens = max_tokens
            slot = self.sched.pick(ids)
            device = self.sampling == "device" and job.logprobs is None
            gen = job.gen = slot.gen = SlotGen(P, job, slot, device)
            gen.prompt_ids = ids
            job.put("start", n)
            gen.start()
            if not slot.capturing:  # graphs for this session, once (the cuda backend)
                slot.capturing = True
                gen.start_graphs()
            if gen.done:
                self.sched.release(slot, gen)
                self.job_done(job)
        except BaseException as e:  # noqa: BLE001
            if job.gen is not None and job.gen.slot.gen is job.gen:
                self.sched.release(job.gen.slot, job.gen, ok=False)
            self.fail(job, e)

    def job_done(self, job: Job) -> None:
        try:
            job.put("end", self.finish(job))
        except BaseException as e:  # noqa: BLE001
            self.fail(job, e)

    def fail(self, job: Job, e: BaseException) -> None:
        """A request's failure as its answer; a failed process makes the server dead."""
        if isinstance(e, ApiError):
            job.put("error", e)
        elif isinstance(e, BadInput):
            job.put("error", ApiError(400, str(e)))
        elif isinstance(e, RemoteError) and e.bad_input:
            job.put("error", ApiError(400, e.message))
        else:
            if isinstance(e, RemoteError):
                self.die(f"{e.peer} process failed: {e.op}: {e.type}: {e.message}")
            elif isinstance(e, (PeerDied, PeerTimeout)):
                self.die(str(e))
            else:
                self.die(f"orchestrator failed: {type(e).__name__}: {e}")
            job.put("error", self.unavailable())

    def finish(self, job: Job) -> dict:
        """The end event: finish reason, exact usage, the logprobs not sent yet, and the
        metrics of the generation."""
        gen = job.gen
        n_out = len(gen.tokens)
        if not job.stop.matched:
            # the streaming detokenizer holds back text that ends in an incomplete character;
            # at the end the whole decode decides it (as the CLI's text file), stop strings included
            full, fed = self.procs.detokenize(gen.tokens), "".join(job.fed)
            if full.startswith(fed) and len(full) > len(fed):
                job.on_text(full[len(fed):])
            tail = job.stop.flush()
            if tail:
                job.put("text", tail, [])
        if job.stop.matched:
            n_out = self.stop_token_count(job)
            reason = "stop"
        else:
            reason = "stop" if gen.stop_reason in ("eos", "cancelled") else "length"
        ttft = gen.t_tok[0] - job.t_arrival if gen.t_tok else None
        t = gen.t_tok[:n_out]
        self.metrics.generation(len(gen.prompt_ids), n_out, ttft, [b - a for a, b in zip(t, t[1:])])
        self.cached_total += gen.cached
        self.refresh_graphs()
        return {"finish_reason": reason, "prompt_tokens": len(gen.prompt_ids), "completion_tokens": n_out,
                "cached_tokens": gen.cached, "logprobs": job.take_logprobs(n_out) if job.logprobs is not None else None,
                "all_logprobs": gen.logprobs[:n_out] if job.logprobs is not None else None}

    def refresh_graphs(self) -> None:
        """The server's graph counters for /metrics, read here in the worker (the one thread that talks
        to the server), after each generation: /metrics answers from this copy without a round trip."""
        try:
            g = (self.procs.status() or {}).get("graphs")
            self.graphs = g if isinstance(g, dict) else {}  # the hf backend names its graph kind instead
        except Exception:  # noqa: BLE001 - a dead server is reported by the next request and /health
            pass

    def stop_token_count(self, job: Job) -> int:
        """Tokens up to the one that completed the stop string: the text came in batches, so
        the fewest tokens whose text holds a stop string (a bisection)."""
        toks, stops = job.gen.tokens, job.stop.stops
        lo, hi = 1, job.n_stop
        while lo < hi:
            mid = (lo + hi) // 2
            text = self.procs.detokenize(toks[:mid])
            if any(s in text for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return hi

    def close(self) -> None:
        self.sched.close()
        self.close_procs()

    def close_procs(self) -> None:
        """Stop the children and unlink the shared memory, once (after a death, or at exit)."""
        P = self.procs
        if P is not None and not self.closed:
            self.closed = True
            P.close(clean=self.state == "ready" and self.running == 0)


# -- HTTP

def build_app(engine: Engine, api_key: str | None, served_name: str):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    class StreamOptions(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)  # as every other part of a body ("yes" was true)
        include_usage: bool = False

    class Common(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float | None = Field(None, ge=0.0)
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        top_k: int | None = Field(None, ge=-1)
        seed: int | None = None
        stop: str | list[str] | None = None
        stream: bool = False
        stream_options: StreamOptions | None = None
        n: int = 1
        logprobs: bool | int | None = None
        top_logprobs: int | None = None
        ignore_eos: bool = False  # vLLM's: generate max_tokens whatever the EOS (benchmarks)

    class TextPart(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        type: Literal["text"]
        text: str

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow", strict=True)
        role: Literal["system", "user", "assistant", "developer", "tool"]
        content: str | list[TextPart]  # text parts are joined; other kinds (images) are a 400

        def text(self) -> str:
            return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        # what this server cannot honour, refused rather than ignored (the answer would not be what was asked)
        tools: list | None = None
        tool_choice: str | dict | None = None
        functions: list | None = None  # the older form of tools and tool_choice
        function_call: str | dict | None = None
        response_format: dict | None = None

    class CompletionRequest(Common):
        prompt: str | list[str] | list[int]  # token ids: used as they are (vLLM takes them too)
        echo: bool = False
        suffix: str | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn re-raises SIGTERM / SIGINT after its shutdown, so main's finally may not
        # run: stop the children and unlink the shared memory here
        engine.close()

    app = FastAPI(title="case4", docs_url=None, redoc_url=None, lifespan=lifespan)

    def error_response(e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        engine.metrics.request(request.url.path, e.status)
        return error_response(e)

    def invalid(errors) -> ApiError:
        """A 400 naming the first field pydantic refused."""
        err = errors[0] if errors else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = err.get("msg", "invalid request")
        if err.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        return ApiError(400, f"{'.'.join(loc) + ': ' if loc else ''}{msg}", param=".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return error_response(ApiError(e.status_code, str(e.detail), "invalid_request_error"))

    def authorize(request: HTTPRequest) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise ApiError(401, "a missing or wrong API key (send Authorization: Bearer <key>)",
                           "authentication_error", code="invalid_api_key")

    def logprobs_of(body: Common, chat: bool) -> int | None:
        """None (no logprobs), or how many top alternatives per token: chat's `logprobs: true`
        + `top_logprobs` (0..20), completions' `logprobs` (0..20), as vLLM takes them."""
        lp, top = body.logprobs, body.top_logprobs
        if chat:
            if lp is not None and not isinstance(lp, bool):
                raise ApiError(400, f"logprobs must be a boolean in chat completions, got {lp!r}", param="logprobs")
            if top is not None and not lp:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            k = (top or 0) if lp else None
            which = "top_logprobs"
        else:
            if isinstance(lp, bool) or top is not None:
                raise ApiError(400, "completions take logprobs as an integer (0..20); top_logprobs is chat's",
                               param="top_logprobs" if top is not None else "logprobs")
            k, which = lp, "logprobs"
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise ApiError(400, f"{which} must be in [0, {MAX_LOGPROBS}], got {k}", param=which)
        return k

    def check(body: Common) -> tuple[SamplingParams, list[str]]:
        if body.model not in engine.model_ids:
            raise ApiError(404, f"the model {body.model!r} does not exist; this server has {served_name!r}",
                           param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, f"n must be 1 (one generation per request), got {body.n}", param="n")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", param="stop")
        try:
            params = SamplingParams(1.0 if body.temperature is None else body.temperature,
                                    max(body.top_k or 0, 0), 1.0 if body.top_p is None else body.top_p,
                                    body.seed if body.seed is not None else random.randrange(2 ** 31))
        except BadInput as e:
            raise ApiError(400, str(e)) from None
        return params, stops

    async def generate(request: HTTPRequest, endpoint: str, body: Common, req: Request,
                       max_tokens: int | None, stops: list[str], chat: bool, ids: list[int] | None = None):
        job = Job(req, max_tokens, stops, asyncio.get_running_loop(), logprobs_of(body, chat))
        job.ids = ids
        if job.stamps is not None:
            job.stamps.update(asgi=request.scope.get("case4.t_asgi"), parsed=request.scope.get("case4.t_parsed"))
        engine.submit(job)
        while True:  # queued: wait for the start (or an error), noticing a client that left
            try:
                ev = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                break
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.withdraw(job)
                    raise ApiError(499, "the client went away", code="client_closed")
        if ev[0] == "error":
            raise ev[1]
        engine.metrics.request(endpoint, 200)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created, kind = int(time.time()), "chat.completion" if chat else "text_completion"

        offset = [0]  # completions' text_offset: where each token's text starts in the answer

        def logprobs(entries) -> dict | None:
            """OpenAI's logprobs object of these tokens (client/process.py logprob_entries)."""
            if job.logprobs is None or entries is None:
                return None
            if chat:
                def one(s, v):
                    return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
                return {"content": [{**one(s, v), "top_logprobs": [one(t, w) for t, _, w in top]}
                                    for s, v, top in entries], "refusal": None}
            offs = []
            for s, _, _ in entries:
                offs.append(offset[0])
                offset[0] += len(s)
            # as OpenAI: the sampled token's logprob is among its top_logprobs too
            return {"tokens": [s for s, _, _ in entries], "token_logprobs": [v for _, v, _ in entries],
                    "top_logprobs": [{**{t: w for t, _, w in top}, s: v} for s, v, top in entries],
                    "text_offset": offs}

        def choice(text: str | None, reason: str | None, first: bool = False, lps=None) -> dict:
            if chat:
                delta = {"role": "assistant", "content": text or ""} if first else (
                    {"content": text} if text is not None else {})
                return {"index": 0, "delta": delta, "logprobs": logprobs(lps), "finish_reason": reason}
            return {"index": 0, "text": text or "", "logprobs": logprobs(lps), "finish_reason": reason}

        def usage(end: dict) -> dict:
            return {"prompt_tokens": end["prompt_tokens"], "completion_tokens": end["completion_tokens"],
                    "total_tokens": end["prompt_tokens"] + end["completion_tokens"],
                    "prompt_tokens_details": {"cached_tokens": end["cached_tokens"]}}

        if not body.stream:
            parts = []
            while True:
                ev = await job.events.get()
                if ev[0] == "text":
                    parts.append(ev[1])
                elif ev[0] == "error":
                    raise ev[1]
                elif ev[0] == "end":
                    break
            end, text = ev[1], "".join(parts)
            lp = logprobs(end["all_logprobs"])
            ch = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                   "finish_reason": end["finish_reason"]} if chat else
                  {"index": 0, "text": text, "logprobs": lp, "finish_reason": end["finish_reason"]})
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": body.model,
                                 "choices": [ch], "usage": usage(end)})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(ch: dict | None, u: dict | None = None) -> str:
            obj = {"id": rid, "object": chunk_kind, "created": created, "model": body.model,
                   "choices": [ch] if ch is not None else []}
            if include_usage:
                obj["usage"] = u
            return sse(obj)

        async def events():
            done = False
            try:
                if chat:
                    yield chunk(choice("", None, first=True))
                while True:
                    ev = await job.events.get()
                    if ev[0] == "text":
                        job.stamp("loop")
                        yield chunk(choice(ev[1], None, lps=ev[2] if ev[2] else None))
                        job.stamp("sent")  # resumed: the chunk went to the socket
                    elif ev[0] == "end":
                        lps = ev[1]["logprobs"] or None
                        yield chunk(choice(None if chat else "", ev[1]["finish_reason"], lps=lps))
                        if include_usage:
                            yield chunk(None, usage(ev[1]))
                        break
                    else:  # a process died (or the like) mid-stream: an error event, then the end
                        yield sse(ev[1].body())
                        break
                yield "data: [DONE]\n\n"
                done = True
                if job.stamps is not None:
                    g = job.gen
                    with open(STAGES_FILE, "a") as f:
                        f.write(json.dumps({"id": rid, "prompt_tokens": len(g.prompt_ids), "cached": g.cached,
                                            **job.stamps}) + "\n")
            finally:
                if not done:  # the client went away: stop the generation at its next token
                    job.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def common_request(params: SamplingParams, body: Common, **kw) -> Request:
        return Request(params=params, sampling=engine.sampling, ipc="loop", ignore_eos=body.ignore_eos, **kw)

    async def parse(request: HTTPRequest, cls):
        """The body validated by pydantic straight from its bytes (its Rust JSON parser) rather than by FastAPI's
        body parameter (json.loads, then its own field-by-field validation); the same 400s."""
        try:
            body = cls.model_validate_json(await request.body())
        except ValidationError as e:
            raise invalid(e.errors(include_url=False)) from None
        if STAGES_FILE:
            request.scope["case4.t_parsed"] = time.perf_counter()
        return body

    def check_chat_features(body) -> None:
        """Tool calls and constrained output are not produced here: a request that needs them is a 400 naming the
        field (vLLM answers the same when its server was not started with tool calling), not a plain-text answer.
        tools with tool_choice "none", and response_format {"type": "text"}, ask for nothing extra."""
        if (body.tools or body.functions) and "none" not in (body.tool_choice, body.function_call):
            field = "tools" if body.tools else "functions"
            raise ApiError(400, f"{field}: tool calls are not supported by this server (send tool_choice \"none\" to "
                                f"answer in text)", param=field)
        for field in ("tool_choice", "function_call"):
            if getattr(body, field) not in (None, "none", "auto"):
                raise ApiError(400, f"{field}: tool calls are not supported by this server", param=field)
        kind = (body.response_format or {}).get("type", "text")
        if kind != "text":
            raise ApiError(400, f"response_format: type {kind!r} is not supported (no constrained decoding); "
                                f"only \"text\"", param="response_format")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        authorize(request)
        body = await parse(request, ChatRequest)
        check_chat_features(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        params, stops = check(body)
        req = common_request(params, body, messages=[{"role": m.role, "content": m.text()} for m in body.messages])
        return await generate(request, "/v1/chat/completions", body, req, max_tokens, stops, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        authorize(request)
        body = await parse(request, CompletionRequest)
        params, stops = check(body)
        prompt, ids = body.prompt, None
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            prompt, ids = None, list(body.prompt)
        elif isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if body.echo or body.suffix:
            raise ApiError(400, f"{'echo' if body.echo else 'suffix'} is not supported",
                           param="echo" if body.echo else "suffix")
        if not prompt and not ids:
            raise ApiError(400, "prompt: the prompt is empty", param="prompt")
        req = common_request(params, body, prompt=prompt)
        # a default of 16 tokens as OpenAI's completions
        return await generate(request, "/v1/completions", body, req, body.max_tokens or 16, stops, chat=False,
                              ids=ids)

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        authorize(request)
        info = engine.procs.info if engine.procs is not None else {}
        return {"object": "list", "data": [{"id": served_name, "object": "model", "created": 0, "owned_by": "case4",
                                            "max_model_len": info.get("max_seq_len")}]}

    @app.get("/health")
    async def health():
        engine.check_alive()
        if engine.state == "ready":
            st = engine.procs.info.get("status") or {}
            return {"status": "ok", "backend": engine.procs.info["backend"], "device": st.get("device"),
                    "slots": len(engine.sched.slots), "schedule": engine.sched.schedule,
                    "rr_tokens": engine.sched.quantum}
        return JSONResponse({"status": engine.state, "cause": engine.dead}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.text(engine.sched.queue_depth(), engine.running,
                                                     len(engine.sched.slots), engine.cached_total,
                                                     engine.graphs),
                                 media_type="text/plain; version=0.0.4")

    fast = {"/v1/completions": completions, "/v1/chat/completions": chat_completions}

    async def asgi(scope, receive, send):
        """The two generation endpoints called straight from uvicorn (their @app.post routes stay, so that other
        methods get FastAPI's 405), the rest through FastAPI: its middleware,
        routing and dependency solving, with its body parameter, took 0.47 ms from uvicorn's call to the parsed
        body of a 512-id request on a 2-core VM, 0.22 ms this way (docs/serve.md "Latency").
        The same handlers, errors and metrics; an unexpected exception is uvicorn's 500 as FastAPI's would be."""
        h = fast.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if h is None:
            return await app(scope, receive, send)
        if STAGES_FILE:
            scope["case4.t_asgi"] = time.perf_counter()
        try:
            response = await h(HTTPRequest(scope, receive))
        except ApiError as e:
            engine.metrics.request(scope["path"], e.status)
            response = error_response(e)
        except ClientDisconnect:  # gone before its body was read: nothing to answer, nothing to log
            return
        await response(scope, receive, send)
    return asgi


def build_parser() -> argparse.ArgumentParser:
    from conductor.cli import add_model_options
    p = argparse.ArgumentParser(prog="case4 serve", description="An OpenAI-compatible HTTP server over "
                                "one server + client pair (docs/serve.md).")
    add_model_options(p)
    a = p.add_argument
    a("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    a("--port", type=int, default=8000)
    a("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 requests")
    a("--served-model-name", default=None, help="the model id clients send (default: --model)")
    a("--slots", type=int, default=4, help="KV sessions on the server: requests decoded together (and "
      "prompts cached); each holds a whole context of KV (default 4)")
    a("--schedule", choices=SCHEDULES, default="rr", help="rr: round robin, one token per active slot "
      "in turn (default); fcfs: one request at a time to its end (docs/serve.md)")
    a("--rr-tokens", type=int, default=1, help="rr: tokens a slot decodes per turn (default 1: token by "
      "token; more: fewer switches, burstier streams)")
    a("--max-queue", type=int, default=64, help="requests waiting beyond the slots; more get 429")
    a("--seed", type=int, default=0, help="synthetic weights' seed")
    return p


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: an address in use or a host that does not resolve
    is one line and exit 2 (uvicorn's own bind failed after the start: two lines, its exit code 3)."""
    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(addr)
    except OSError as e:  # socket.gaierror included
        if sock is not None:
            sock.close()
        raise BadInput(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None
    return sock


def main(argv=None) -> int:
    from conductor.cli import check_model_options, process_options
    args = build_parser().parse_args(argv)
    try:
        check_model_options(args)
        if not 0 <= args.port < 65536:
            raise BadInput(f"--port must be in [0, 65535], got {args.port}")
        if args.max_queue < 1:
            raise BadInput(f"--max-queue must be >= 1, got {args.max_queue}")
        if not 1 <= args.slots <= 256:
            raise BadInput(f"--slots must be in [1, 256], got {args.slots}")
        if args.rr_tokens < 1:
            raise BadInput(f"--rr-tokens must be >= 1, got {args.rr_tokens}")
        if args.api_key is not None and not args.api_key.strip():  # e.g. --api-key "$KEY" with KEY unset
            raise BadInput("--api-key is empty: no client could authenticate (give a key, or leave the flag out)")
        if STAGES_FILE:  # written at the end of each stream: an unwritable path was a traceback per request
            try:
                open(STAGES_FILE, "a").close()
            except OSError as e:
                raise BadInput(f"CASE4_SERVE_STAGES: cannot write {STAGES_FILE} ({e.strerror or e})") from None
        sock = listen_socket(args.host, args.port)
    except BadInput as e:
        print(f"case4: error: {e}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:  # e.g. a GPU image's interpreter used as it is (scripts/setup_env.sh)
        print(f"case4: error: case4 serve needs fastapi and uvicorn ({e}): pip install -r requirements.txt",
              file=sys.stderr)
        return 2
    opts = process_options(args)
    opts.sessions = args.slots
    name = args.served_model_name or args.model
    engine = Engine(opts, args.max_queue, {name, args.model}, args.sampling, args.slots, args.schedule,
                    args.rr_tokens)
    app = build_app(engine, args.api_key, name)
    log(f"serve: http://{args.host}:{sock.getsockname()[1]}/v1 (model {name!r}; /health turns 200 once loaded)")
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))

    def failed_start():  # the model did not load: no point in answering 503 forever
        server.should_exit = True
    engine.on_failed_start = failed_start
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again through the handlers it found:
    # with Python's own, a Ctrl-C ended in a KeyboardInterrupt traceback and a SIGTERM killed the orchestrator
    # before it stopped its children. These handlers only note the signal; the stop is the normal way out.
    stopped_by: list[str] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda n, _f: stopped_by.append(signal.Signals(n).name))
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    if stopped_by:
        log(f"serve: stopped ({stopped_by[0]})")
    return engine.exit_code
