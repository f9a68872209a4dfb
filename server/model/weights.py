"""The weight arena: every weight of the model in one contiguous device allocation, in
our layout (fused QKV, fused gate|up, tied lm_head), 256-byte aligned, fp32/fp16/bf16.

`load_hf_folder` reads HF safetensors (single file or sharded) with the `safetensors`
library; `synthetic_weights` draws seeded random weights directly in device memory.
Both return a `ModelWeights` whose tensors are views of `arena` and whose raw pointers
the CUDA extension takes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from case4_errors import BadInput
from server.model.config import ConfigError, ModelConfig, hf_config_dict

ALIGN_BYTES = 256
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class WeightLoadError(BadInput):
    """A missing, misshapen or unreadable tensor; the message names the file and tensor."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise BadInput(f"unknown dtype '{name}' (choose float32, float16 or bfloat16)")
    return DTYPES[name]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor   # [H]
    w_qkv: torch.Tensor       # [(Hq+2*Hkv)*D, H]  rows: Q heads, K heads, V heads
    w_o: torch.Tensor         # [H, Hq*D]
    mlp_norm: torch.Tensor    # [H]
    w_gu: torch.Tensor        # [2*I, H]  rows [0,I) gate, [I,2I) up
    w_down: torch.Tensor      # [H, I]


@dataclass
class ModelWeights:
    cfg: ModelConfig
    arena: torch.Tensor                    # [n] one allocation, model dtype
    embed: torch.Tensor                    # [V, H]
    final_norm: torch.Tensor               # [H]
    lm_head: torch.Tensor                  # [V, H] (a view of embed when tied)
    layers: list[LayerWeights]             # [L]
    rope_cos: torch.Tensor                 # [max_seq, R/2] fp32
    rope_sin: torch.Tensor                 # [max_seq, R/2] fp32
    source: str = ""                       # where the weights came from (folder or synthetic:<shape>)
    b_qkv: list[torch.Tensor] = field(default_factory=list)  # [L] x [(Hq+2*Hkv)*D] when cfg.qkv_bias, else []

    @property
    def dtype(self) -> torch.dtype:
        return self.arena.dtype

    @property
    def device(self) -> torch.device:
        return self.arena.device

    def pointers(self) -> dict:
        """Raw device pointers and shapes for the extension."""
        return {
            "embed": self.embed.data_ptr(), "final_norm": self.final_norm.data_ptr(),
            "lm_head": self.lm_head.data_ptr(), "rope_cos": self.rope_cos.data_ptr(),
            "rope_sin": self.rope_sin.data_ptr(),
            "layers": [{k: getattr(lw, k).data_ptr() for k in LayerWeights.__dataclass_fields__}
                       for lw in self.layers],
        }


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """inv_freq [R/2] fp32, computed as transformers' modeling_rope_utils does for cfg.rope_type
    (the same torch ops in the same order, so the tables match HF bit for bit)."""
    R, base, p = cfg.rotary_dim, cfg.rope_theta, cfg.rope_params
    if cfg.rope_type == "dynamic":
        # _compute_dynamic_ntk_parameters at seq_len = max_position_embeddings (where transformers
        # starts, and stays while the sequence fits); a longer table would need the base to grow
        # with the sequence, which static tables cannot do
        mpe = int(p["max_position_embeddings"])
        if cfg.max_seq_len > mpe:
            raise ConfigError(f"config field 'rope_scaling.rope_type': dynamic RoPE past max_position_embeddings="
                              f"{mpe} is not implemented (served context {cfg.max_seq_len})")
        factor = p["factor"]
        base = base * ((factor * mpe / mpe) - (factor - 1)) ** (R / (R - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))
    if cfg.rope_type == "linear":
        inv_freq /= p["factor"]
    elif cfg.rope_type == "llama3":
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_len = p["original_max_position_embeddings"]
        old_len = int(old_len) if float(old_len).is_integer() else old_len
        low_wavelen, high_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(cfg: ModelConfig, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq, R/2] in fp32, computed the way HF's RoPE of cfg.rope_type does (every
    type we take has attention_factor 1: no scaling of cos/sin). Both backends read these."""
    inv_freq = rope_inv_freq(cfg)
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous().to(device), freqs.sin().contiguous().to(device)


def _plan(cfg: ModelConfig, elem: int) -> tuple[dict[str, tuple[int, tuple]], int]:
    """Offsets (in elements) of every tensor in the arena, each 256-byte aligned."""
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: list[tuple[str, tuple]] = [("embed", (V, H)), ("final_norm", (H,))]
    if not cfg.tie_word_embeddings:
        shapes.append(("lm_head", (V, H)))
    for l in range(cfg.num_layers):
        shapes += [(f"{l}.attn_norm", (H,)), (f"{l}.w_qkv", (cfg.qkv_rows, H)), (f"{l}.w_o", (H, cfg.q_dim)),
                   (f"{l}.mlp_norm", (H,)), (f"{l}.w_gu", (2 * I, H)), (f"{l}.w_down", (H, I))]
        if cfg.qkv_bias:  # after the layer's matrices: models without biases keep their layout
            shapes.append((f"{l}.b_qkv", (cfg.qkv_rows,)))
    align = ALIGN_BYTES // elem
    off, plan = 0, {}
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        plan[name] = (off, shape)
        off += (n + align - 1) // align * align
    return plan, off


def arena_bytes(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """Bytes of the weight arena of `cfg` in `dtype` (alignment padding included)."""
    elem = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return _plan(cfg, elem)[1] * elem


def _assemble(cfg: ModelConfig, dtype: torch.dtype, device, fill, source: str) -> ModelWeights:
    """Allocate the arena once and let `fill(name, view)` write each tensor."""
    elem = torch.empty((), dtype=dtype).element_size()
    plan, total = _plan(cfg, elem)
    arena = torch.empty(total, dtype=dtype, device=device)
    views = {}
    for name, (off, shape) in plan.items():
        n = 1
        for s in shape:
            n *= s
        views[name] = arena[off:off + n].view(shape)
        fill(name, views[name])
    views.setdefault("lm_head", views["embed"])
    layers = [LayerWeights(*(views[f"{l}.{k}"] for k in LayerWeights.__dataclass_fields__))
              for l in range(cfg.num_layers)]
    cos, sin = rope_tables(cfg, device)
    b_qkv = [views[f"{l}.b_qkv"] for l in range(cfg.num_layers)] if cfg.qkv_bias else []
    return ModelWeights(cfg, arena, views["embed"], views["final_norm"], views["lm_head"], layers,
                        cos, sin, source, b_qkv)


# ---------------------------------------------------------------------------------------
# HF safetensors folders

def _hf_sources(cfg: ModelConfig, name: str) -> list[str]:
    """HF tensor names that make up one of our arena tensors (concatenated along rows)."""
    if name == "embed":
        return ["model.embed_tokens.weight"]
    if name == "final_norm":
        return ["model.norm.weight"]
    if name == "lm_head":
        return ["lm_head.weight"]
    l, k = name.split(".")
    p = f"model.layers.{l}."
    return {
        "attn_norm": [p + "input_layernorm.weight"],
        "w_qkv": [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"],
        "b_qkv": [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"],
        "w_o": [p + "self_attn.o_proj.weight"],
        "mlp_norm": [p + "post_attention_layernorm.weight"],
        "w_gu": [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
        "w_down": [p + "mlp.down_proj.weight"],
    }[k]


def safetensors_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it (single file or sharded index)."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise WeightLoadError(f"{index}: not a valid safetensors index ({e})") from None
        return {k: folder / v for k, v in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(f"{folder}: no *.safetensors file")
    where = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    where[k] = f
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise WeightLoadError(f"{f}: unreadable safetensors file ({e})") from None
    return where


def load_hf_folder(folder: str | Path, cfg: ModelConfig, dtype="float32", device="cpu") -> ModelWeights:
    from safetensors import safe_open

    folder = Path(folder)
    dtype = parse_dtype(dtype)
    where = safetensors_files(folder)
    # tied models: the embedding serves as lm_head; a stored lm_head.weight copy is ignored
    handles: dict[Path, object] = {}
    finite: list[tuple[str, torch.Tensor]] = []  # (HF name, 0-d bool on the device), read once at the end

    def read(tname: str) -> torch.Tensor:
        if tname not in where:
            raise WeightLoadError(f"{folder}: tensor '{tname}' is missing")
        f = where[tname]
        try:
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            return handles[f].get_tensor(tname)
        except WeightLoadError:
            raise
        except Exception as e:
            raise WeightLoadError(f"{f}: tensor '{tname}' could not be read ({type(e).__name__}: {e})") from None

    def fill(name: str, view: torch.Tensor) -> None:
        row = 0
        for tname in _hf_sources(cfg, name):
            t = read(tname)
            expect = _expected_shape(cfg, tname)
            if tuple(t.shape) != expect:
                raise WeightLoadError(f"{where[tname]}: tensor '{tname}' has shape {tuple(t.shape)}, "
                                      f"expected {expect}")
            dst = view[row:row + t.shape[0]]
            dst.copy_(t.to(dtype))
            finite.append((tname, torch.isfinite(dst).all()))  # no sync: one pass over what was written
            row += t.shape[0]

    try:
        w = _assemble(cfg, dtype, device, fill, str(folder))
        _check_finite(finite, read, where, dtype)
        return w
    finally:
        handles.clear()


def _check_finite(finite: list[tuple[str, torch.Tensor]], read, where: dict[str, Path], dtype: torch.dtype) -> None:
    """WeightLoadError naming the first tensor with a NaN or Inf in the arena (one host sync
    for all of them): one the file holds, or one made by converting to a narrower dtype."""
    ok = torch.stack([f for _, f in finite])
    if bool(ok.all()):
        return
    tname = finite[int((~ok).nonzero()[0])][0]
    src = read(tname)
    bad = int((~torch.isfinite(src)).sum())
    if bad:
        raise WeightLoadError(f"{where[tname]}: tensor '{tname}' holds {bad} NaN or Inf value(s) of "
                              f"{src.numel()} (a corrupt or badly converted checkpoint)")
    dt = str(dtype).replace("torch.", "")
    raise WeightLoadError(f"{where[tname]}: tensor '{tname}' has values beyond the range of {dt} "
                          f"(max |w| = {src.abs().max().item():.3g}): use --dtype bfloat16 or float32")


def _expected_shape(cfg: ModelConfig, tname: str) -> tuple:
    H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    table = {"embed_tokens": (cfg.vocab_size, H), "lm_head": (cfg.vocab_size, H), "norm": (H,),
             "input_layernorm": (H,), "post_attention_layernorm": (H,), "q_proj": (cfg.q_dim, H),
             "k_proj": (cfg.kv_dim, H), "v_proj": (cfg.kv_dim, H), "o_proj": (H, cfg.q_dim),
             "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    shape = table[tname.split(".")[-2]]
    return shape[:1] if tname.endswith(".bias") else shape


def hf_state_dict(w: ModelWeights) -> dict[str, torch.Tensor]:
    """Our arena back in HF names (views, no copies): to build HF models on the same weights."""
    cfg = w.cfg
    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm, "lm_head.weight": w.lm_head}
    q, kv, I = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    for l, lw in enumerate(w.layers):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = lw.attn_norm
        sd[p + "self_attn.q_proj.weight"] = lw.w_qkv[:q]
        sd[p + "self_attn.k_proj.weight"] = lw.w_qkv[q:q + kv]
        sd[p + "self_attn.v_proj.weight"] = lw.w_qkv[q + kv:]
        if w.b_qkv:
            b = w.b_qkv[l]
            sd[p + "self_attn.q_proj.bias"], sd[p + "self_attn.k_proj.bias"] = b[:q], b[q:q + kv]
            sd[p + "self_attn.v_proj.bias"] = b[q + kv:]
        sd[p + "self_attn.o_proj.weight"] = lw.w_o
        sd[p + "post_attention_layernorm.weight"] = lw.mlp_norm
        sd[p + "mlp.gate_proj.weight"] = lw.w_gu[:I]
        sd[p + "mlp.up_proj.weight"] = lw.w_gu[I:]
        sd[p + "mlp.down_proj.weight"] = lw.w_down
    return sd


# ---------------------------------------------------------------------------------------
# Synthetic models

def synthetic_weights(cfg: ModelConfig, dtype="float16", device="cpu", seed: int = 0) -> ModelWeights:
    """Seeded random weights drawn directly on `device`.

    Scales keep activations O(1) through any depth: matrices ~ N(0, 1/in_features),
    norms ~ 1 + N(0, 0.1), embedding ~ N(0, 1) and an lm_head whose logits have std ~4, so
    that greedy decoding has clear winners (tests compare argmax token for token).
    """
    dtype = parse_dtype(dtype)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    H = cfg.hidden_size

    def fill(name: str, view: torch.Tensor) -> None:
        kind = name.split(".")[-1]
        tmp = torch.empty(view.shape, dtype=torch.float32, device=device)
        if kind.endswith("norm"):
            tmp.normal_(0.0, 0.1, generator=gen).add_(1.0)
        elif kind == "embed":
            tmp.normal_(0.0, 4.0 / H ** 0.5 if cfg.tie_word_embeddings else 1.0, generator=gen)
        elif kind == "lm_head":
            tmp.normal_(0.0, 4.0 / H ** 0.5, generator=gen)
        elif kind == "b_qkv":
            tmp.normal_(0.0, 0.1, generator=gen)
        else:
            tmp.normal_(0.0, view.shape[1] ** -0.5, generator=gen)
        view.copy_(tmp)
        del tmp

    return _assemble(cfg, dtype, device, fill, "synthetic")


def save_hf_folder(w: ModelWeights, folder: str | Path) -> None:
    """Write our weights as an HF folder (config.json + model.safetensors): for tests."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu().clone() for k, v in hf_state_dict(w).items()}
    if w.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(hf_config_dict(w.cfg), indent=1))
