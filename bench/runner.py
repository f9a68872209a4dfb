"""How the decode benchmark runs its rows: `Bench` measures one row at a time, each in its
own try/except, under the time budget (a row that would overrun is skipped); after a lost
CUDA context the remaining rows run in fresh child processes of bench/decode.py; a
watchdog thread writes the results and exits when a row hangs past the budget. The rows
themselves are the mixins of rows_ceilings.py, rows_case4.py and rows_hf.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import torch

import floors  # bench/floors.py
import report  # bench/report.py
from common import (CASE4_DECODE, CASE4_HF, ROW_KEYS, TORCH_QUANT, Deadline, FakeContextLost, RowSkipped, call_filtered, cuda_alive,
                    free_memory, now_s, rnd, test_hook)
from rows_case4 import Case4Rows
from rows_ceilings import CeilingRows
from rows_hf import HFRows
from rows_torch_quant import TorchQuantRows

DECODE_PY = Path(__file__).resolve().parent / "decode.py"  # the entry point the child processes run


class Bench(CeilingRows, Case4Rows, HFRows, TorchQuantRows):
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

    # -- model cache: one Case4 model per (shape, dtype, quant), shared by the case4 rows
    def case4_model(self, shape: str, dtype: str, item: dict | None = None):
        """The synthetic model of a row; a quantized row's (item quant_mode / quant_group) is drawn quantized
        in place (resolve_model(quant=, group=): no fp16 copy of its matrices). A model that cannot fit the
        device (check_fits) skips the row, saying what it needs."""
        item = item or {}
        key = (shape, dtype, item.get("quant"), item.get("model"))
        if self._model_key == key and self._model is not None:
            return self._model
        self.drop_model()
        from server.model.memory import ModelTooLarge
        from server.model.resolve import resolve_model
        t0 = now_s()
        try:  # a real file (--models) or a synthetic shape
            self._model = call_filtered(resolve_model, item.get("model") or f"synthetic:{shape}", dtype=dtype,
                                        device=self.device, seed=self.args.seed, max_seq=self.args.max_seq,
                                        quant=item.get("quant_mode"),
                                        group=item.get("quant_group"))
        except ModelTooLarge as e:   # check_fits (e.g. 70B without enough memory): the row says so
            raise RowSkipped(str(e)) from None
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
        row.update({k: item.get(k) for k in ("system", "shape", "dtype", "quant", "prompt", "steps")})
        if item.get("model"):
            row["model"] = item["model"]
        return row

    def add_bytes(self, row: dict, cfg, steps: int, quant_bytes: int | None = None) -> None:
        """bytes_per_token, achieved_GBps, bw_fraction, floor_ms_per_token. `quant_bytes`: a quantized
        row's matrix bytes, summed from the tensors it actually reads (ModelWeights.quant_bytes(), or a
        torch peer's own); the norms, one embedding row and the KV cache stay in the model dtype."""
        if row.get("ms_per_token") is None or cfg is None:
            return
        if quant_bytes is not None:
            w = quant_bytes + floors.dense_bytes_per_token(cfg, row["dtype"])
            row["quant_matrix_bytes"] = int(quant_bytes)
        else:
            w = floors.weight_bytes_per_token(cfg, row["dtype"])
        b = w + floors.mean_kv_bytes(cfg, row["dtype"], row["prompt"], steps)
        row["bytes_per_token"] = int(b)
        row["weight_bytes_per_token"] = int(w)
        ms = row["ms_per_token"]
        row["achieved_GBps"] = rnd(b / (ms / 1e3) / 1e9, 2) if ms else None
        if self.copy_GBps:
            # 5 significant digits (a CPU smoke run's fraction is far below 1e-5)
            row["bw_fraction"] = float(f"{b / (ms / 1e3) / 1e9 / self.copy_GBps:.5g}") if ms else None
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
            alive = cuda_alive(self.device) and not isinstance(e, FakeContextLost)
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
        if item["system"] in TORCH_QUANT and self.device.startswith("cuda"):
            return 60.0 if big else 30.0   # inductor compiles one layer and the head, then one CUDA graph
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
        if system in CASE4_HF:
            return self.row_case4_hf
        if system in TORCH_QUANT:
            return self.row_torch_quant
        return {"case4/prefill": self.row_prefill, "case4/reference": self.row_reference,
                "hf/eager": self.row_hf, "hf/static-compile": self.row_hf}[system]


def child_argv(args, plan_file: Path, rows_file: Path, budget_s: float, copy_GBps) -> list[str]:
    argv = [sys.executable, str(DECODE_PY), "--child-plan", str(plan_file), "--child-rows",
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


def start_watchdog(args, bench: Bench, plan: list[dict], t_start: float, write, finished: threading.Event) -> None:
    """A daemon thread: at budget + grace (a row hung), mark the hung row and the rows not
    started, write the results (write(final, status)) and exit the process with code 3."""
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
                    started = {(r.get("system"), r.get("shape"), r.get("dtype"), r.get("quant"), r.get("prompt"))
                               for r in bench.rows}
                    for it in plan:
                        if (it["system"], it["shape"], it["dtype"], it.get("quant"), it["prompt"]) not in started:
                            row = bench.base_row(it)
                            row["skipped"] = "watchdog: the run was stopped"
                            bench.rows.append(row)
                    write(final=True, status=f"killed by watchdog after {hard:.0f} s (a row hung)")
                finally:
                    os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
