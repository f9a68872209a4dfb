"""Prefill's dequantization, taken apart (not a test): the four linears of a layer at a prompt of T tokens, on L
distinct layers of random quantized weights (so every layer's bytes come from DRAM), each way captured in one CUDA
graph and replayed, median of repeats (CUDA events), reported a layer:
    fp16        F.linear on dense fp16 copies of the same matrices (the fp16 prefill's GEMMs)
    whole       each matrix dequantized whole into one scratch, then F.linear (server/cuda_backend.py, before)
    chunk:C     each matrix dequantized C MB of rows at a time into one C MB scratch, each chunk multiplied into
                its columns of the output right after it (the scratch stays in L2 between the two)
    chunk2:C    chunk:C with two C MB buffers and the dequantization of chunk i + 1 on a side stream while chunk
                i's GEMM runs (a chunk's GEMM may leave SMs free)
    python bench/prefill_dequant.py [--shape llama2-7b] [--quant int4:128] [--tokens 512] [--ways ...]
Prints one JSON line (PREFILL_DEQUANT {...}) with the device's name."""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.cuda_backend import chunk_rows, load_extension  # noqa: E402
from server.model.config import SYNTHETIC_SHAPES  # noqa: E402
from server.model.quant import dequantize, empty_quant, random_quant  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--quant", default="int4:128", help="mode:group")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--ways", default="fp16,whole,chunk:8,chunk:16,chunk:24,chunk:32,chunk2:8,chunk2:16")
    ap.add_argument("--per-matrix", default="", help="ways also timed for each of the four matrices alone")
    a = ap.parse_args()
    ext = load_extension()
    dev = torch.device("cuda")
    cfg = SYNTHETIC_SHAPES[a.shape]
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = [((cfg.num_heads + 2 * cfg.num_kv_heads) * D, H), (H, cfg.num_heads * D), (2 * I, H), (H, I)]
    mode, _, g = a.quant.partition(":")
    gen = torch.Generator(device=dev).manual_seed(0)
    all_layers = [[random_quant(empty_quant(n, k, mode, int(g) if g and g != "0" else k, dev), 0.02, gen)
                   for n, k in shapes] for _ in range(a.layers)]
    layers = all_layers
    T = a.tokens
    xs = {k: torch.randn(T, k, device=dev, dtype=torch.float16) for _, k in shapes}
    big = max(n * k for n, k in shapes)
    scratch = torch.empty(big, dtype=torch.float16, device=dev)
    side = torch.cuda.Stream(dev)

    def deq(m, r0, r1, out, stream):  # as cuda_backend.DequantWeights.dequant_rows, on a given stream
        mv = 0 if m.minv is None else m.minv[r0:r1].data_ptr()
        ext.dequant(m.q[r0:r1].data_ptr(), m.scale[r0:r1].data_ptr(), mv, 8 if m.mode == "int8" else 4, m.group,
                    r1 - r0, m.k, out.data_ptr(), 0, stream.cuda_stream)

    last = []  # the outputs of the first layer's four linears in the last eager run

    def check(way, run, oracle):
        last.clear()
        run()
        torch.cuda.synchronize()
        errs = [float((y.double() - o).norm() / o.norm()) for y, o in zip(last, oracle)]
        assert max(errs) < 1e-2, f"{way}: rel err {errs} against the float64 product"
        return max(errs)

    def keep(li, y):
        if li == 0:
            last.append(y)

    def way_fp16(dense):
        def run():
            for li, lw in enumerate(dense):
                for w in lw:
                    keep(li, F.linear(xs[w.shape[1]], w))
        return run

    def way_whole():
        def run():
            cur = torch.cuda.current_stream()
            for li, lw in enumerate(layers):
                for m in lw:
                    w = scratch[:m.n * m.k].view(m.n, m.k)
                    deq(m, 0, m.n, w, cur)
                    keep(li, F.linear(xs[m.k], w))
        return run

    def way_chunk(mb, two):
        elems = max(chunk_rows(n, k, mb) * k for n, k in shapes)
        bufs = [torch.empty(elems, dtype=torch.float16, device=dev) for _ in range(2 if two else 1)]

        def run():
            cur = torch.cuda.current_stream()
            for li, lw in enumerate(layers):
                for m in lw:
                    x = xs[m.k]
                    y = torch.empty(T, m.n, dtype=torch.float16, device=dev)
                    keep(li, y)
                    rows = chunk_rows(m.n, m.k, mb)
                    spans = [(r, min(m.n, r + rows)) for r in range(0, m.n, rows)]
                    if not two:
                        for r0, r1 in spans:
                            w = bufs[0][:(r1 - r0) * m.k].view(r1 - r0, m.k)
                            deq(m, r0, r1, w, cur)
                            torch.mm(x, w.t(), out=y[:, r0:r1])
                        continue
                    # chunk i + 1 dequantized on the side stream into the other buffer while chunk i's GEMM runs
                    # (behind chunk i - 1's GEMM, that buffer's last reader)
                    side.wait_stream(cur)
                    ready, free = [], []

                    def issue(i):
                        r0, r1 = spans[i]
                        if i >= 2:
                            side.wait_event(free[i - 2])
                        deq(m, r0, r1, bufs[i % 2][:(r1 - r0) * m.k].view(r1 - r0, m.k), side)
                        ev = torch.cuda.Event()
                        ev.record(side)
                        ready.append(ev)
                    issue(0)
                    for i, (r0, r1) in enumerate(spans):
                        if i + 1 < len(spans):
                            issue(i + 1)
                        cur.wait_event(ready[i])
                        torch.mm(x, bufs[i % 2][:(r1 - r0) * m.k].view(r1 - r0, m.k).t(), out=y[:, r0:r1])
                        ev = torch.cuda.Event()
                        ev.record(cur)
                        free.append(ev)
                    cur.wait_stream(side)
        return run

    out = {"device": torch.cuda.get_device_name(0), "shape": a.shape, "quant": a.quant, "tokens": T,
           "layers": a.layers, "ms_per_layer": {}, "max_rel_err": {}}
    # the ways' products against a float64 oracle of the first layer's matrices (the bench checks itself)
    oracle = [(xs[m.k].double() @ dequantize(m).double().t()) for m in layers[0]]

    def time_way(way, check_it=True):
        dense = None
        if way == "fp16":
            dense = [[dequantize(m).half() for m in lw] for lw in layers]
            run = way_fp16(dense)
        elif way == "whole":
            run = way_whole()
        else:
            kind, _, mb = way.partition(":")
            run = way_chunk(float(mb), kind == "chunk2")
        run()  # warm-up (lazy cuBLAS handles, kernels)
        torch.cuda.synchronize()
        err = check(way, run, oracle) if check_it else None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        g.replay()
        torch.cuda.synchronize()
        ts = []
        for _ in range(a.repeats):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / a.layers)
        del g, dense
        torch.cuda.empty_cache()
        return round(statistics.median(ts), 4), err

    for way in a.ways.split(","):
        out["ms_per_layer"][way], out["max_rel_err"][way] = time_way(way)
        print(way, out["ms_per_layer"][way], flush=True)
    if a.per_matrix:
        out["ms_per_matrix"] = {}
        for j, (n, k) in enumerate(shapes):
            layers = [[lw[j]] for lw in all_layers]
            for way in a.per_matrix.split(","):
                out["ms_per_matrix"][f"{n}x{k} {way}"] = time_way(way, check_it=False)[0]
                print(f"{n}x{k}", way, out["ms_per_matrix"][f"{n}x{k} {way}"], flush=True)
    base = out["ms_per_layer"].get("fp16")
    if base:
        out["over_fp16_ms"] = {k: round(v - base, 4) for k, v in out["ms_per_layer"].items()}
    print("PREFILL_DEQUANT", json.dumps(out))


if __name__ == "__main__":
    main()
