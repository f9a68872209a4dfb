"""The side-by-side batch-1 decode benchmark (bench/README.md, docs/performance.md; issue 6).

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

With --models (default on a GPU: the built-in smollm2 GGUF) the case4 decode rows and a prefill run on real
weights too: each GGUF file on its own blocks (quant "gguf": Q4_1/Q4_0/Q8_0 repacked, no rounding) and on the
same weights dequantized to the model dtype (quant None), shape = the model's name (issue 26: "SmolLM2 GGUF Q4_1
on the GPU faster than its fp16 row").

With --quant (default on a GPU: int8,int4:128) the case4 rows above (and a 512-token case4/prefill) run again
on weights drawn quantized (a `quant` field in each row, bytes per token from the quantized tensors), beside
two peers built from PyTorch's own operators: torch/int8-compile and torch/int4-tinygemm (rows_torch_quant.py);
--big-quant (default on a GPU: llama2-70b:int4:128) adds a shape that only fits quantized (issue 26).

Every row is measured in its own try/except: a failure is recorded in the row as
{"error": ...} and the run goes on. If the CUDA context dies (a sticky error such as an
illegal address), the remaining rows run in fresh child processes of this script.
After --budget-s seconds, rows not yet started are recorded as skipped. Results are
rewritten after every row, so a killed run still leaves its rows behind.

Output: OUTDIR/<gpu-slug>-<yyyymmdd>.json, .md and .png (see bench/README.md);
--commit-results copies them into bench/results/.

This file is the entry point and its flags; the parts: plan.py (which rows), runner.py
(Bench, child processes, watchdog), rows_ceilings.py / rows_case4.py / rows_hf.py (the row
families), common.py (helpers, Deadline), floors.py (bytes per token), report.py (outputs).

  python bench/decode.py --out OUTDIR                  # full run (GPU)
  python bench/decode.py --out OUTDIR --quick          # short run
  python bench/decode.py --device cpu --shapes tiny --out /tmp/b   # CPU smoke run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import shutil
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import floors  # noqa: E402  (bench/floors.py)
import report  # noqa: E402  (bench/report.py)
from common import ALL_SYSTEMS, Deadline, device_name, gpu_slug, now_s, rnd  # noqa: E402
from plan import build_plan, builtin_gguf_installed, parse_big_quant, parse_models, parse_quant, parse_shapes  # noqa: E402,E501
from runner import Bench, child_main, run_in_children, start_watchdog  # noqa: E402


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
        "args": {k: v for k, v in vars(args).items()
                 if k not in ("shape_list", "ttft_prompt_list", "quant_list", "big_quant_list")},
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
    qshapes = list(dict.fromkeys(s for s, _ in args.shape_list))
    for s, q in [(s, q) for s in qshapes for q in args.quant_list] + list(args.big_quant_list):
        d = next((d for s2, d in args.shape_list if s2 == s), "float16")
        key = f"{s}:{d}:{q['quant']}"
        try:   # from the shapes (floors.quant_matrix_bytes); each row's own bytes come from its built tensors
            cfg = floors.shape_config(s)
            w = floors.quant_matrix_bytes(cfg, q["quant_mode"], q["quant_group"]) + floors.dense_bytes_per_token(cfg, d)
            b = w + floors.mean_kv_bytes(cfg, d, args.prompt, args.steps)
            meta["floors"][key] = {"weight_bytes_per_token": w, "bytes_per_token": int(b),
                                   "floor_ms_at_reference_copy": rnd(floors.floor_ms(b, floors.REFERENCE_COPY_GBPS), 4)}
        except Exception as e:
            meta["floors"][key] = {"error": repr(e)}

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

    plan = build_plan(args)
    if not args.skip_gemm:
        plan.insert(0, dict(system="gemm", shape=None, dtype=None, prompt=None))
    if not args.skip_copy:
        plan.insert(0, dict(system="copy", shape=None, dtype=None, prompt=None))
    start_watchdog(args, bench, plan, t_start, write, finished)
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
    ap.add_argument("--quant", default=None,
                    help="quantized rows (issue 26), comma list of int8 | int8:G | int4 | int4:G (G 32/64/128; int8 "
                         "without G: one scale a row; int4 without G: 128), 'none' for none: case4/<mode>/<sampling> "
                         "and a 512-token case4/prefill per mode, plus the torch/int8-compile and torch/int4-tinygemm "
                         "peers (default GPU: int8,int4:128; CPU: none)")
    ap.add_argument("--big-quant", default=None,
                    help="shape:quant rows of a model that only fits quantized, device sampling only "
                         "(default GPU: llama2-70b:int4:128; CPU: none)")
    ap.add_argument("--peer-shapes", default=None,
                    help="shapes that get the torch/* quantized peers (default GPU: llama2-7b; CPU: all)")
    ap.add_argument("--quant-ttft-prompt", type=int, default=512, help="prompt of the quantized case4/prefill rows")
    ap.add_argument("--models", default=None,
                    help="real GGUF files (or the built-in 'smollm2'), comma-separated: the case4 decode rows and a "
                         "--quant-ttft-prompt prefill on each file's own blocks (quant 'gguf') and on the same weights "
                         "dequantized to the model dtype (issue 26); default on a GPU: smollm2 when it is installed")
    ap.add_argument("--budget-s", type=float, default=None, help="rows not started after this are skipped (default 420; 480 with quantized rows)")
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
    gpu = a.device.startswith("cuda")
    if a.quant is None:
        a.quant = "int8,int4:128" if gpu else "none"
    if a.big_quant is None:
        a.big_quant = "llama2-70b:int4:128" if gpu and not q else ""
    if a.models is None:
        a.models = "smollm2" if gpu and builtin_gguf_installed() else ""
    a.model_list = parse_models(a.models)
    a.quant_list = parse_quant(a.quant)
    a.big_quant_list = parse_big_quant(a.big_quant)
    if a.peer_shapes is None and gpu:
        a.peer_shapes = "llama2-7b"
    a.peer_shapes = None if a.peer_shapes is None else [s.strip() for s in a.peer_shapes.split(",") if s.strip()]
    if a.budget_s is None:   # the quantized rows (7B int8/int4, the torch peers' compile, 70B) need room
        a.budget_s = 420.0 if not (a.quant_list or a.big_quant_list) or q else 480.0
    if a.copy_GBps and not a.child_plan:
        a.skip_copy = True
    if a.steps < 2:
        ap.error("--steps must be at least 2")
    return a


if __name__ == "__main__":
    raise SystemExit(main())

