"""Byte counts and bandwidth floors for batch-1 decode, computed from model shapes.

Batch-1 decode is memory-bound: every step reads every weight matrix once, plus the
K/V rows of all previous positions. The floor for one token is

    bytes_per_token / copy_rate

where copy_rate is a measured device-to-device copy (read + write bytes / time).

What one decode step must read (model dtype, `e` bytes per element):

    per layer:  attn_norm H + W_qkv (Hq+2*Hkv)*D*H + W_o H*Hq*D
                + mlp_norm H + W_gu 2*I*H + W_down H*I
    once:       final_norm H + lm_head V*H + one embedding row H
    KV cache:   L * 2 * Hkv * D * e per position attended (T+1 positions at length T)
                plus the K/V row written for the new position

The embedding table is *not* read whole: only the row of the input token. (When the
embedding is tied to the lm_head, the lm_head read covers the table anyway.) The
design's 13.48 GB for Llama-2-7B (docs/performance.md, section 1) counts every parameter including the full embedding
table; `all_params_bytes` gives that figure too, for comparison.

Run `python bench/floors.py` to print the floors table that docs/performance.md holds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from server.model.config import SYNTHETIC_SHAPES  # noqa: E402

# The design's measured reference copy rate on one H100 80GB HBM3 (read + write; docs/performance.md, section 2).
REFERENCE_COPY_GBPS = 3007.0

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}

def shape_config(name: str):
    """The ModelConfig of synthetic shape `name` (the one table: server.model.config)."""
    if name not in SYNTHETIC_SHAPES:
        raise KeyError(f"unknown synthetic shape {name!r}")
    return SYNTHETIC_SHAPES[name]


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[str(dtype).replace("torch.", "")]


def weight_bytes_per_token(cfg, dtype: str) -> int:
    """Weights one decode step reads: all layer matrices and norms, final norm, lm_head, one embedding row."""
    return cfg.decode_weight_bytes(dtype_bytes(dtype))


def dense_bytes_per_token(cfg, dtype: str) -> int:
    """What a step of a quantized model still reads in the model dtype: every norm, the QKV bias, one
    embedding row (every projection and the lm_head are quantized: docs/quantization.md)."""
    mats = sum(n * k for n, k in _matrix_shapes(cfg).values())
    return weight_bytes_per_token(cfg, dtype) - mats * dtype_bytes(dtype)


def quant_matrix_bytes(cfg, mode: str, group: int | None = None) -> int:
    """Bytes of every projection and the lm_head quantized as `resolve_model(quant=mode, group=group)`
    lays them out (server/model/quant.py): int8 q [n, k] + fp16 scale [n, k/G]; int4 q [n, k/2] + fp16
    scale and minimum [n, k/G]. Computed from the shapes, not from built tensors."""
    from server.model.weights import quant_schemes
    total = 0
    for name, (n, k) in _matrix_shapes(cfg).items():
        m, g = quant_schemes(cfg, mode, group, "floors")[name]
        q = n * k if m == "int8" else n * k // 2
        total += q + n * (k // g) * 2 * (1 if m == "int8" else 2)
    return total


def _matrix_shapes(cfg) -> dict:
    from server.model.weights import matrix_shapes
    return matrix_shapes(cfg)


def all_params_bytes(cfg, dtype: str) -> int:
    """Every parameter once (full embedding table; lm_head only when untied): the checkpoint size."""
    return cfg.weight_elements() * dtype_bytes(dtype)


def kv_bytes_per_position(cfg, dtype: str) -> int:
    """K and V of one position, all layers."""
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * dtype_bytes(dtype)


def kv_bytes_at(cfg, dtype: str, seq_len: int) -> int:
    """KV bytes of the step at sequence length T=seq_len: reads T+1 rows (incl. the new one), writes 1."""
    return kv_bytes_per_position(cfg, dtype) * (seq_len + 2)


def mean_kv_bytes(cfg, dtype: str, prompt: int, steps: int) -> float:
    """Mean KV bytes per step over `steps` decode steps after a `prompt`-token prefill."""
    steps = max(1, int(steps))
    first, last = prompt, prompt + steps - 1
    return kv_bytes_per_position(cfg, dtype) * ((first + last) / 2.0 + 2)


def bytes_per_token(cfg, dtype: str, prompt: int, steps: int) -> float:
    return weight_bytes_per_token(cfg, dtype) + mean_kv_bytes(cfg, dtype, prompt, steps)


def floor_ms(nbytes: float, copy_GBps: float) -> float:
    return nbytes / (copy_GBps * 1e9) * 1e3


def floors_markdown(shapes=(("llama2-7b", "float16"), ("llama2-7b", "bfloat16"),
                            ("smollm2-135m", "float16"), ("llama2-13b", "float16")),
                    copy_GBps: float = REFERENCE_COPY_GBPS, prompt: int = 32, steps: int = 256) -> str:
    rows = ["| shape | dtype | weights read / token (GB) | all params (GB) | KV / position (MB) "
            f"| mean KV / token, prompt {prompt} + {steps} steps (MB) | bytes / token (GB) "
            f"| floor ms/token @ {copy_GBps:g} GB/s | floor tok/s |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, dt in shapes:
        cfg = shape_config(name)
        w = weight_bytes_per_token(cfg, dt)
        b = bytes_per_token(cfg, dt, prompt, steps)
        ms = floor_ms(b, copy_GBps)
        rows.append(f"| {name} | {dt} | {w / 1e9:.4f} | {all_params_bytes(cfg, dt) / 1e9:.4f} "
                    f"| {kv_bytes_per_position(cfg, dt) / 1e6:.4f} | {mean_kv_bytes(cfg, dt, prompt, steps) / 1e6:.2f} "
                    f"| {b / 1e9:.4f} | {ms:.3f} | {1e3 / ms:,.0f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copy-GBps", type=float, default=REFERENCE_COPY_GBPS)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=256)
    a = ap.parse_args(argv)
    print(floors_markdown(copy_GBps=a.copy_GBps, prompt=a.prompt, steps=a.steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
