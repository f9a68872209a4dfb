"""Load bench of `case4 serve` (issue 27; docs/serve.md "Scheduling"): concurrent streaming
clients (1, 4, 16, 64 by default) each asking for 128 tokens, for each schedule (rr, fcfs):
requests/s, tokens/s, TTFT and inter-token p50/p99, failures (must be 0); then the prompt
cache: the TTFT of a prompt that extends one a slot holds (only the new tokens pre-filled)
next to the same length cold.

    python bench/serve_load.py                                  # smollm2, --backend auto, rr and fcfs
    python bench/serve_load.py --model synthetic:tiny --backend reference --max-tokens 32   # CPU, minutes
    python bench/serve_load.py --model llama2-7b-folder --backend cuda --commit-results    # a GPU

It starts the server itself (orchestrator.py serve on a free port; one per schedule) and
drives it with httpx streams; `--url` uses a running one instead (its schedule as it is).
Prompts are token ids (completions take them, any tokenizer), distinct per request so
that no request is served from another's cache; `ignore_eos` makes every answer exactly
--max-tokens long. Each stream asks `logprobs: 0` to know how many tokens each SSE chunk
carries (the client process computes it after it has sent the token, off the decode path);
a chunk's gap since the previous one is spread evenly over its tokens (the server batches
a solo stream every 10 ms). Results: OUT/serve-<device>-<model>-<yyyymmdd>.json (--commit-results:
also into bench/results/).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 3)


class ServerProc:
    """orchestrator.py serve on a free port, until stop() (Ctrl-C: children and shm cleaned up)."""

    def __init__(self, a, schedule: str, log: Path):
        import httpx
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        schedule, _, quantum = schedule.partition(":")
        cmd = [sys.executable, str(ROOT / "orchestrator.py"), "serve", "--model", a.model, "--backend", a.backend,
               "--port", str(port), "--slots", str(a.slots), "--schedule", schedule, "--rr-tokens", quantum or "1",
               "--max-queue", str(max(64, max(a.clients, default=1) * a.rounds)), *a.server_args]
        print(f"[serve_load] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        env = dict(os.environ)
        if a.threads:  # torch's intra-op threads in the server (a shared CPU: oversubscribed threads spin)
            env["OMP_NUM_THREADS"] = str(a.threads)
        self.stages = log.with_suffix(".stages.jsonl")  # each streamed request's first-token stages (serve.py)
        self.stages.unlink(missing_ok=True)
        env["CASE4_SERVE_STAGES"] = str(self.stages)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), cwd=ROOT, env=env)
        deadline = time.monotonic() + a.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve_load: the server exited ({self.proc.returncode}): {log.read_text()[-2000:]}")
            try:
                h = httpx.get(self.url + "/health", timeout=5)
                if h.status_code == 200:
                    self.health = h.json()
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"serve_load: not healthy in {a.start_timeout} s: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


async def one_request(http, url: str, model: str, ids: list[int], max_tokens: int) -> dict:
    """One streaming completion: TTFT, per-token gaps, tokens, or the failure."""
    body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    t_prev, ttft, gaps, n, usage = None, None, [], 0, None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                d = json.loads(line[6:])
                if "error" in d:
                    return {"error": d["error"].get("message")}
                if d.get("usage"):
                    usage = d["usage"]
                if not d.get("choices"):
                    continue
                lp = d["choices"][0].get("logprobs")
                k = len(lp["tokens"]) if lp else 0
                if not k:
                    continue
                t = time.perf_counter()
                if ttft is None:  # the first token's time is the TTFT; others with it came at once
                    ttft = t - t0
                    gaps += [0.0] * (k - 1)
                else:
                    gaps += [(t - t_prev) / k] * k
                t_prev, n = t, n + k
    except Exception as e:  # noqa: BLE001  (a failure is counted, the run goes on)
        return {"error": f"{type(e).__name__}: {e}"}
    if usage is None or usage["completion_tokens"] != max_tokens or n != max_tokens:
        return {"error": f"got {n} tokens (usage {usage}), asked {max_tokens}"}
    end = time.perf_counter()
    return {"ttft": ttft, "gaps": gaps, "tokens": n, "latency": end - t0,
            "tpot": (end - t0 - ttft) / max(1, n - 1), "cached": usage["prompt_tokens_details"]["cached_tokens"]}


async def open_connections(http, url: str, n: int) -> None:
    """n keep-alive connections opened before the clock starts (as an OpenAI client keeps its own): the TTFT is
    then the server's, not TCP's set-up (a fresh connection's first request measured up to 40 ms more on a CPU,
    where Nagle's algorithm meets the peer's delayed ACK)."""
    await asyncio.gather(*(http.get(url + "/health") for _ in range(n)))


async def level(url: str, model: str, clients: int, rounds: int, a, rng: random.Random) -> dict:
    """`clients` concurrent clients, each sending `rounds` requests one after the other."""
    import httpx
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout), limits=limits) as http:
        await open_connections(http, url, clients)

        async def client(c: int) -> list[dict]:
            out = []
            for _ in range(rounds):
                ids = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.prompt_tokens)]
                out.append(await one_request(http, url, model, ids, a.max_tokens))
            return out
        t0 = time.perf_counter()
        res = [r for rs in await asyncio.gather(*(client(c) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    ok = [r for r in res if "error" not in r]
    ttft = [r["ttft"] for r in ok]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    row = {"clients": clients, "requests": len(res), "failures": len(res) - len(ok),
           "errors": sorted({r["error"] for r in res if "error" in r})[:3], "wall_s": round(wall, 3),
           "req_per_s": round(len(ok) / wall, 3), "tok_per_s": round(tokens / wall, 2),
           "ttft_p50_ms": ms(pct(ttft, 50)), "ttft_p99_ms": ms(pct(ttft, 99)),
           "itl_p50_ms": ms(pct(gaps, 50)), "itl_p99_ms": ms(pct(gaps, 99)),
           "tpot_p50_ms": ms(pct([r["tpot"] for r in ok], 50)),
           "cached_tokens": sum(r["cached"] for r in ok)}
    print(f"[serve_load] {clients:3d} clients: {row['req_per_s']:.2f} req/s {row['tok_per_s']:.1f} tok/s, TTFT p50 "
          f"{row['ttft_p50_ms']} p99 {row['ttft_p99_ms']} ms, ITL p50 {row['itl_p50_ms']} p99 {row['itl_p99_ms']} ms, "
          f"failures {row['failures']}", file=sys.stderr, flush=True)
    return row


async def prompt_cache(url: str, model: str, a, rng: random.Random) -> dict:
    """TTFT of a prompt extending one a slot holds (only the new tokens pre-filled) vs the same
    length cold, medians of --cache-repeats."""
    import httpx
    cold, warm, cached = [], [], []
    async with httpx.AsyncClient(timeout=httpx.Timeout(a.request_timeout)) as http:
        await open_connections(http, url, 1)
        for _ in range(a.cache_repeats):
            base = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.cache_prompt)]
            more = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.cache_new)]
            fresh = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.cache_prompt + a.cache_new)]
            r = await one_request(http, url, model, fresh, 8)
            cold.append(r.get("ttft"))
            await one_request(http, url, model, base, 8)  # the first turn
            r = await one_request(http, url, model, base + more, 8)  # the second turn
            warm.append(r.get("ttft"))
            cached.append(r.get("cached"))
    if None in cold or None in warm:
        return {"error": "a request failed"}
    out = {"prompt_tokens": a.cache_prompt + a.cache_new, "new_tokens": a.cache_new, "cached_tokens": cached,
           "cold_ttft_ms": ms(pct(cold, 50)), "warm_ttft_ms": ms(pct(warm, 50))}
    print(f"[serve_load] prompt cache: {out['prompt_tokens']}-token prompt, TTFT cold {out['cold_ttft_ms']} ms, "
          f"second turn ({a.cache_new} new tokens) {out['warm_ttft_ms']} ms", file=sys.stderr, flush=True)
    return out


# serve.py's stages on a request's way to its first event (its "sent", when the event loop is back from writing
# it, may come after the client has it: it is reported apart, as "loop > sent")
STAGES = ("asgi", "parsed", "worker", "prefilled.in", "prefilled.out", "prefilled", "sampled.in", "sampled.out",
          "sampled", "queued", "loop")


def raw_first_token(sock, host: str, model: str, ids: list[int], max_tokens: int = 8) -> tuple[float, float]:
    """One streamed completion over a kept-alive socket, as lean as a client gets (the request's bytes made before
    the clock starts, no HTTP library): (send time, time the first SSE event arrived), perf_counter s. serve sends
    the first token's event even when its text is empty; max_tokens > 1, so that the decode loop starts behind the
    first token as in any real request."""
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    req = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    t0 = time.perf_counter()
    sock.sendall(req)
    buf, first = b"", None
    while not buf.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
        got = sock.recv(1 << 16)
        if not got:
            raise ConnectionError("the server closed the connection")
        buf += got
        if first is None and b"data: {" in buf:
            first = time.perf_counter()
        if not buf.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"HTTP {buf[:200]!r}")
    if b'"error"' in buf or b"data: [DONE]" not in buf:
        raise ConnectionError(f"the stream failed: {buf[-300:]!r}")
    return t0, first


def lean_ttft(url: str, model: str, a, rng: random.Random, stages: Path | None) -> dict:
    """Issue 27's TTFT, the server's own: --ttft-repeats cold prompts (and as many second turns) of the prompt
    cache phase's lengths, each timed by `raw_first_token`, so that the HTTP client's own cost (httpx's ~0.6-0.9 ms
    to build and send a 512-id request and parse the event, on a 2-core VM) is not in it; with the server's
    CASE4_SERVE_STAGES file (the bench started it), the median time of each stage on the way."""
    from urllib.parse import urlsplit
    u = urlsplit(url)
    n0 = sum(1 for _ in stages.open()) if stages and stages.exists() else 0
    cold, warm, spans = [], [], []  # spans: the cold requests' (send, first event)
    with socket.create_connection((u.hostname, u.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(a.ttft_repeats):
            base = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.cache_prompt)]
            more = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.cache_new)]
            fresh = [rng.randrange(a.vocab_lo, a.vocab_hi) for _ in range(a.cache_prompt + a.cache_new)]
            t0, t1 = raw_first_token(sock, u.netloc, model, fresh)
            cold.append(t1 - t0)
            spans.append((t0, t1))
            raw_first_token(sock, u.netloc, model, base)  # the first turn
            t0, t1 = raw_first_token(sock, u.netloc, model, base + more)
            warm.append(t1 - t0)
            time.sleep(0.02)
    out = {"repeats": a.ttft_repeats, "cold_ttft_ms": ms(pct(cold, 50)), "cold_ttft_p10_ms": ms(pct(cold, 10)),
           "cold_ttft_p90_ms": ms(pct(cold, 90)), "warm_ttft_ms": ms(pct(warm, 50))}
    if stages and stages.exists():
        lines = [json.loads(ln) for ln in stages.read_text().splitlines()[n0:]]
        cold_lines = lines[0::3]  # cold, first turn, second turn per repeat
        if len(cold_lines) == len(spans):
            segs: dict[str, list[float]] = {}
            for (t0, t1), st in zip(spans, cold_lines):
                prev, name = t0, "send"
                for k in (*STAGES, "first event"):
                    t = t1 if k == "first event" else st.get(k)
                    if t is None:
                        continue
                    segs.setdefault(f"{name} > {k}", []).append(t - prev)
                    prev, name = t, k
                if "sent" in st:
                    segs.setdefault("loop > sent", []).append(st["sent"] - st["loop"])
            out["cold_stages_ms"] = {k: ms(pct(v, 50)) for k, v in segs.items()}
            # what serve adds to the CLI's own way to the first token (worker > sampled is that way: kv_init, then
            # the sample op), request by request: HTTP in, the hand-offs between threads, the event out
            out["serve_overhead_ms"] = ms(pct([(t1 - t0) - (st["sampled"] - st["worker"])
                                               for (t0, t1), st in zip(spans, cold_lines)], 50))
    print(f"[serve_load] lean client: {out['cold_ttft_ms']} ms cold TTFT ({a.cache_prompt + a.cache_new} tokens; "
          f"p10 {out['cold_ttft_p10_ms']} p90 {out['cold_ttft_p90_ms']}), second turn {out['warm_ttft_ms']} ms",
          file=sys.stderr, flush=True)
    if "cold_stages_ms" in out:
        print("[serve_load] cold stages (median ms): " + ", ".join(f"{k} {v}" for k, v in out["cold_stages_ms"].items())
              + f"; serve's own part {out['serve_overhead_ms']} ms", file=sys.stderr, flush=True)
    return out


def device_label(health: dict) -> str:
    dev = health.get("device") or "unknown"
    if dev == "cpu" or dev.startswith("cpu"):
        cpu = platform.processor() or platform.machine()
        try:
            cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())[1]
        except (OSError, TypeError):
            pass
        return f"cpu {cpu} x{os.cpu_count()}"
    return dev


def cli_baseline(a, out: Path) -> dict:
    """The CLI (run_ipc.sh's orchestrator) on the same model and options, in the same run: its per-token p50 for
    the levels' request shape (--prompt-tokens, --max-tokens) and its TTFT for a prompt as long as the prompt-cache
    phase's cold one. Issue 27 compares one client's inter-token p50 to the first (<= 3 %) and the cold TTFT to
    the prefill time (within 2 ms)."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)

    def run(prompt_len: int, max_tokens: int, tag: str) -> dict:
        cmd = [sys.executable, str(ROOT / "orchestrator.py"), "--model", a.model, "--backend", a.backend,
               "--prompt-len", str(prompt_len), "--max-tokens", str(max_tokens), "--ignore-eos", "--quiet",
               "--output-dir", str(out), "--run-name", tag, *a.server_args]
        print(f"[serve_load] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                           timeout=a.request_timeout)
        if r.returncode != 0:
            raise SystemExit(f"serve_load: the CLI baseline failed ({r.returncode}): {r.stderr[-2000:]}")
        return json.loads((out / f"{tag}_metrics.json").read_text())

    dec = run(a.prompt_tokens, a.max_tokens, "cli-decode")
    pre = run(a.cache_prompt + a.cache_new, 2, "cli-prefill")
    res = {"decode_p50_ms": round(dec["p50_ms"], 3), "prompt_tokens": a.cache_prompt + a.cache_new,
           "ttft_ms": round(pre["ttft_ms"], 3)}
    print(f"[serve_load] CLI baseline: per token p50 {res['decode_p50_ms']} ms ({a.max_tokens} tokens), TTFT "
          f"{res['ttft_ms']} ms ({res['prompt_tokens']}-token prompt)", file=sys.stderr, flush=True)
    return res


def against_cli(run: dict, base: dict) -> dict:
    """One run's numbers next to the CLI's: one client's inter-token p50 over the CLI's per-token p50, and the cold
    prompt-cache TTFT minus the CLI's TTFT for the same prompt length."""
    one = next((lv for lv in run["levels"] if lv["clients"] == 1), None)
    out = {}
    if one and one.get("itl_p50_ms") and base["decode_p50_ms"]:
        out["itl_1_client_over_cli"] = round(one["itl_p50_ms"] / base["decode_p50_ms"], 4)
    cold = run.get("prompt_cache", {}).get("cold_ttft_ms")
    if cold is not None:
        out["cold_ttft_minus_cli_ms"] = round(cold - base["ttft_ms"], 3)
    lean = run.get("lean_ttft", {}).get("cold_ttft_ms")
    if lean is not None:
        out["lean_cold_ttft_minus_cli_ms"] = round(lean - base["ttft_ms"], 3)
    return out


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default="smollm2")
    a("--backend", default="auto")
    a("--url", default=None, help="a running server instead of starting one (its schedule as it is)")
    a("--served-model", default=None, help="the model id to send with --url (default --model)")
    a("--schedules", default="rr,rr:4,fcfs", help="comma list of serve --schedule values (one server each); "
      "rr:N is rr with --rr-tokens N")
    a("--slots", type=int, default=4, help="serve --slots")
    a("--clients", default="1,4,16,64", help="concurrency levels")
    a("--rounds", type=int, default=1, help="requests each client sends one after the other")
    a("--max-tokens", type=int, default=128)
    a("--prompt-tokens", type=int, default=32)
    a("--cache-prompt", type=int, default=496, help="prompt cache: the first turn's prompt length (default 496: "
      "with --cache-new 16 the measured prompts are 512 tokens, the decode bench's case4/prefill 512 row)")
    a("--cache-new", type=int, default=16, help="prompt cache: tokens the second turn adds")
    a("--cache-repeats", type=int, default=3)
    a("--ttft-repeats", type=int, default=10, help="cold and second-turn prompts timed by the lean client (0: none)")
    a("--vocab-lo", type=int, default=3, help="prompt ids are drawn from [lo, hi) (skip special ids)")
    a("--vocab-hi", type=int, default=250)
    a("--threads", type=int, default=0, help="OMP_NUM_THREADS for the server (CPU runs; 0: unset)")
    a("--request-timeout", type=float, default=1800.0)
    a("--start-timeout", type=float, default=1800.0)
    a("--out", default="/tmp/serve_load", help="folder for the JSON")
    a("--commit-results", action="store_true", help="also write it into bench/results/")
    a("--no-cli-baseline", dest="cli_baseline", action="store_false",
      help="skip the CLI runs on the same model and options that the one-client and cold-prompt rows are compared to")
    a("server_args", nargs="*", help="more serve options after --, e.g. -- --max-seq 2048 --graph-mode exact")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",") if c]
    schedules = [s for s in args.schedules.split(",") if s] if args.url is None else ["(as running)"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    result = {"bench": "serve_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": args.model, "backend": args.backend, "slots": args.slots, "max_tokens": args.max_tokens,
              "prompt_tokens": args.prompt_tokens, "rounds": args.rounds, "threads": args.threads or None,
              "load_average_at_start": os.getloadavg()[0], "command": " ".join(sys.argv), "runs": []}
    for sched in schedules:
        srv = None if args.url else ServerProc(args, sched, out / f"serve-{sched.replace(':', '-')}.log")
        try:
            url = args.url or srv.url
            import httpx
            health = srv.health if srv else httpx.get(url + "/health", timeout=30).json()
            result["device"] = device_label(health)
            print(f"[serve_load] device: {result['device']}, backend {health.get('backend')}, "
                  f"{health.get('slots')} slots, schedule {health.get('schedule')}", file=sys.stderr, flush=True)
            model = args.served_model or args.model
            asyncio.run(level(url, model, 1, 1, argparse.Namespace(**{**vars(args), "max_tokens": 8}), rng))  # warm-up
            run = {"schedule": health.get("schedule"), "rr_tokens": health.get("rr_tokens"),
                   "backend": health.get("backend"), "levels": []}
            for c in args.clients:
                run["levels"].append(asyncio.run(level(url, model, c, args.rounds, args, rng)))
            run["prompt_cache"] = asyncio.run(prompt_cache(url, model, args, rng))
            if args.ttft_repeats > 0:
                run["lean_ttft"] = lean_ttft(url, model, args, rng, srv.stages if srv else None)
            result["runs"].append(run)
        finally:
            if srv:
                srv.stop()
    if args.cli_baseline and args.url is None:
        result["cli_baseline"] = base = cli_baseline(args, out / "cli")
        for run in result["runs"]:
            run["against_cli"] = against_cli(run, base)
            print(f"[serve_load] {run['schedule']}: {run['against_cli']}", file=sys.stderr, flush=True)
    name = (f"serve-{slug(result.get('device', 'unknown'))}-{slug(Path(args.model).name)}-"
            f"{datetime.now().strftime('%Y%m%d')}.json")
    (out / name).write_text(json.dumps(result, indent=1) + "\n")
    print(f"[serve_load] wrote {out / name}", file=sys.stderr)
    if args.commit_results:
        shutil.copy(out / name, ROOT / "bench" / "results" / name)
        print(f"[serve_load] and bench/results/{name}", file=sys.stderr)
    failures = sum(lv["failures"] for r in result["runs"] for lv in r["levels"])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
