"""TTFT A/B on one backend (not a test): prefill through the prefill graphs vs the eager torch path,
alternating, median of repeats, prompts of 128/512/2048 tokens on the synthetic 7B shapes.
    python bench/ttft_ab.py [--shape llama2-7b] [--repeats 5]"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from server.model.config import SYNTHETIC_SHAPES, with_max_seq  # noqa: E402
from server.model.weights import synthetic_weights  # noqa: E402
from server.cuda_backend import CudaBackend  # noqa: E402
from server.model.resolve import LoadedModel  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    cfg = with_max_seq(SYNTHETIC_SHAPES[a.shape], 2304)
    w = synthetic_weights(cfg, "float16", "cuda", 0)
    model = LoadedModel(name=f"synthetic:{a.shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
    t0 = time.perf_counter()
    be = CudaBackend(model, sessions=1, graph_mode="dynamic")
    out = {"device": torch.cuda.get_device_name(0), "shape": a.shape, "startup_s": round(time.perf_counter() - t0, 2)}
    pg = be.prefill_graphs
    for n in (128, 512, 2048):
        ids = [(3 * i + 5) % cfg.vocab_size for i in range(n)]
        res = {"graph": [], "eager": []}
        for r in range(a.repeats):
            for mode in ("graph", "eager"):
                be.prefill_graphs = pg if mode == "graph" else None
                torch.cuda.synchronize()
                t = time.perf_counter()
                be.prefill(0, ids)  # last logits to host included, as the bench's TTFT
                res[mode].append((time.perf_counter() - t) * 1e3)
        be.prefill_graphs = pg
        out[f"p{n}"] = {k: round(statistics.median(v), 2) for k, v in res.items()}
        print(n, out[f"p{n}"], flush=True)
    out["stats"] = be.graph_stats()
    be.close()
    print("TTFT_AB", json.dumps(out))


if __name__ == "__main__":
    main()
