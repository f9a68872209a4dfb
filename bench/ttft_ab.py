"""TTFT A/B on one backend (not a test): prefill through the prefill graphs vs the eager torch path,
alternating, median of repeats, prompts of 128/512/2048 tokens on the synthetic 7B shapes.
    python bench/ttft_ab.py [--shape llama2-7b] [--repeats 5]
With --quant int4:128 (mode:group): the prefill graphs of the fp16 weights and of the quantized ones (each matrix
dequantized into the prefill scratch: server/cuda_backend.py DequantWeights) in one process, alternating backends
by round, prompts of --prompts tokens (default 512)."""
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


def medians(runs: dict, repeats: int) -> dict:
    """Median wall ms of each runs[name]() (a prefill, last logits to host included, as the bench's TTFT), the
    names in turn each round, in reverse order every other round."""
    res = {k: [] for k in runs}
    for r in range(repeats):
        for k in (list(runs) if r % 2 == 0 else list(reversed(runs))):
            torch.cuda.synchronize()
            t = time.perf_counter()
            runs[k]()
            res[k].append((time.perf_counter() - t) * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in res.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quant", default="", help="mode:group: fp16 vs quantized prefill (see above)")
    ap.add_argument("--prompts", default="", help="prompt lengths (default 128,512,2048; with --quant 512)")
    a = ap.parse_args()
    lens = [int(n) for n in (a.prompts or ("512" if a.quant else "128,512,2048")).split(",")]
    if a.quant:
        return quant_ab(a, lens)
    cfg = with_max_seq(SYNTHETIC_SHAPES[a.shape], 2304)
    w = synthetic_weights(cfg, "float16", "cuda", 0)
    model = LoadedModel(name=f"synthetic:{a.shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
    t0 = time.perf_counter()
    be = CudaBackend(model, sessions=1, graph_mode="dynamic")
    out = {"device": torch.cuda.get_device_name(0), "shape": a.shape, "startup_s": round(time.perf_counter() - t0, 2)}
    pg = be.prefill_graphs
    for n in lens:
        ids = [(3 * i + 5) % cfg.vocab_size for i in range(n)]

        def run(graphs):
            be.prefill_graphs = pg if graphs else None
            be.prefill(0, ids)
        out[f"p{n}"] = medians({"graph": lambda: run(True), "eager": lambda: run(False)}, a.repeats)
        be.prefill_graphs = pg
        print(n, out[f"p{n}"], flush=True)
    out["stats"] = be.graph_stats()
    be.close()
    print("TTFT_AB", json.dumps(out))


def quant_ab(a, lens):
    from server.model.weights import quant_schemes
    cfg = with_max_seq(SYNTHETIC_SHAPES[a.shape], 2304)
    qmode, _, G = a.quant.partition(":")
    schemes = quant_schemes(cfg, qmode, int(G) if G and G != "0" else None, f"synthetic:{a.shape}")
    bes = {}
    for name, sch in (("fp16", None), (a.quant, schemes)):
        w = synthetic_weights(cfg, "float16", "cuda", 0, schemes=sch)
        model = LoadedModel(name=f"synthetic:{a.shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
        bes[name] = CudaBackend(model, sessions=1, graph_mode="dynamic", warmup=False)
    out = {"device": torch.cuda.get_device_name(0), "shape": a.shape, "quant": a.quant}
    for n in lens:
        ids = [(3 * i + 5) % cfg.vocab_size for i in range(n)]
        for be in bes.values():  # capture the prompt's graph, then time
            be.prefill(0, ids)
        med = medians({k: (lambda be=be: be.prefill(0, ids)) for k, be in bes.items()}, a.repeats)
        out[f"p{n}"] = {"ms": med, "vs_fp16": {k: round(v / med["fp16"], 3) for k, v in med.items()}}
        print(n, out[f"p{n}"], flush=True)
    for be in bes.values():
        be.close()
    print("TTFT_AB", json.dumps(out))


if __name__ == "__main__":
    main()
