"""Shared pieces of the decode benchmark (bench/decode.py): the row names and keys,
statistics and device helpers, the seeded prompt, the time budget (Deadline), and the
test hooks that fake a lost CUDA context or a hung row."""
from __future__ import annotations

import contextlib
import gc
import inspect
import os
import platform
import re
import statistics
import time

import torch

CASE4_DECODE = [f"case4/{m}/{s}" for m in ("exact", "dynamic", "none") for s in ("device", "client")]
# the server's hf backend (transformers inside Case4's server, its own caches), one row per --attn
CASE4_HF = [f"case4-hf/{a}" for a in ("sdpa", "eager", "flash2", "xformers")]
# weight-only quantized peers built from PyTorch's own operators (bench/rows_torch_quant.py; issue 26)
TORCH_QUANT = ["torch/int8-compile", "torch/int4-tinygemm"]
ALL_SYSTEMS = (["copy", "gemm"] + CASE4_DECODE + CASE4_HF + ["case4/prefill", "hf/eager", "hf/static-compile"]
               + TORCH_QUANT + ["case4/reference"])
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "float16": "float16", "bf16": "bfloat16",
                 "bfloat16": "bfloat16", "fp32": "float32", "float": "float32", "float32": "float32"}
ROW_KEYS = ("system", "shape", "dtype", "quant", "prompt", "steps", "repeats", "tok_s", "ms_per_token", "p50_ms",
            "p99_ms", "ttft_ms", "bw_fraction", "bytes_per_token", "achieved_GBps", "floor_ms_per_token")
SESSION = 0


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


class FakeContextLost(RuntimeError):
    pass


def test_hook(system: str, args) -> None:
    """Tests only: CASE4_BENCH_TEST_DEAD=<system> fakes a lost CUDA context in that row (in the
    first process); CASE4_BENCH_TEST_HANG=<system> makes that row hang (watchdog test)."""
    if os.environ.get("CASE4_BENCH_TEST_DEAD") == system and not args.child_plan:
        raise FakeContextLost("fake sticky CUDA error (test hook)")
    if os.environ.get("CASE4_BENCH_TEST_HANG") == system:
        time.sleep(1e6)
