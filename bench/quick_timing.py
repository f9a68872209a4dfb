"""Quick decode timing of the cuda backend (not a test): ms/token per graph mode and gemm,
per-kernel GEMV bandwidth for the 7B shapes against a measured device-to-device copy.

    python bench/quick_timing.py --out OUTDIR [--shapes smollm2-135m,llama2-7b]

A/B switches are the Engine's options by name (ext.EngineOptions, custom_kernels/csrc/step.h), written
`name=value+name=value` (e.g. `rope_in_qkv=0+step_skip=4`): --rows mode:gemm:pdl[:options],... and
--options for the timeline.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from case4_sampling import SamplingParams  # noqa: E402
from server.model.config import SYNTHETIC_SHAPES, ConfigError, with_max_seq  # noqa: E402
from custom_kernels.ext import load_extension  # noqa: E402
from server.model.weights import synthetic_weights  # noqa: E402
from server.cuda_backend import CudaBackend  # noqa: E402
from server.model.resolve import LoadedModel  # noqa: E402


def copy_bandwidth():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    a.random_(0, 255)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(10):
        e0.record(); b.copy_(a); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    return 2 * n / (ts[len(ts) // 2] / 1e3) / 1e9


def parse_options(ext, spec, pdl=None):
    """'name=value+...' (EngineOptions fields; '' or 'default': the defaults), plus pdl if given ->
    ext.EngineOptions"""
    kw = {} if pdl is None else {"pdl": int(pdl)}
    defaults = ext.EngineOptions()
    for item in filter(None, "" if spec == "default" else spec.split("+")):
        name, _, value = item.partition("=")
        if not hasattr(defaults, name):
            raise SystemExit(f"unknown engine option '{name}' (EngineOptions: {defaults})")
        kw[name] = bool(int(value)) if isinstance(getattr(defaults, name), bool) else int(value)
    return ext.EngineOptions(**kw)


def kernel_us(run, items, it=50) -> float:
    """Mean µs of run(item) over `it` launches rotating over `items` (more than L2 holds), after one warm-up
    launch each; timed with CUDA events on the current stream."""
    for item in items:
        run(item)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for i in range(it):
        run(items[i % len(items)])
    e1.record(); e1.synchronize()
    return e0.elapsed_time(e1) * 1e3 / it


def gemv_bw(ext, pdl=1):
    rows = []
    st = torch.cuda.current_stream().cuda_stream
    for name, N, K, mode in [("qkv 7B", 12288, 4096, 0), ("o 7B", 4096, 4096, 1), ("gate|up 7B", 11008, 4096, 2),
                             ("down 7B", 4096, 11008, 1), ("lm_head 7B", 32000, 4096, 3),
                             ("gate|up smollm2", 1536, 576, 2), ("lm_head smollm2", 49152, 576, 3)]:
        nmat = 2 if mode == 2 else 1
        reps = max(2, int(2e9 // (N * K * 2 * nmat)))  # rotate over > L2 worth of weights
        Ws = [(torch.randn(nmat * N, K, device="cuda") / math.sqrt(K)).half() for _ in range(min(reps, 8))]
        x = torch.randn(K, device="cuda").half()
        out = torch.zeros(N, device="cuda", dtype=torch.float32 if mode == 3 else torch.float16)
        nw = torch.ones(K, device="cuda").half()
        def run(W):
            ext.gemv(W.data_ptr(), N, K, x.data_ptr(), nw.data_ptr(), 1e-5, out.data_ptr(), mode, 0, st, 1, 132 * 4,
                     pdl=pdl)
        us = kernel_us(run, Ws)
        byts = nmat * N * K * 2 + K * 2 + N * (4 if mode == 3 else 2)
        rows.append({"kernel": name, "pdl": pdl, "N": N, "K": K, "us": round(us, 2), "GB/s": round(byts / us / 1e3, 1),
                     "bytes": byts})
        del Ws
    return rows


def qgemv_bw(ext, pdl=3):
    """The quantized gemv (gemv_quant.cu) on the 7B shapes: int8 one scale a row, int4 in groups of 128 and 32; GB/s
    of the bytes it reads (q + scales + minimums + the input + the output), over > L2 worth of weights."""
    from server.model.quant import empty_quant, random_quant
    rows = []
    st = torch.cuda.current_stream().cuda_stream
    g = torch.Generator(device="cuda").manual_seed(0)
    for qmode, G in (("int8", 0), ("int4", 128), ("int4", 32)):
        for name, N, K, mode in [("qkv 7B", 12288, 4096, 0), ("o 7B", 4096, 4096, 1), ("gate|up 7B", 11008, 4096, 2),
                                 ("down 7B", 4096, 11008, 1), ("lm_head 7B", 32000, 4096, 3)]:
            nmat = 2 if mode == 2 else 1
            qls = [random_quant(empty_quant(nmat * N, K, qmode, G or K, "cuda"), 1 / math.sqrt(K), g)
                   for _ in range(4)]
            x = torch.randn(K, device="cuda").half()
            out = torch.zeros(N, device="cuda", dtype=torch.float32 if mode == 3 else torch.float16)
            nw = torch.ones(K, device="cuda").half()

            def run(ql):
                ext.qgemv(ql.q.data_ptr(), ql.scale.data_ptr(), ql.minv.data_ptr() if ql.minv is not None else 0,
                          8 if qmode == "int8" else 4, ql.group, N, K, x.data_ptr(),
                          nw.data_ptr() if mode in (0, 2, 3) else 0, 1e-5, out.data_ptr(), mode, 0, st, 1, 132 * 4,
                          pdl=pdl)
            us = kernel_us(run, qls)
            byts = qls[0].nbytes() + K * 2 + N * (4 if mode == 3 else 2)
            rows.append({"kernel": f"{qmode} G={qls[0].group} {name}", "pdl": pdl, "N": N, "K": K, "us": round(us, 2),
                         "GB/s": round(byts / us / 1e3, 1), "bytes": byts})
            del qls
    return rows


def attn_bw(ext, pdl=1):
    rows = []
    st = torch.cuda.current_stream().cuda_stream
    for name, Hq, Hkv, D in [("smollm2", 9, 3, 64), ("7B", 32, 32, 128), ("gqa-32-8", 32, 8, 128)]:
        max_seq = 4096
        ms = max_seq // ext.SPLIT_LEN
        qkv = torch.randn((Hq + 2 * Hkv) * D, device="cuda").half()
        caches = [(torch.randn(Hkv, max_seq, D, device="cuda").half(), torch.randn(Hkv, max_seq, D, device="cuda").half())
                  for _ in range(4)]
        cos = torch.ones(max_seq, D // 2, device="cuda"); sin = torch.zeros_like(cos)
        pa = torch.empty(Hq * ms * D, device="cuda"); pm = torch.empty(Hq * ms * 2, device="cuda")
        cnt = torch.zeros(Hkv, dtype=torch.int32, device="cuda")
        ctx = torch.empty(Hq * D, device="cuda").half()
        for T in (511, 2047):
            def run(kv):
                kc, vc = kv
                ext.attention(qkv.data_ptr(), kc.data_ptr(), vc.data_ptr(), cos.data_ptr(), sin.data_ptr(), D, Hq, Hkv,
                              D, max_seq, T, pa.data_ptr(), pm.data_ptr(), ms, cnt.data_ptr(), ctx.data_ptr(), 0, st, 0,
                              pdl=pdl)
            us = kernel_us(run, caches)
            byts = 2 * Hkv * (T + 1) * D * 2
            rows.append({"kernel": f"attention {name} T={T + 1}", "us": round(us, 2), "GB/s": round(byts / us / 1e3, 1),
                         "bytes": byts})
    return rows


def time_backend(model, mode, gemm, steps, options, window=64):
    be = CudaBackend(model, sessions=1, graph_mode=mode, gemm=gemm, steps_per_graph=8, options=options)
    res = {"mode": mode, "gemm": gemm}
    try:
        ids = list(range(1, 33))
        tok = int(be.prefill(0, ids).argmax())
        if mode == "exact":
            t0 = time.perf_counter()
            be.bg_capture_start(0, window)
            be.wait_precapture(0, min(window, steps), 300.0)
            res["precapture_s"] = round(time.perf_counter() - t0, 3)
        be.generate(0, tok, 16, SamplingParams())  # warm-up
        be.prefill(0, ids)
        if mode == "exact":
            be.wait_precapture(0, min(window, steps), 300.0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks = be.generate(0, tok, steps, SamplingParams())
        dt = time.perf_counter() - t0
        res["tokens"] = toks
        res.update({"steps": len(toks), "ms_per_token": round(dt * 1e3 / len(toks), 4),
                    "tok_per_s": round(len(toks) / dt, 1)})
        # client-sampling path: replay + logits to host per token
        be.prefill(0, ids)
        if mode == "exact":
            be.wait_precapture(0, min(window, 64), 300.0)
        n = 64
        t0 = time.perf_counter()
        t = tok
        for _ in range(n):
            t = int(be.replay(0, be.seq_len(0), t).argmax())
        res["client_ms_per_token"] = round((time.perf_counter() - t0) * 1e3 / n, 4)
        g = be.graph_stats()
        res.update({k: g[k] for k in ("captured", "misses", "capture_ms_p50", "capture_ms_p99",
                                      "instantiate_ms_p50", "instantiate_ms_p99", "live_max") if k in g})
    finally:
        be.close()
    return res


_TTFT_CHILD = r"""
import sys, time, json, torch
sys.path.insert(0, sys.argv[1])
from server.model.config import SYNTHETIC_SHAPES, with_max_seq
from server.model.weights import synthetic_weights
from server.cuda_backend import CudaBackend
from server.model.resolve import LoadedModel
warm = sys.argv[2] == "1"
cfg = with_max_seq(SYNTHETIC_SHAPES["llama2-7b"], 2048)
w = synthetic_weights(cfg, "float16", "cuda", 0)
model = LoadedModel(name="synthetic:llama2-7b", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
torch.cuda.synchronize()
t0 = time.perf_counter()
try:
    be = CudaBackend(model, sessions=1, graph_mode="exact", warmup=warm)
except TypeError:
    be = CudaBackend(model, sessions=1, graph_mode="exact")
t1 = time.perf_counter()
out = {"warmup": warm, "construct_ms": round((t1 - t0) * 1e3, 1)}
for n in (512, 512):
    t0 = time.perf_counter()
    tok = int(be.prefill(0, [(3 * i + 5) % 32000 for i in range(n)]).argmax())
    t1 = time.perf_counter()
    be.step(0, tok)
    t2 = time.perf_counter()
    out.setdefault("prefill512_ms", []).append(round((t1 - t0) * 1e3, 2))
    out.setdefault("first_step_ms", []).append(round((t2 - t1) * 1e3, 2))
be.close()
print("TTFT", json.dumps(out))
"""


def first_request(warm):
    import subprocess
    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", _TTFT_CHILD, root, "1" if warm else "0"], capture_output=True,
                       text=True, timeout=300)
    for line in r.stdout.splitlines():
        if line.startswith("TTFT "):
            return json.loads(line[5:])
    return {"warmup": warm, "error": (r.stderr or r.stdout)[-500:]}


KINDS = {"m0": "norm+QKV", "m2": "norm+gate|up", "m3": "norm+lm_head", "attention": "attention", "finish": "finish"}


# per-launch trace slot (ops.h, exported by the extension as KTRACE_BLOCKS, KTRACE_REC, KTRACE_WARP0):
# KTRACE_BLOCKS records of KTRACE_REC uint64 per launch; record: 0 start, 1 past the wait, 2-11 phase ends,
# KTRACE_WARP0 + w warp w's end (global timer ns; 0 = not written)
# attention's ktrace_mark points (attention.cu): 3 q / K_T / V_T rotated, 10 / 11 the K / V rows < T in
# registers, 4 the block's rows done (scores, softmax, sum p V), 5 past the barrier (every warp's partial in
# shared memory), 7 ctx (or partials) written; the tensor-core quantized gemv's (gemv_quant.cu): 8 the input staged,
# 9 every warp's steps done
PHASES = {3: "rope", 10: "k_in", 11: "v_in", 4: "rows", 5: "barrier", 7: "ctx", 8: "staged", 9: "looped"}


def trace_summary(rec, warp0):
    """One launch's block records [blocks, KTRACE_REC] (int64 tensor, CPU; warp ends from word warp0 on) -> first
    start, first past the wait, last end, last start, last past the wait, phase ends (max over blocks); 0 where
    nothing was written."""
    def lo(x):
        x = x[x > 0]
        return int(x.min()) if x.numel() else 0

    def hi(x):
        return int(x.max()) if x.numel() else 0
    out = {"start": lo(rec[:, 0]), "wait": lo(rec[:, 1]), "end": hi(rec[:, warp0:]), "last_start": hi(rec[:, 0]),
           "last_wait": hi(rec[:, 1])}
    for k in PHASES:
        out[k] = hi(rec[:, k])
    return out


def kernel_timeline(ext, model, steps=8, mode="dynamic", prompt=32, options="default"):
    """Per-kernel timeline of `steps` decode steps (one dynamic graph, or `steps` exact graphs
    captured in the background): for each kernel, from the global timer, min start / min past
    griddepcontrol.wait / max end over its blocks (each block records its own times with plain stores:
    no atomics or barriers in the timed kernels), and attention's phase ends (max over blocks). options: the
    engine's (parse_options)."""
    cfg = model.cfg
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    TRACE_BLOCKS, TRACE_REC = ext.KTRACE_BLOCKS, ext.KTRACE_REC
    if 4 * sms > TRACE_BLOCKS:  # lm_head's persistent grid (4 blocks per SM) must fit the per-launch records
        raise SystemExit(f"timeline: {sms} SMs need {4 * sms} block records per launch, ops.h kKtraceBlocks is "
                         f"{TRACE_BLOCKS}")
    n = 4 * steps * (cfg.num_layers * 5 + 4) + 64  # slots: the captured launches, with room
    buf = torch.zeros(n * TRACE_BLOCKS * TRACE_REC, dtype=torch.int64, device="cuda")
    be = CudaBackend(model, sessions=1, graph_mode=mode, gemm="custom", steps_per_graph=steps,
                     options=parse_options(ext, options, os.environ.get("CASE4_PDL", "3")))
    eng = be.engine
    try:
        ids = list(range(1, prompt + 1))
        tok = int(be.prefill(0, ids).argmax())
        eng.set_kernel_trace(buf.data_ptr(), n)  # slots from here on: the captured graphs' launches first
        lo = eng.kernel_trace_next()
        if mode == "dynamic":
            be.engine.prepare_dynamic(0, steps)  # captured now: its launches take the slots below
        else:  # 2 x steps graphs; a replayed exact graph is evicted, so the first half is the warm-up
            be.bg_capture_start(0, 2 * steps)
            be.wait_precapture(0, 2 * steps, 300.0)
            be.bg_capture_stop(0)
        hi = eng.kernel_trace_next()
        names = eng.kernel_trace_names(lo, hi)
        v = buf.view(n, TRACE_BLOCKS, TRACE_REC)
        if mode == "dynamic":
            be.generate(0, tok, steps, SamplingParams())  # warm
            be.prefill(0, ids)
        torch.cuda.synchronize()
        v.zero_()
        torch.cuda.synchronize()
        be.generate(0, tok, steps if mode == "dynamic" else 2 * steps, SamplingParams())
        torch.cuda.synchronize()
        recs = v[lo:hi].cpu()
        t = [trace_summary(recs[i], ext.KTRACE_WARP0) for i in range(hi - lo)]
    finally:
        eng.set_kernel_trace(0, 0)
        be.close()
    per_step = (hi - lo) // (steps if mode == "dynamic" else 2 * steps)
    run = [(i, name, tt) for i, (name, tt) in enumerate(zip(names, t)) if tt["end"] > 0]  # replayed slots
    run.sort(key=lambda x: x[2]["end"])  # execution order (a serial chain: ends are monotonic)
    run = run[len(run) - steps * per_step:]  # exact: the second half (the first is the warm-up)
    t0 = run[0][2]["start"]
    rows, by_kind = [], {}
    for j, (i, name, tt) in enumerate(run):
        s, w, e = tt["start"], tt["wait"], tt["end"]
        key = name.split()[1] if name.startswith("gemv") else name
        kind = KINDS.get(key, name)
        if key == "m1":
            kind = "down+resid" if int(name.split()[-1]) == cfg.intermediate_size else "O+resid"  # by K
        prev_end = run[j - 1][2]["end"] if j else s
        r = {"i": i, "kind": kind, "start_us": (s - t0) / 1e3, "wait_done_us": (w - t0) / 1e3, "end_us": (e - t0) / 1e3,
             "release_us": (w - prev_end) / 1e3, "work_us": (e - w) / 1e3, "total_us": (e - prev_end) / 1e3,
             "early_us": (w - s) / 1e3, "last_start_us": (tt["last_start"] - w) / 1e3,
             "last_wait_us": (tt["last_wait"] - w) / 1e3}
        for k, ph in PHASES.items():
            if tt[k] > 0:
                r[ph + "_us"] = (tt[k] - w) / 1e3  # phase end, from the first block past the wait
        rows.append(r)
        by_kind.setdefault(kind, []).append(r)
    summary = {}
    for kind, rs in by_kind.items():
        m = lambda k: round(sorted(x[k] for x in rs)[len(rs) // 2], 2)  # noqa: E731
        summary[kind] = {"count": len(rs), "release_us_p50": m("release_us"), "work_us_p50": m("work_us"),
                         "end_to_end_us_p50": m("total_us"), "early_us_p50": m("early_us"),
                         "last_start_us_p50": m("last_start_us"), "last_wait_us_p50": m("last_wait_us"),
                         "sum_us": round(sum(x["total_us"] for x in rs), 1)}
        for ph in PHASES.values():
            if all(ph + "_us" in x for x in rs):
                summary[kind][ph + "_us_p50"] = m(ph + "_us")
    span = (run[-1][2]["end"] - t0) / 1e3
    return {"shape": model.name, "mode": mode, "prompt": prompt, "options": str(eng.options), "steps": steps, "span_us": round(span, 1),
            "us_per_step": round(span / steps, 1), "summary": summary, "kernels": rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--shapes", default="smollm2-135m,llama2-7b")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--kernel-pdl", default="1,3", help="PDL modes for the per-kernel GEMV rows")
    ap.add_argument("--rows", default="",
                    help="decode rows mode:gemm:pdl[:options],... (default: all; skip: none, the --quant rows only); options: EngineOptions fields "
                         "name=value+name=value, e.g. step_skip=4 (timing ablation) or o_in_attention=0")
    ap.add_argument("--ttft", action="store_true", help="first-request TTFT in fresh processes (7B)")
    ap.add_argument("--timeline", default="", help="shapes for a per-kernel timeline (kernel_timeline)")
    ap.add_argument("--timeline-modes", default="dynamic", help="graph modes of the timeline: dynamic,exact")
    ap.add_argument("--max-seq", type=int, default=2048, help="context the backend plans for (bench: 4096)")
    ap.add_argument("--timeline-prompts", default="32", help="prompt lengths of the timeline (T of its steps)")
    ap.add_argument("--quant", default="",
                    help="quantized decode rows mode:group,... (e.g. int8:0,int4:128; group 0: one scale a row), "
                         "each with the server's synthetic quantized weights (synthetic:<shape> --quant), dynamic and exact "
                         "graphs, PDL 3; floor from the quantized bytes")
    ap.add_argument("--quant-options", default="default",
                    help="EngineOptions sets of the quantized rows (name=value+..., comma-separated; A/B), each in "
                         "dynamic and exact graphs")
    ap.add_argument("--quant-modes", default="dynamic,exact", help="graph modes of the quantized rows")
    ap.add_argument("--options", default="default",
                    help="EngineOptions sets (name=value+...) to run the timeline with, comma-separated (A/B)")
    ap.add_argument("--timeline-quant", default="",
                    help="the timeline's weights quantized, mode:group (e.g. int4:32, the built-in GGUF's layers; "
                         "group 0: one scale a row), the server's synthetic quantized weights; default fp16")
    a = ap.parse_args()
    ext = load_extension()
    if a.timeline:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        out = []
        for shape in a.timeline.split(","):
            cfg = with_max_seq(SYNTHETIC_SHAPES[shape], a.max_seq)
            schemes = None
            if a.timeline_quant:
                from server.model.weights import quant_schemes
                qmode, _, G = a.timeline_quant.partition(":")
                schemes = quant_schemes(cfg, qmode, int(G) if G and G != "0" else None, f"synthetic:{shape}")
            w = synthetic_weights(cfg, "float16", "cuda", 0, schemes=schemes)
            model = LoadedModel(name=f"synthetic:{shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
            for mode, prompt, opts in ((m, int(p), o) for m in a.timeline_modes.split(",")
                                       for p in a.timeline_prompts.split(",") for o in a.options.split(",")):
                tl = kernel_timeline(ext, model, mode=mode, prompt=prompt, options=opts)
                out.append(tl)
                tl["quant"] = a.timeline_quant or "none"
                print(f"== timeline {shape} quant {tl['quant']} {mode} prompt {prompt} options {opts}: "
                      f"{tl['us_per_step']} us/step")
                print(f"{'kind':14s} {'n':>4s} {'early':>7s} {'release':>8s} {'work':>8s} {'end2end':>8s} "
                      f"{'sum':>8s} {'lstart':>7s} {'lwait':>6s}  (us, p50)  phases")
                for k, v in tl["summary"].items():
                    ph = " ".join(f"{p}={v[p + '_us_p50']}" for p in PHASES.values() if p + "_us_p50" in v)
                    print(f"{k:14s} {v['count']:4d} {v['early_us_p50']:7.2f} {v['release_us_p50']:8.2f} "
                          f"{v['work_us_p50']:8.2f} {v['end_to_end_us_p50']:8.2f} {v['sum_us']:8.1f} "
                          f"{v['last_start_us_p50']:7.2f} {v['last_wait_us_p50']:6.2f}  {ph}",
                          flush=True)
            del model, w
            torch.cuda.empty_cache()
        Path(a.out, "timeline.json").write_text(json.dumps(out, indent=1))
        return
    report = {"device": torch.cuda.get_device_name(0)}
    report["copy_GBps"] = round(copy_bandwidth(), 1)
    print("copy GB/s (read+write):", report["copy_GBps"], flush=True)
    report["gemv"] = []
    for m in filter(None, a.kernel_pdl.split(",")):
        report["gemv"] += gemv_bw(ext, int(m))
    if a.kernel_pdl:
        report["gemv"] += attn_bw(ext, int(os.environ.get("CASE4_PDL", "1")))
    if a.quant and a.kernel_pdl:
        report["gemv"] += qgemv_bw(ext, 3)
    for r in report["gemv"]:
        print(r, flush=True)
    report["decode"] = []
    for shape in a.shapes.split(","):
        cfg = with_max_seq(SYNTHETIC_SHAPES[shape], a.max_seq)
        # fp16 weights only for the fp16 rows (--rows skip: none, so that llama2-70b's quantized rows fit one card)
        w = None if a.rows == "skip" else synthetic_weights(cfg, "float16", "cuda", 0)
        model = w and LoadedModel(name=f"synthetic:{shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
        floor_ms = cfg.decode_weight_bytes(2) / (report["copy_GBps"] * 1e9) * 1e3
        first_tokens = None
        rows = ([] if a.rows == "skip" else [tuple(r.split(":")) for r in a.rows.split(",")] if a.rows else
                [("none", "custom", "1"), ("exact", "custom", "1"), ("dynamic", "custom", "1"),
                 ("dynamic", "custom", "0"), ("exact", "custom", "0"), ("dynamic", "custom", "2"),
                 ("exact", "custom", "3"), ("dynamic", "custom", "3"), ("none", "custom", "3"),
                 ("dynamic", "cublas", "1")])
        for mode, gemm, pdl, *spec in rows:
            spec = spec[0] if spec else "default"
            options = parse_options(ext, spec, pdl)
            skip = options.step_skip
            try:
                r = time_backend(model, mode, gemm, a.steps, options)
            except Exception as e:  # a failed row is reported, the other rows still run
                r = {"mode": mode, "gemm": gemm, "error": f"{type(e).__name__}: {e}", "tokens": None}
            r["pdl"] = int(pdl)
            r["options"] = spec
            toks = r.pop("tokens")
            if first_tokens is None:
                first_tokens = toks
            r["tokens_equal_first_row"] = toks == first_tokens if not skip and toks is not None else None
            r.update({"shape": shape, "weight_bytes": cfg.decode_weight_bytes(2), "floor_ms": round(floor_ms, 3)})
            print(r, flush=True)
            report["decode"].append({**r, "tokens": toks})  # the JSON keeps them: A/B of two builds (ab_builds.sh)
        for spec in filter(None, a.quant.split(",")):
            from floors import dense_bytes_per_token
            from server.model.weights import quant_schemes
            qmode, _, G = spec.partition(":")
            # the server's own synthetic quantized weights (drawn in place), as `synthetic:<shape> --quant`
            try:
                schemes = quant_schemes(cfg, qmode, int(G) if G and G != "0" else None, f"synthetic:{shape}")
            except ConfigError as e:  # e.g. int4:128 on SmolLM2 (K = 576): the other shapes' rows still run
                print(f"skipped {spec} on {shape}: {e}", flush=True)
                continue
            qw = synthetic_weights(cfg, "float16", "cuda", 0, schemes=schemes)
            qmodel = LoadedModel(name=f"synthetic:{shape}", cfg=cfg, weights=qw, tokenizer_dir=None, eos_ids=())
            qb = qw.quant_bytes() + dense_bytes_per_token(cfg, "float16")
            qfloor = qb / (report["copy_GBps"] * 1e9) * 1e3
            q_first = None  # this spec's first row's tokens: every variant must give the same greedy tokens
            for opt, mode in ((o, m) for o in a.quant_options.split(",") for m in a.quant_modes.split(",")):
                try:
                    r = time_backend(qmodel, mode, "custom", a.steps, parse_options(ext, opt, "3"))
                except Exception as e:
                    r = {"mode": mode, "gemm": "custom", "error": f"{type(e).__name__}: {e}", "tokens": None}
                toks = r.pop("tokens", None)
                q_first = toks if q_first is None else q_first
                r.update({"shape": shape, "quant": f"{qmode} G={G or 'K'}", "pdl": 3, "options": f"quant {spec} {opt}",
                          "weight_bytes": qb, "floor_ms": round(qfloor, 3),
                          "tokens_equal_first_row": None if toks is None else toks == q_first})
                if r.get("ms_per_token"):
                    r["bw_fraction"] = round(qfloor / r["ms_per_token"], 4)
                print(r, flush=True)
                report["decode"].append(r)
            del qmodel, qw
        del model, w
        torch.cuda.empty_cache()
    if a.ttft:
        report["ttft"] = [first_request(w) for w in (False, True)]
        for r in report["ttft"]:
            print(r, flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "quick_timing.json").write_text(json.dumps(report, indent=2))
    print("\nshape          mode     gemm   pdl ms/tok  tok/s  client-ms  floor-ms  capture-ms-p50 same-tokens options")
    for r in report["decode"]:
        print(f"{r['shape']:14s} {r['mode']:8s} {r['gemm']:7s} {r['pdl']}  {r.get('ms_per_token', 0):7.3f} "
              f"{r.get('tok_per_s', 0):7.1f} {r.get('client_ms_per_token', 0):8.3f} {r['floor_ms']:8.3f} "
              f"{r.get('capture_ms_p50', 0):8.2f} {r.get('tokens_equal_first_row')} {r['options']}"
              + (f" bw_fraction {r.get('bw_fraction')}" if "quant" in r else ""))


if __name__ == "__main__":
    main()
