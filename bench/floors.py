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
DESIGN's 13.48 GB for Llama-2-7B counts every parameter including the full embedding
table; `all_params_bytes` gives that figure too, for comparison.

Run `python bench/floors.py` to print the floors table that docs/performance.md holds.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

# The DESIGN's measured reference copy rate on one H100 80GB HBM3 (read + write).
REFERENCE_COPY_GBPS = 3007.0

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}

# Fallback shapes, used only where custom_kernels.config.SYNTHETIC_SHAPES is not
# importable (docs, tests without the package). Field names follow ModelConfig.
_FALLBACK = {
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
                      num_heads=32, num_kv_heads=32, head_dim=128, max_seq_len=4096,
                      tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama2-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40,
                       num_heads=40, num_kv_heads=40, head_dim=128, max_seq_len=4096,
                       tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                         num_heads=9, num_kv_heads=3, head_dim=64, max_seq_len=8192,
                         tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=32, max_seq_len=512,
                 tie_word_embeddings=False, rope_theta=10000.0, rms_norm_eps=1e-5),
}


def _ns(d: dict) -> SimpleNamespace:
    d = dict(d)
    d.setdefault("arch", "LlamaForCausalLM")
    d.setdefault("rotary_dim", d["head_dim"])
    d.setdefault("bos_token_id", 1)
    d.setdefault("eos_token_ids", (2,))
    return SimpleNamespace(**d)


def _coerce(name: str, value):
    """SYNTHETIC_SHAPES values may be a ModelConfig, a dict of ModelConfig fields, or an HF dict."""
    if hasattr(value, "hidden_size") and hasattr(value, "num_layers"):
        return value
    if isinstance(value, dict):
        if "num_layers" in value:
            return _ns(value)
        try:  # an HF-style config.json dict
            from custom_kernels.config import config_from_hf
            return config_from_hf(value)
        except Exception:
            pass
        if "num_hidden_layers" in value:
            return _ns(dict(
                vocab_size=value["vocab_size"], hidden_size=value["hidden_size"],
                intermediate_size=value["intermediate_size"], num_layers=value["num_hidden_layers"],
                num_heads=value["num_attention_heads"],
                num_kv_heads=value.get("num_key_value_heads", value["num_attention_heads"]),
                head_dim=value.get("head_dim") or value["hidden_size"] // value["num_attention_heads"],
                max_seq_len=value.get("max_position_embeddings", 4096),
                tie_word_embeddings=value.get("tie_word_embeddings", False),
                rope_theta=value.get("rope_theta", 10000.0), rms_norm_eps=value.get("rms_norm_eps", 1e-5)))
    raise TypeError(f"cannot read shape {name!r} from {type(value).__name__}")


def shape_config(name: str):
    """The ModelConfig (or an object with its fields) of synthetic shape `name`."""
    try:
        from custom_kernels.config import SYNTHETIC_SHAPES  # the project's own definition wins
        if name in SYNTHETIC_SHAPES:
            return _coerce(name, SYNTHETIC_SHAPES[name])
    except Exception:
        pass
    if name in _FALLBACK:
        return _ns(_FALLBACK[name])
    raise KeyError(f"unknown synthetic shape {name!r}")


def dtype_bytes(dtype: str) -> int:
    return DTYPE_BYTES[str(dtype).replace("torch.", "")]


def layer_weight_elems(cfg) -> int:
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Hq, Hkv = cfg.num_heads, cfg.num_kv_heads
    return (H                       # attn_norm
            + (Hq + 2 * Hkv) * D * H  # fused QKV
            + H * Hq * D              # O
            + H                       # mlp_norm
            + 2 * I * H               # fused gate|up
            + H * I)                  # down


def weight_bytes_per_token(cfg, dtype: str) -> int:
    """Weights one decode step reads: all layer matrices and norms, final norm, lm_head, one embedding row."""
    H, V = cfg.hidden_size, cfg.vocab_size
    elems = cfg.num_layers * layer_weight_elems(cfg) + H + V * H + H
    return elems * dtype_bytes(dtype)


def all_params_bytes(cfg, dtype: str) -> int:
    """Every parameter once (full embedding table; lm_head only when untied): the checkpoint size."""
    H, V = cfg.hidden_size, cfg.vocab_size
    elems = cfg.num_layers * layer_weight_elems(cfg) + H + V * H
    if not cfg.tie_word_embeddings:
        elems += V * H
    return elems * dtype_bytes(dtype)


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
