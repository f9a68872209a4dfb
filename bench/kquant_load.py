"""The load-time dequantization of llama.cpp's K-quant matrices (server/model/kquants.py; docs/performance.md
entry 55; not a test): one Llama-3-8B-sized matrix (4096 x 14336 values, random blocks with finite scales) of each
K-quant type, dequantized by the gguf package's numpy on the CPU (what a CPU load does) and by kquants on the GPU
from the same numpy rows (what a cuda load does: the upload of the raw blocks included, then a synchronize), the
median of a few runs each, side by side in one process. One JSON line per type on stdout, with the GPU's name and
the CPU's thread count.

    python bench/kquant_load.py [--rows 4096] [--cols 14336] [--repeats 3]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server.model import kquants  # noqa: E402
from tests.test_gguf import kquant_blocks  # noqa: E402


def median_s(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=14336)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    import gguf
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    for kind in ("Q4_K", "Q6_K"):
        raw = kquant_blocks((a.rows, a.cols), kind, 0.02, np.random.default_rng(0))
        t = gguf.GGMLQuantizationType[kind]
        want = np.array(gguf.quants.dequantize(raw, t), dtype=np.float32)
        row = {"type": kind, "values": a.rows * a.cols, "raw_bytes": raw.nbytes, "cpu_threads": torch.get_num_threads(),
               "package_cpu_s": median_s(lambda: gguf.quants.dequantize(raw, t), a.repeats), "gpu": gpu}
        if gpu:
            def on_gpu():
                v = kquants.dequantize(raw, kind, "cuda")
                torch.cuda.synchronize()
                return v
            got = on_gpu().cpu().numpy()
            row["gpu_bitwise_equal"] = bool(np.array_equal(got.view(np.int32), want.view(np.int32)))
            row["kquants_gpu_s"] = median_s(on_gpu, a.repeats)
            row["speedup"] = round(row["package_cpu_s"] / row["kquants_gpu_s"], 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
