"""The side-by-side batch-1 decode benchmark (DESIGN §7, issue 6).

One process, one device. Rows, in priority order (so a run cut short by its time budget
keeps the rows that matter most):

  copy                         device-to-device copy (>= 2 GiB on CUDA): the bandwidth ceiling
  gemm                         an fp16 8192^3 matmul: the compute ceiling (for prefill / TTFT)
  case4/<exact|dynamic|none>/<device|client>
                               the Backend API: device sampling = be.generate(); client
                               sampling = be.replay() per token + argmax on the host
  case4/prefill                TTFT of be.prefill() for longer prompts (128/512/2048)
  hf/eager                     transformers LlamaForCausalLM, same shapes, DynamicCache
  hf/static-compile            same model, static cache + transformers' auto-compile
                               (torch.compile mode="reduce-overhead", fullgraph=True)
  case4/reference              the pure-torch reference backend (few steps: it is slow)

Every row is measured in its own try/except: a failure is recorded in the row as
{"error": ...} and the run goes on. If the CUDA context dies (a sticky error such as an
illegal address), the remaining rows run in fresh child processes of this script.
After --budget-s seconds, rows not yet started are recorded as skipped. Results are
rewritten after every row, so a killed run still leaves its rows behind.

Output: OUTDIR/<gpu-slug>-<yyyymmdd>.json, .md and .png (see bench/README.md);
--commit-results copies them into bench/results/.

  python bench/decode.py --out OUTDIR                  # full run (GPU)
  python bench/decode.py --out OUTDIR --quick          # short run
  python bench/decode.py --device cpu --shapes tiny --out /tmp/b   # CPU smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import fnmatch
import gc
import inspect
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import floors  # noqa: E402  (bench/floors.py)
import report  # noqa: E402  (bench/report.py)

CASE4_DECODE = [f"case4/{m}/{s}" for m in ("exact", "dynamic", "none") for s in ("device", "client")]
ALL_SYSTEMS = ["copy", "gemm"] + CASE4_DECODE + ["case4/prefill", "hf/eager", "hf/static-compile", "case4/reference"]
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "float16": "float16", "bf16": "bfloat16",
                 "bfloat16": "bfloat16", "fp32": "float32", "float": "float32", "float32": "float32"}
ROW_KEYS = ("system", "shape", "dtype", "prompt", "steps", "repeats", "tok_s", "ms_per_token", "p50_ms",
            "p99_ms", "ttft_ms", "bw_fraction", "bytes_per_token", "achieved_GBps", "floor_ms_per_token")
SESSION = 0


# ----------------------------------------------------------------------------- helpers

def now_s() -> float:
    return time.perf_counter()


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def percentile(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def rnd(x, n=4):
    return None if x is None else round(float(x), n)


def gpu_slug(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu-{platform.machine() or 'unknown'}"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def closing_backend(be, device: str):
    """Use a backend, then close it and give its device memory back, whatever happened."""
    try:
        yield be
    finally:
        try:
            be.close()
        finally:
            del be
            free_memory(device)


def free_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:
            pass


def cuda_alive(device: str) -> bool:
    """False when the CUDA context is poisoned (sticky error): every later op would fail."""
    if not device.startswith("cuda"):
        return True
    try:
        torch.cuda.synchronize()
        x = torch.ones(4, device=device)
        return float((x + 1).sum().item()) == 8.0
    except Exception:
        return False


def call_filtered(fn, *args, **kwargs):
    """Call fn with only the keyword arguments its signature accepts (API drift tolerance)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})


def prompt_ids(cfg, n: int, seed: int = 0) -> list[int]:
    """A seeded random prompt of n ids (as the orchestrator's --prompt-len does)."""
    g = torch.Generator().manual_seed(seed * 1000003 + n)
    hi = max(4, min(int(cfg.vocab_size), 32000))
    return torch.randint(3, hi, (n,), generator=g).tolist()


def hf_config_from(cfg):
    """A transformers LlamaConfig with the shapes of a Case4 ModelConfig."""
    from transformers import LlamaConfig
    theta = float(getattr(cfg, "rope_theta", 10000.0))
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=int(cfg.max_seq_len), rms_norm_eps=float(cfg.rms_norm_eps),
              tie_word_embeddings=bool(cfg.tie_word_embeddings), hidden_act="silu",
              attention_bias=False, mlp_bias=False, bos_token_id=getattr(cfg, "bos_token_id", None),
              eos_token_id=(list(getattr(cfg, "eos_token_ids", ()) or ()) or None), pad_token_id=0,
              rope_parameters={"rope_type": "default", "rope_theta": theta})
    rd = getattr(cfg, "rotary_dim", cfg.head_dim)
    if rd != cfg.head_dim:
        kw["partial_rotary_factor"] = rd / cfg.head_dim
    try:
        return LlamaConfig(**kw)
    except TypeError:  # older transformers: rope_theta instead of rope_parameters
        kw.pop("rope_parameters")
        kw["rope_theta"] = theta
        return LlamaConfig(**kw)


class Deadline:
    def __init__(self, budget_s: float, start: float | None = None):
        self.start = start if start is not None else now_s()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return now_s() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def expired(self) -> bool:
        return self.left() <= 0


class RowSkipped(Exception):
    pass


class _FakeContextLost(RuntimeError):
    pass


def test_hook(system: str, args) -> None:
    """Tests only: CASE4_BENCH_TEST_DEAD=<system> fakes a lost CUDA context in that row (in the
    first process); CASE4_BENCH_TEST_HANG=<system> makes that row hang (watchdog test)."""
    if os.environ.get("CASE4_BENCH_TEST_DEAD") == system and not args.child_plan:
        raise _FakeContextLost("fake sticky CUDA error (test hook)")
    if os.environ.get("CASE4_BENCH_TEST_HANG") == system:
        time.sleep(1e6)


# ----------------------------------------------------------------------------- plan

def bad_input(msg: str) -> None:
    """One line on stderr, exit code 2 (the project's convention for bad input)."""
    print(f"bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_shapes(spec: str | None, device: str, quick: bool) -> list[tuple[str, str]]:
    if not spec:
        if not device.startswith("cuda"):
            spec = "tiny"
        elif quick:
            spec = "llama2-7b:float16,smollm2-135m:float16"
        else:
            spec = "llama2-7b:float16,smollm2-135m:float16,llama2-7b:bfloat16"
    from custom_kernels.config import SYNTHETIC_SHAPES
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, dt = part.partition(":")
        if name not in SYNTHETIC_SHAPES:
            bad_input(f"unknown shape {name!r} in --shapes (choose from {', '.join(SYNTHETIC_SHAPES)})")
        if dt:
            if dt.lower() not in DTYPE_ALIASES:
                bad_input(f"unknown dtype {dt!r} in --shapes (use fp16, bf16 or fp32)")
            dts = [DTYPE_ALIASES[dt.lower()]]
        elif name == "llama2-7b" and device.startswith("cuda"):
            dts = ["float16"] if quick else ["float16", "bfloat16"]
        else:
            dts = ["float16" if device.startswith("cuda") else "float32"]
        for d in dts:
            if (name, d) not in out:
                out.append((name, d))
    return out


def system_selected(system: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(system, p) or system == p or system.startswith(p.rstrip("/") + "/")
               for p in patterns)


def build_plan(args) -> list[dict]:
    pats = [p.strip() for p in args.systems.split(",")] if args.systems else None
    plan: list[dict] = []

    def add(system, shape, dtype, prompt, **extra):
        if system_selected(system, pats):
            plan.append(dict(system=system, shape=shape, dtype=dtype, prompt=prompt, **extra))

    for shape, dtype in args.shape_list:
        for sysname in CASE4_DECODE:
            add(sysname, shape, dtype, args.prompt, steps=args.steps)
        for p in args.ttft_prompt_list:
            add("case4/prefill", shape, dtype, p)
        add("hf/eager", shape, dtype, args.prompt, steps=args.hf_steps or args.steps)
        add("hf/static-compile", shape, dtype, args.prompt, steps=args.hf_steps or args.steps)
    for shape, dtype in args.shape_list:  # the slow oracle last
        add("case4/reference", shape, dtype, args.prompt, steps=args.reference_steps)
    return plan


# ----------------------------------------------------------------------------- the bench

class Bench:
    def __init__(self, args, deadline: Deadline, copy_GBps: float | None = None, rows_file: Path | None = None):
        self.args = args
        self.device = args.device
        self.deadline = deadline
        self.copy_GBps = copy_GBps
        self.rows_file = rows_file          # child mode: append each row as a JSON line
        self.rows: list[dict] = []
        self._model_key = None
        self._model = None
        self.on_row = None                  # callback after each row (rewrite outputs)
        self.current = None                 # the item being measured (for the watchdog)
        self.gemm_TFLOPs = None

    # -- model cache: one Case4 model per (shape, dtype), shared by the case4 rows
    def case4_model(self, shape: str, dtype: str):
        key = (shape, dtype)
        if self._model_key == key and self._model is not None:
            return self._model
        self.drop_model()
        from server.models import resolve_model
        t0 = now_s()
        self._model = call_filtered(resolve_model, f"synthetic:{shape}", dtype=dtype, device=self.device,
                                    seed=self.args.seed, max_seq=self.args.max_seq)
        self._model_key = key
        self._model_load_s = now_s() - t0
        return self._model

    def drop_model(self) -> None:
        self._model, self._model_key = None, None
        free_memory(self.device)

    def cfg_of(self, shape: str):
        if self._model is not None and self._model_key and self._model_key[0] == shape:
            return self._model.cfg
        return floors.shape_config(shape)

    # -- row bookkeeping
    def base_row(self, item: dict) -> dict:
        row = {k: None for k in ROW_KEYS}
        row.update({k: item.get(k) for k in ("system", "shape", "dtype", "prompt", "steps")})
        return row

    def add_bytes(self, row: dict, cfg, steps: int) -> None:
        if row.get("ms_per_token") is None or cfg is None:
            return
        b = floors.bytes_per_token(cfg, row["dtype"], row["prompt"], steps)
        row["bytes_per_token"] = int(b)
        row["weight_bytes_per_token"] = floors.weight_bytes_per_token(cfg, row["dtype"])
        ms = row["ms_per_token"]
        row["achieved_GBps"] = rnd(b / (ms / 1e3) / 1e9, 2) if ms else None
        if self.copy_GBps:
            row["bw_fraction"] = rnd(row["achieved_GBps"] / self.copy_GBps, 5) if ms else None
            row["floor_ms_per_token"] = rnd(floors.floor_ms(b, self.copy_GBps), 4)

    def emit(self, row: dict, echo: bool = True) -> None:
        self.rows.append(row)
        if self.rows_file is not None:
            with open(self.rows_file, "a") as f:
                f.write(json.dumps(row) + "\n")
        if echo:
            print(report.compact_line(row), flush=True)
        if self.on_row:
            try:
                self.on_row()
            except Exception as e:  # never lose the run to a report bug
                print(f"bench: writing results failed: {e!r}", file=sys.stderr)

    def run_item(self, item: dict) -> bool:
        """Measure one row; returns False when the CUDA context is dead afterwards."""
        row = self.base_row(item)
        est = self.estimate_s(item)
        if self.deadline.expired() or (est and self.deadline.left() < est and not self.args.ignore_estimates):
            row["skipped"] = (f"time budget: {self.deadline.left():.0f} s left"
                              + (f", row needs ~{est:.0f} s" if est else ""))
            self.emit(row)
            return True
        self.current = item
        print(f"bench: {item['system']} {item['shape']} {item['dtype']} prompt={item['prompt']} "
              f"({self.deadline.elapsed():.0f}/{self.deadline.budget_s:.0f} s)", flush=True)
        t0 = now_s()
        if self.device.startswith("cuda"):
            try:
                torch.cuda.reset_peak_memory_stats()
            except Exception:
                pass
        alive = True
        try:
            fn = self.dispatch(item["system"])
            test_hook(item["system"], self.args)
            fn(item, row)
        except RowSkipped as e:
            row["skipped"] = str(e)
        except Exception as e:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            row["error"] = f"{type(e).__name__}: {e}"[:800]
            row["traceback"] = tb[-2000:]
            alive = cuda_alive(self.device) and not isinstance(e, _FakeContextLost)
            if not alive:
                row["error"] += " [CUDA context lost: later rows run in a fresh process]"
            self.drop_model()  # a failed row may leave a half-built backend: reload next time
        self.current = None
        row["wall_s"] = rnd(now_s() - t0, 2)
        if self.device.startswith("cuda") and alive:
            try:
                row["peak_mem_GB"] = rnd(torch.cuda.max_memory_allocated() / 1e9, 3)
            except Exception:
                pass
        self.emit(row)
        return alive

    def estimate_s(self, item: dict) -> float:
        """Rough cost of rows that cannot be cut short, to skip them rather than overrun."""
        big = item["shape"] not in ("tiny", "tiny-mha", "tiny-partial", "smollm2-135m")
        if item["system"] == "hf/static-compile" and self.device.startswith("cuda"):
            return 150.0 if big else 70.0
        if item["system"] == "hf/eager" and self.device.startswith("cuda"):
            return 40.0 if big else 15.0
        return 0.0

    def dispatch(self, system: str):
        if system == "copy":
            return self.row_copy
        if system == "gemm":
            return self.row_gemm
        if system in CASE4_DECODE:
            return self.row_case4
        return {"case4/prefill": self.row_prefill, "case4/reference": self.row_reference,
                "hf/eager": self.row_hf, "hf/static-compile": self.row_hf}[system]

    # ------------------------------------------------------------------ copy
    def row_copy(self, item: dict, row: dict) -> None:
        dev = self.device
        nbytes = int(self.args.copy_gib * (1 << 30)) if dev.startswith("cuda") else int(self.args.cpu_copy_mib * (1 << 20))
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        times = []
        for i in range(self.args.copy_warmup + self.args.copy_repeats):
            if dev.startswith("cuda"):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src)
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                t0 = now_s()
                dst.copy_(src)
                ms = (now_s() - t0) * 1e3
            if i >= self.args.copy_warmup:
                times.append(ms)
        if not torch.equal(dst[:1 << 20], src[:1 << 20]) or not torch.equal(dst[-(1 << 20):], src[-(1 << 20):]):
            raise RuntimeError("copy check failed: destination differs from source")
        del src, dst
        free_memory(dev)
        ms = median(times)
        gbps = 2 * nbytes / (ms / 1e3) / 1e9
        self.copy_GBps = gbps
        row.update(copy_bytes=nbytes, ms=rnd(ms, 4), copy_GBps=rnd(gbps, 1), repeats=len(times),
                   min_ms=rnd(min(times), 4), max_ms=rnd(max(times), 4),
                   note="(read+write bytes)/time, median of repeats" + (", CUDA events" if dev.startswith("cuda") else ""))

    # ------------------------------------------------------------------ gemm (compute ceiling, for prefill/TTFT)
    def row_gemm(self, item: dict, row: dict) -> None:
        dev = self.device
        cuda = dev.startswith("cuda")
        n = self.args.gemm_n if cuda else 256
        dt = torch.float16 if cuda else torch.float32
        g = torch.Generator(device=dev).manual_seed(1)
        a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        times = []
        for i in range(3 + 10):
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                c = a @ b
                e1.record()
                e1.synchronize()
                ms = e0.elapsed_time(e1)
            else:
                t0 = now_s()
                c = a @ b
                ms = (now_s() - t0) * 1e3
            if i >= 3:
                times.append(ms)
        ref = (a[:4].double() @ b.double())
        err = float((c[:4].double() - ref).norm() / ref.norm())
        del a, b, c, ref
        free_memory(dev)
        ms = median(times)
        self.gemm_TFLOPs = 2 * n ** 3 / (ms / 1e3) / 1e12
        row.update(dtype=str(dt).replace("torch.", ""), gemm_n=n, ms=rnd(ms, 4), gemm_TFLOPs=rnd(self.gemm_TFLOPs, 3),
                   rel_err=rnd(err, 6), repeats=len(times), note="n x n x n matmul, median, random inputs")

    # ------------------------------------------------------------------ case4 decode
    def make_case4_backend(self, model, mode: str):
        from server.backends import make_backend
        name = self.args.case4_backend
        return call_filtered(make_backend, name, model, sessions=1, device=self.device, graph_mode=mode,
                             gemm=self.args.gemm)

    def graph_stats(self, be) -> dict:
        try:
            st = be.status() or {}
        except Exception as e:
            return {"status_error": repr(e)}
        g = st.get("graphs") if isinstance(st, dict) else None
        return dict(g) if isinstance(g, dict) else {}

    def decode_once(self, be, ids: list[int], mode: str, sampling: str, steps: int) -> dict:
        """reset, prefill (TTFT), [pre-capture], then `steps` decode steps. Times in ms."""
        from case4_sampling import SamplingParams
        be.reset(SESSION)
        t0 = now_s()
        logits = be.prefill(SESSION, ids)
        tok = int(torch.argmax(logits))
        ttft = (now_s() - t0) * 1e3
        graphs = mode == "exact" and getattr(be, "supports_graphs", False)
        out = {"ttft_ms": ttft}
        try:
            if graphs:
                w = min(self.args.window, steps)
                t1 = now_s()
                be.bg_capture_start(SESSION, self.args.window)
                call_filtered(be.wait_precapture, SESSION, w, timeout_s=self.args.precapture_timeout_s)
                out["precapture_ms"] = (now_s() - t1) * 1e3
                out["precapture_count"] = w
            toks, per_tok = [], []
            if sampling == "device":
                t1 = now_s()
                toks = list(be.generate(SESSION, tok, steps, SamplingParams()))
                total = (now_s() - t1) * 1e3
            else:
                step_fn = be.step if mode == "none" else None
                t1 = now_s()
                for _ in range(steps):
                    ts = now_s()
                    lg = step_fn(SESSION, tok) if step_fn else be.replay(SESSION, be.seq_len(SESSION), tok)
                    tok = int(torch.argmax(lg))
                    per_tok.append((now_s() - ts) * 1e3)
                    toks.append(tok)
                total = (now_s() - t1) * 1e3
            if len(toks) != steps:
                raise RuntimeError(f"decode returned {len(toks)} tokens, expected {steps}")
            out.update(total_ms=total, per_tok=per_tok, tokens=toks)
        finally:
            if graphs:
                try:
                    be.bg_capture_stop()
                except Exception:
                    pass
        return out

    def row_case4(self, item: dict, row: dict) -> None:
        _, mode, sampling = item["system"].split("/")
        if self.args.case4_backend == "cuda" and not self.device.startswith("cuda"):
            raise RowSkipped("needs a CUDA device (the cuda backend)")
        model = self.case4_model(item["shape"], item["dtype"])
        cfg = model.cfg
        steps = int(item["steps"])
        if item["prompt"] + steps + self.args.warmup_steps >= cfg.max_seq_len:
            raise RowSkipped(f"prompt + steps exceed the context of {cfg.max_seq_len}")
        ids = prompt_ids(cfg, item["prompt"], self.args.seed)
        with closing_backend(self.make_case4_backend(model, mode), self.device) as be:
            row["backend"] = getattr(be, "name", self.args.case4_backend)
            g0 = self.graph_stats(be)
            self.decode_once(be, ids, mode, sampling, self.args.warmup_steps)   # warm-up
            runs = []
            for r in range(self.args.repeats):
                if runs and self.deadline.expired():
                    row["note"] = f"stopped after {len(runs)} repeats: time budget"
                    break
                runs.append(self.decode_once(be, ids, mode, sampling, steps))
            g1 = self.graph_stats(be)
        per_run = [r["total_ms"] / steps for r in runs]
        ms = median(per_run)
        row.update(repeats=len(runs), ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2),
                   ttft_ms=rnd(median([r["ttft_ms"] for r in runs]), 3),
                   ms_per_token_runs=[rnd(x) for x in per_run],
                   first_tokens=runs[0]["tokens"][:16], tokens_identical_across_repeats=all(
                       r["tokens"] == runs[0]["tokens"] for r in runs))
        if sampling == "client":
            allt = [t for r in runs for t in r["per_tok"]]
            row.update(p50_ms=rnd(percentile(allt, 50)), p99_ms=rnd(percentile(allt, 99)))
        else:
            row["latency_note"] = "device sampling: all steps in one call, p50/p99 per token not observable"
        if mode in ("exact", "dynamic"):  # dynamic: the capture of its one (or K-step) graph
            self.add_graph_fields(row, g0, g1, runs)
        self.add_bytes(row, cfg, steps)

    def add_graph_fields(self, row: dict, g0: dict, g1: dict, runs: list[dict]) -> None:
        row["graphs"] = g1 or None
        if not g1:
            row["graphs_note"] = "backend status() has no graph stats"
            return
        for k in ("capture_ms_p50", "capture_ms_p99", "instantiate_ms_p50", "captured", "live", "misses"):
            if k in g1:
                row[k] = g1[k]
        cap = g1.get("capture_ms_p50")
        inst = g1.get("instantiate_ms_p50")
        if cap is not None:
            per_graph = float(cap) + (float(inst) if inst is not None and self.args.capture_includes_instantiate else 0.0)
            row["capture_ms_per_graph"] = rnd(per_graph)
            row["graphs_per_s"] = rnd(1e3 / per_graph, 1) if per_graph > 0 else None
            if row.get("ms_per_token"):
                row["capture_over_replay"] = rnd(per_graph / row["ms_per_token"], 3)
        if "misses" in g1:
            try:
                row["misses_during_row"] = int(g1["misses"]) - int(g0.get("misses", 0) or 0)
            except (TypeError, ValueError):
                pass
        pc = [r.get("precapture_ms") for r in runs if r.get("precapture_ms") is not None]
        if pc:
            row["precapture_ms"] = rnd(median(pc), 2)
            row["precapture_count"] = runs[0].get("precapture_count")

    # ------------------------------------------------------------------ case4 prefill (TTFT)
    def row_prefill(self, item: dict, row: dict) -> None:
        if self.args.case4_backend == "cuda" and not self.device.startswith("cuda"):
            raise RowSkipped("needs a CUDA device (the cuda backend)")
        model = self.case4_model(item["shape"], item["dtype"])
        if item["prompt"] + 1 >= model.cfg.max_seq_len:
            raise RowSkipped(f"prompt exceeds the context of {model.cfg.max_seq_len}")
        ids = prompt_ids(model.cfg, item["prompt"], self.args.seed)
        with closing_backend(self.make_case4_backend(model, "none"), self.device) as be:
            row["backend"] = getattr(be, "name", self.args.case4_backend)
            times = []
            for r in range(1 + self.args.ttft_repeats):  # first is warm-up
                be.reset(SESSION)
                t0 = now_s()
                logits = be.prefill(SESSION, ids)
                int(torch.argmax(logits))
                if r:
                    times.append((now_s() - t0) * 1e3)
                if times and self.deadline.expired():
                    break
        row.update(repeats=len(times), ttft_ms=rnd(median(times), 3), ttft_min_ms=rnd(min(times), 3),
                   note="be.prefill incl. last-position logits to host + argmax")

    # ------------------------------------------------------------------ reference backend
    def row_reference(self, item: dict, row: dict) -> None:
        model = self.case4_model(item["shape"], item["dtype"])
        from server.backends import make_backend
        steps = int(item["steps"])
        ids = prompt_ids(model.cfg, item["prompt"], self.args.seed)
        with closing_backend(call_filtered(make_backend, "reference", model, sessions=1, device=self.device), self.device) as be:
            row["backend"] = getattr(be, "name", "reference")
            self.decode_once(be, ids, "none", "client", min(4, steps))   # warm-up
            run = self.decode_once(be, ids, "none", "client", steps)
        ms = run["total_ms"] / steps
        row.update(repeats=1, ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2), ttft_ms=rnd(run["ttft_ms"], 3),
                   p50_ms=rnd(percentile(run["per_tok"], 50)), p99_ms=rnd(percentile(run["per_tok"], 99)),
                   first_tokens=run["tokens"][:16], note="be.step per token + host argmax")
        self.add_bytes(row, model.cfg, steps)

    # ------------------------------------------------------------------ HF transformers
    def build_hf(self, cfg, dtype: str):
        from transformers import LlamaForCausalLM
        hcfg = hf_config_from(cfg)
        dt = getattr(torch, dtype)
        torch.manual_seed(self.args.seed)
        with torch.device(self.device):
            try:
                model = LlamaForCausalLM._from_config(hcfg, dtype=dt)
            except TypeError:
                model = LlamaForCausalLM._from_config(hcfg, torch_dtype=dt)
        model = model.to(device=self.device, dtype=dt).eval()
        gc_ = model.generation_config
        gc_.pad_token_id = 0
        gc_.eos_token_id = None   # random weights: never stop early (min_new_tokens too)
        gc_.bos_token_id = None
        return model

    def row_hf(self, item: dict, row: dict) -> None:
        static = item["system"] == "hf/static-compile"
        dev = self.device
        if static and not dev.startswith("cuda") and not self.args.hf_compile_cpu:
            raise RowSkipped("static cache + compile is a CUDA row (--hf-compile-cpu to force)")
        self.drop_model()   # the Case4 model's memory goes back before HF builds its own
        cfg = floors.shape_config(item["shape"])
        steps = int(item["steps"])
        model = self.build_hf(cfg, item["dtype"])
        try:
            ids = torch.tensor([prompt_ids(cfg, item["prompt"], self.args.seed)], device=dev)
            mask = torch.ones_like(ids)
            gen_kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
            if static:
                self.setup_hf_static(model, item["prompt"] + steps + 16, row)
            else:
                gen_kw["cache_implementation"] = None  # the default: DynamicCache

            def gen(n, streamer=None):
                sync(dev)
                t0 = now_s()
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **gen_kw)
                sync(dev)
                dt = (now_s() - t0) * 1e3
                if out.shape[1] != ids.shape[1] + n:
                    raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {n}")
                return dt, out

            t0 = now_s()
            warm = 2 if static else 1
            try:
                for _ in range(warm):
                    gen(steps)
                    gen(1)
            except Exception as e:
                if not (static and self.args.hf_compile == "auto" and self.args.hf_fullgraph_fallback):
                    raise
                # fullgraph=True failed (a graph break?): record it and retry once without fullgraph
                traceback.print_exc()
                row["fullgraph_error"] = f"{type(e).__name__}: {e}"[:500]
                try:
                    torch._dynamo.reset()
                except Exception:
                    pass
                if hasattr(model, "_compiled_call"):
                    del model._compiled_call
                model.generation_config.compile_config.fullgraph = False
                row["compile"] += " -> retried with fullgraph=False"
                for _ in range(warm):
                    gen(steps)
                    gen(1)
            row["warmup_s"] = rnd(now_s() - t0, 2)
            if static:
                row["compiled"] = bool(hasattr(model, "_compiled_call")) or self.args.hf_compile == "manual"
            tn, t1 = [], []
            out = None
            for r in range(self.args.hf_repeats):
                if tn and self.deadline.expired():
                    row["note"] = f"stopped after {len(tn)} repeats: time budget"
                    break
                d, out = gen(steps)
                tn.append(d)
                t1.append(gen(1)[0])
            ms = (median(tn) - median(t1)) / (steps - 1) if steps > 1 else median(tn)
            row.update(repeats=len(tn), ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2), ttft_ms=rnd(median(t1), 3),
                       generate_ms_N=rnd(median(tn), 2), generate_ms_1=rnd(median(t1), 2),
                       first_tokens=out[0, ids.shape[1]:ids.shape[1] + 16].tolist(),
                       timing="(t(generate N) - t(generate 1)) / (N-1), medians")
            if self.args.hf_latency and not self.deadline.expired():
                st = StampStreamer()
                gen(steps, st)
                d = st.token_intervals_ms()
                row.update(p50_ms=rnd(percentile(d, 50)), p99_ms=rnd(percentile(d, 99)),
                           latency_note="p50/p99 from one extra run with a timestamping streamer "
                                        "(generate copies each token to host for it)")
            self.add_bytes(row, cfg, steps)
        finally:
            del model
            if static:
                try:
                    torch._dynamo.reset()
                except Exception:
                    pass
            free_memory(dev)

    def setup_hf_static(self, model, max_cache_len: int, row: dict) -> None:
        gc_ = model.generation_config
        gc_.cache_implementation = "static"
        gc_.max_cache_len = max_cache_len   # one cache shape for N and 1 token: no recompile
        backend = self.args.hf_compile_backend
        mode = "reduce-overhead" if backend == "inductor" else None
        if self.args.hf_compile == "manual":
            # the brief's recipe: compile forward ourselves and keep generate from compiling again
            model.forward = torch.compile(model.forward, mode=mode, fullgraph=True, backend=backend)
            gc_.disable_compile = True
            row["compile"] = f"manual torch.compile(forward, mode={mode}, fullgraph=True, backend={backend})"
            return
        # transformers 5.x: generate() compiles the decode forward itself when the cache is
        # static (GenerationMixin._valid_auto_compile_criteria), configured by CompileConfig.
        from transformers import CompileConfig
        cc = CompileConfig(fullgraph=True, mode=mode, backend=backend)
        if not self.device.startswith("cuda"):
            cc._compile_all_devices = True
        gc_.compile_config = cc
        row["compile"] = f"transformers auto-compile: CompileConfig(fullgraph=True, mode={mode}, backend={backend})"


class StampStreamer:
    """A generate() streamer that records the host time each token arrives."""

    def __init__(self):
        self.stamps: list[float] = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 1:   # the prompt
            return
        self.stamps.append(now_s())

    def end(self):
        pass

    def token_intervals_ms(self) -> list[float]:
        s = self.stamps
        return [(b - a) * 1e3 for a, b in zip(s, s[1:])]


# ----------------------------------------------------------------------------- driver

def child_argv(args, plan_file: Path, rows_file: Path, budget_s: float, copy_GBps) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child-plan", str(plan_file), "--child-rows",
            str(rows_file), "--budget-s", f"{max(1.0, budget_s):.1f}", "--device", args.device]
    if copy_GBps:
        argv += ["--copy-GBps", repr(float(copy_GBps))]
    for k in ("steps", "repeats", "warmup_steps", "window", "precapture_timeout_s", "ttft_repeats", "hf_repeats",
              "reference_steps", "seed", "gemm", "case4_backend", "hf_compile", "hf_compile_backend"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    if args.max_seq:
        argv += ["--max-seq", str(args.max_seq)]
    for flag in ("hf_latency", "hf_compile_cpu", "ignore_estimates", "capture_includes_instantiate"):
        if getattr(args, flag):
            argv.append(f"--{flag.replace('_', '-')}")
    if not args.hf_fullgraph_fallback:
        argv.append("--no-hf-fullgraph-fallback")
    if not args.hf_latency:
        argv.append("--no-hf-latency")
    return argv


def run_in_children(args, items: list[dict], deadline: Deadline, copy_GBps, bench: Bench) -> None:
    """Run `items` in fresh processes (after the CUDA context died here)."""
    tmp = Path(tempfile.mkdtemp(prefix="case4-bench-"))
    remaining = list(items)
    n = 0
    while remaining:
        if deadline.expired():
            for it in remaining:
                row = bench.base_row(it)
                row["skipped"] = "time budget"
                bench.emit(row)
            return
        n += 1
        plan_file, rows_file = tmp / f"plan{n}.json", tmp / f"rows{n}.jsonl"
        plan_file.write_text(json.dumps(remaining))
        rows_file.write_text("")
        argv = child_argv(args, plan_file, rows_file, deadline.left(), copy_GBps)
        print(f"bench: running {len(remaining)} rows in a fresh process", flush=True)
        try:
            proc = subprocess.run(argv, timeout=max(30.0, deadline.left() + args.row_grace_s))
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        done = [json.loads(l) for l in rows_file.read_text().splitlines() if l.strip()]
        for row in done:
            bench.emit(row, echo=False)   # the child printed it already
        remaining = remaining[len(done):]
        if remaining and rc not in (0, 75):
            row = bench.base_row(remaining[0])
            row["error"] = f"child process died (exit {rc}) while running this row"
            bench.emit(row)
            remaining = remaining[1:]
    shutil.rmtree(tmp, ignore_errors=True)


def child_main(args) -> int:
    items = json.loads(Path(args.child_plan).read_text())
    bench = Bench(args, Deadline(args.budget_s), copy_GBps=args.copy_GBps, rows_file=Path(args.child_rows))
    for it in items:
        if not bench.run_item(it):
            return 75   # context lost: the parent starts another child for the rest
    return 0


def outputs_base(args, gpu: str) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d")
    return Path(args.out) / f"{gpu_slug(gpu)}-{date}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child_plan:
        return child_main(args)
    t_start = now_s()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("bench: no CUDA device visible; use --device cpu", file=sys.stderr)
        return 2
    gpu = device_name(dev)
    out_base = outputs_base(args, gpu)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    deadline = Deadline(args.budget_s, t_start)

    meta = {
        "gpu": gpu, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__, "copy_GBps": args.copy_GBps,
        "cuda": getattr(torch.version, "cuda", None), "transformers": _version("transformers"),
        "device": dev, "host": platform.node(), "python": platform.python_version(),
        "reference_copy_GBps": floors.REFERENCE_COPY_GBPS,
        "args": {k: v for k, v in vars(args).items() if k not in ("shape_list", "ttft_prompt_list")},
        "shapes": [f"{s}:{d}" for s, d in args.shape_list],
    }
    meta["floors"] = {}
    for s, d in args.shape_list:
        try:
            cfg = floors.shape_config(s)
            meta["floors"][f"{s}:{d}"] = {
                "weight_bytes_per_token": floors.weight_bytes_per_token(cfg, d),
                "all_params_bytes": floors.all_params_bytes(cfg, d),
                "kv_bytes_per_position": floors.kv_bytes_per_position(cfg, d),
                "bytes_per_token": int(floors.bytes_per_token(cfg, d, args.prompt, args.steps)),
                "floor_ms_at_reference_copy": rnd(floors.floor_ms(
                    floors.bytes_per_token(cfg, d, args.prompt, args.steps), floors.REFERENCE_COPY_GBPS), 4)}
        except Exception as e:
            meta["floors"][f"{s}:{d}"] = {"error": repr(e)}

    bench = Bench(args, deadline, copy_GBps=args.copy_GBps)
    lock = threading.Lock()
    finished = threading.Event()

    def write(final=False, status="running"):
        with lock:
            m = dict(meta, copy_GBps=rnd(bench.copy_GBps, 1) if bench.copy_GBps else None,
                     gemm_TFLOPs=rnd(bench.gemm_TFLOPs, 3) if bench.gemm_TFLOPs else None,
                     elapsed_s=rnd(now_s() - t_start, 1), status=status)
            paths = report.write_outputs(out_base, m, bench.rows, png=final)
            return paths

    bench.on_row = write

    def watchdog():
        hard = args.budget_s + args.row_grace_s
        while not finished.wait(1.0):
            if now_s() - t_start > hard:
                print(f"bench: watchdog: {hard:.0f} s passed, writing results and exiting", file=sys.stderr,
                      flush=True)
                try:
                    cur = bench.current
                    if cur is not None:
                        row = bench.base_row(cur)
                        row["error"] = f"hung: still running when the watchdog fired at {hard:.0f} s"
                        bench.rows.append(row)
                    started = {(r.get("system"), r.get("shape"), r.get("dtype"), r.get("prompt")) for r in bench.rows}
                    for it in plan:
                        if (it["system"], it["shape"], it["dtype"], it["prompt"]) not in started:
                            row = bench.base_row(it)
                            row["skipped"] = "watchdog: the run was stopped"
                            bench.rows.append(row)
                    write(final=True, status=f"killed by watchdog after {hard:.0f} s (a row hung)")
                finally:
                    os._exit(3)

    plan = build_plan(args)
    if not args.skip_gemm:
        plan.insert(0, dict(system="gemm", shape=None, dtype=None, prompt=None))
    if not args.skip_copy:
        plan.insert(0, dict(system="copy", shape=None, dtype=None, prompt=None))
    threading.Thread(target=watchdog, daemon=True).start()
    print(f"bench: {gpu}, torch {torch.__version__}, {len(plan)} rows, budget {args.budget_s:.0f} s", flush=True)
    for i, item in enumerate(plan):
        alive = bench.run_item(item)
        if not alive:
            bench.drop_model()
            run_in_children(args, plan[i + 1:], deadline, bench.copy_GBps, bench)
            break
    finished.set()
    paths = write(final=True, status="complete")
    print()
    print(report.compact_table(dict(meta, copy_GBps=bench.copy_GBps), bench.rows))
    print(f"\nbench: wrote {', '.join(str(p) for p in paths)}  ({now_s() - t_start:.0f} s)")
    if args.commit_results:
        dest = ROOT / "bench" / "results"
        dest.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copy2(p, dest / Path(p).name)
        print(f"bench: copied results into {dest}")
    return 0


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Case4 side-by-side batch-1 decode benchmark",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="output/bench", help="output folder")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--quick", action="store_true", help="short run: 64 steps, 1 repeat, fp16 shapes, TTFT at 512")
    ap.add_argument("--systems", default=None,
                    help=f"comma list of systems or globs (e.g. 'case4/*/device,hf/eager'); all: {','.join(ALL_SYSTEMS)}")
    ap.add_argument("--shapes", default=None,
                    help="comma list of synthetic shapes, each optionally :fp16/:bf16/:fp32 "
                         "(default GPU: llama2-7b:fp16,smollm2-135m:fp16,llama2-7b:bf16; CPU: tiny)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="rows not started after this are skipped")
    ap.add_argument("--row-grace-s", type=float, default=90.0,
                    help="watchdog: exit (writing results) at budget + this, if a row hangs")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length of the decode rows")
    ap.add_argument("--steps", type=int, default=None, help="decode steps per timed run (default 256; quick 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per case4 row, median (default 3; quick 1)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up run (default 32; quick 8)")
    ap.add_argument("--ttft-prompts", default=None, help="TTFT prompt lengths (default 128,512,2048; quick 512)")
    ap.add_argument("--ttft-repeats", type=int, default=5)
    ap.add_argument("--hf-steps", type=int, default=None, help="decode steps of HF rows (default: --steps)")
    ap.add_argument("--hf-repeats", type=int, default=None, help="default 2; quick 1")
    ap.add_argument("--hf-latency", dest="hf_latency", action="store_true", default=None,
                    help="one extra HF run with a timestamping streamer for p50/p99 (default on; off with --quick)")
    ap.add_argument("--no-hf-latency", dest="hf_latency", action="store_false")
    ap.add_argument("--hf-compile", choices=("auto", "manual"), default="auto",
                    help="auto: transformers' generate() compiles the static-cache decode (CompileConfig); "
                         "manual: model.forward = torch.compile(...)")
    ap.add_argument("--hf-compile-backend", default="inductor", help="torch.compile backend for hf/static-compile")
    ap.add_argument("--hf-compile-cpu", action="store_true", help="run hf/static-compile on CPU too (tests)")
    ap.add_argument("--no-hf-fullgraph-fallback", dest="hf_fullgraph_fallback", action="store_false",
                    help="do not retry hf/static-compile with fullgraph=False when fullgraph=True fails")
    ap.add_argument("--reference-steps", type=int, default=32, help="decode steps of the slow reference row")
    ap.add_argument("--window", type=int, default=64, help="exact mode: capture window (bg_capture_start)")
    ap.add_argument("--precapture-timeout-s", type=float, default=60.0)
    ap.add_argument("--capture-includes-instantiate", action="store_true",
                    help="capture_ms_per_graph = capture_ms_p50 + instantiate_ms_p50 (when status reports them apart)")
    ap.add_argument("--gemm", default="custom", help="make_backend(gemm=...): custom or cublas")
    ap.add_argument("--case4-backend", default="cuda",
                    help="backend of the case4/<mode>/* rows (reference: exercise the rows on CPU in tests)")
    ap.add_argument("--max-seq", type=int, default=None, help="resolve_model(max_seq=...) cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--copy-gib", type=float, default=2.0, help="copy row size (source), GiB")
    ap.add_argument("--cpu-copy-mib", type=float, default=256.0, help="copy row size on CPU, MiB")
    ap.add_argument("--copy-repeats", type=int, default=20)
    ap.add_argument("--copy-warmup", type=int, default=3)
    ap.add_argument("--copy-GBps", type=float, default=None, help="use this ceiling instead of measuring (--skip-copy)")
    ap.add_argument("--skip-copy", action="store_true")
    ap.add_argument("--skip-gemm", action="store_true", help="skip the fp16 matmul ceiling row")
    ap.add_argument("--gemm-n", type=int, default=8192, help="gemm row size (n x n x n) on CUDA")
    ap.add_argument("--ignore-estimates", action="store_true",
                    help="start slow rows (HF compile) even when their estimate exceeds the time left")
    ap.add_argument("--commit-results", action="store_true", help="also copy the outputs into bench/results/")
    ap.add_argument("--child-plan", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-rows", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    q = a.quick
    a.steps = a.steps or (64 if q else 256)
    a.repeats = a.repeats or (1 if q else 3)
    a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else (8 if q else 32)
    a.hf_repeats = a.hf_repeats or (1 if q else 2)
    if a.hf_latency is None:
        a.hf_latency = not q
    if a.ttft_prompts is None:
        a.ttft_prompts = "512" if q else "128,512,2048"
    a.ttft_prompt_list = [int(x) for x in a.ttft_prompts.split(",") if x.strip()]
    a.shape_list = parse_shapes(a.shapes, a.device, q)
    if a.copy_GBps and not a.child_plan:
        a.skip_copy = True
    if a.steps < 2:
        ap.error("--steps must be at least 2")
    return a


if __name__ == "__main__":
    raise SystemExit(main())
