"""Quality of the quantized models (issue 26 item 5; docs/quantization.md): the real SmolLM2 weights,
teacher-forced over the fixed text tests/data/quant_text.txt on the reference backend (CPU is fine),
each quant mode against the unquantized model, with llama-perplexity --kl-divergence's metrics:
mean KL divergence of the next-token distributions, top-1 agreement, perplexity.

The unquantized baseline: the built-in file is already Q4_1, so "unquantized" is its weights
dequantized to fp32 (`--quant none`), and every other mode re-quantizes those fp32 values (round to
nearest at load). The file's own Q4_1 blocks are the baseline's exact values (the repack is
lossless), so that row must read KL 0: it checks the repack, not Q4_1 (the original bf16 weights
are not shipped, so Q4_1's own loss cannot be measured here).

    python scripts/quant_quality.py                  # the table (markdown) on stdout

The text (4,042 SmolLM2 tokens) was written for this project: short original pieces (a lighthouse
keeper, truing a bicycle wheel, a town market, pocket calculators, a letter about tomatoes, a school
bus committee, bread at home).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TEXT = ROOT / "tests" / "data" / "quant_text.txt"
CHUNK = 1024  # tokens per teacher-forced window (each window starts a fresh context)

# (label, --quant, --group-size); None: the file's own blocks
MODES = [
    ("GGUF Q4_1 blocks as they are (lm_head Q8_0)", None, None),
    ("int8, one scale per row", "int8", None),
    ("int8, group 32", "int8", 32),
    ("int4, group 32", "int4", 32),
    ("int4, group 64", "int4", 64),
    ("int4, default groups (128 on down_proj; 64 where 128 does not divide 576)", "int4", None),
]

def _model(quant, group):
    from server.model.resolve import resolve_model
    return resolve_model("smollm2", "float32", "cpu", max_seq=CHUNK, quant=quant, group=group)


def text_ids(tokenizer_dir) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))(TEXT.read_text())["input_ids"]


@torch.no_grad()
def teacher_forced(model, ids: list[int], chunk: int = CHUNK) -> torch.Tensor:
    """fp32 logits [n, V] predicting ids[1:] of every window of `chunk` tokens (fresh context each)."""
    from server.kv import KVArena
    from server.reference import ReferenceDecoder
    dec = ReferenceDecoder(model.weights, KVArena(model.cfg, 1, model.weights.dtype, "cpu"))
    out = []
    for s in range(0, len(ids) - 1, chunk):
        w = ids[s:s + chunk]
        if len(w) < 2:
            break
        out.append(dec.forward(0, w, 0)[:-1])
    return torch.cat(out)


def targets(ids: list[int], chunk: int = CHUNK) -> torch.Tensor:
    return torch.cat([torch.tensor(ids[s + 1:s + chunk]) for s in range(0, len(ids) - 1, chunk)
                      if len(ids[s:s + chunk]) >= 2])


def metrics(base: torch.Tensor, logits: torch.Tensor, tgt: torch.Tensor) -> dict:
    """llama-perplexity --kl-divergence's numbers, in float64: mean KL(base || model), top-1 agreement,
    perplexity of the model on the text."""
    lp = torch.log_softmax(base.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    nll = -lq.gather(1, tgt[:, None]).squeeze(1)
    return {"kl_mean": kl.mean().item(), "kl_max": kl.max().item(),
            "kl_p99": kl.quantile(0.99).item(),
            "top1": (lp.argmax(-1) == lq.argmax(-1)).double().mean().item(),
            "ppl": math.exp(nll.mean().item())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=None, help="use the first N tokens only")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    base_model = _model("none", None)
    ids = text_ids(base_model.tokenizer_dir)[:a.tokens]
    tgt = targets(ids)
    t0 = time.time()
    base = teacher_forced(base_model, ids)
    del base_model
    bm = metrics(base, base, tgt)
    rows = [("unquantized: the Q4_1 file dequantized to fp32 (baseline)", "—", bm)]
    for label, q, g in MODES:
        m = _model(q, g)
        mb = m.weights.quant_bytes()
        rows.append((label, f"{mb / 1e6:.1f}", metrics(base, teacher_forced(m, ids), tgt)))
        print(f"[quality] {label}: {rows[-1][2]} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M-Instruct, {len(ids)} tokens of tests/data/quant_text.txt ({len(tgt)} predicted, "
          f"windows of {CHUNK}), reference backend, fp32 activations\n")
    print("| weights | matrix MB read per token | mean KL vs baseline | 99th pct KL | max KL | top-1 agreement | perplexity |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, mb, r in rows:
        print(f"| {label} | {mb} | {r['kl_mean']:.5f} | {r['kl_p99']:.4f} | {r['kl_max']:.3f} | "
              f"{100 * r['top1']:.2f} % | {r['ppl']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
