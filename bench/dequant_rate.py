"""Rate of the prefill's dequantization kernel (issue 26, docs/performance.md entry 44; not a test): for each
Llama-2-7B matrix, int4 G128 / int4 G32 / int8 per row, fp16 out, the median time of ext.dequant over 20 launches
(CUDA events) and its bytes moved (q + scales (+ minimums) read, the fp16 matrix written) as GB/s and as a fraction
of a 1 GiB device-to-device copy measured in the same process. One JSON line per matrix on stdout, then a total
line. bench/results/nvidia-h200-20261206-dequant-{chunk,vec}.json: the previous kernel and this one, one call.

    python bench/dequant_rate.py [--shapes 12288x4096,...] [--out FILE.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from custom_kernels.ext import load_extension  # noqa: E402
from tests.gpu.test_quant_kernels import QMODE, ptrs, random_quant  # noqa: E402

SHAPES_7B = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (32000, 4096)]


def timed(fn, n=20):
    e = [torch.cuda.Event(enable_timing=True) for _ in range(2 * n)]
    fn(); fn()
    torch.cuda.synchronize()
    for i in range(n):
        e[2 * i].record(); fn(); e[2 * i + 1].record()
    torch.cuda.synchronize()
    ts = sorted(e[2 * i].elapsed_time(e[2 * i + 1]) for i in range(n))
    return ts[n // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    shapes = SHAPES_7B if not a.shapes else [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    ext = load_extension()
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = timed(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() / copy_ms / 1e6
    rows, tot_b, tot_ms = [], {}, {}
    st = torch.cuda.current_stream().cuda_stream
    for mode, G in (("int4", 128), ("int4", 32), ("int8", 0)):
        for N, K in shapes:
            g = torch.Generator(device="cuda").manual_seed(N + K)
            ql = random_quant(mode, N, K, G or K, g)
            out = torch.empty(N, K, dtype=torch.float16, device="cuda")
            q, s, m = ptrs(ql)
            ms = timed(lambda: ext.dequant(q, s, m, QMODE[mode], G or K, N, K, out.data_ptr(), 0, st))
            nb = ql.q.numel() * ql.q.element_size() + ql.scale.numel() * 2 + (ql.minv.numel() * 2 if ql.minv is not None else 0) \
                + out.numel() * 2
            r = {"mode": mode, "group": G or K, "N": N, "K": K,
                 "ms": round(ms, 4), "GBps": round(nb / ms / 1e6, 1), "of_copy": round(nb / ms / 1e6 / copy_gbps, 3)}
            print(json.dumps(r), flush=True)
            rows.append(r)
            key = f"{mode}:{G or K}"
            tot_b[key] = tot_b.get(key, 0) + nb
            tot_ms[key] = tot_ms.get(key, 0) + ms
    tot = {k: {"ms": round(tot_ms[k], 4), "GBps": round(tot_b[k] / tot_ms[k] / 1e6, 1),
               "of_copy": round(tot_b[k] / tot_ms[k] / 1e6 / copy_gbps, 3)} for k in tot_b}
    summary = {"device": torch.cuda.get_device_name(), "copy_GBps": round(copy_gbps, 1),
               "per_layer_set": tot}
    print(json.dumps(summary), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
