"""The weight arena: every weight of the model in one contiguous device allocation, in
our layout (fused QKV, fused gate|up, tied lm_head), 256-byte aligned, fp32/fp16/bf16.

`load_hf_folder` reads HF safetensors (single file or sharded) with the `safetensors`
library; `synthetic_weights` draws seeded random weights directly in device memory.
Both return a `ModelWeights` whose tensors are views of `arena` and whose raw pointers
the CUDA extension takes.

Quantized models (`quant` int8/int4, server/model/quant.py, docs/quantization.md): every projection
and the lm_head is a `QuantLinear` whose q/scale/minv are views of a second, byte arena `qarena`
(256-byte aligned too); the embedding, the norms and the biases stay in `arena`. Which matrix
becomes what is a `schemes` dict {matrix name: (mode, group)} (`quant_schemes`; the GGUF reader
builds its own from the file's tensor types); a matrix not in it stays dense in `arena`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from case4_errors import BadInput
from server.model.config import ConfigError, ModelConfig, hf_config_dict
from server.model.quant import GROUP_SIZES, MODES, QuantLinear, empty_quant, quantize_rtn, random_quant

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
    w_qkv: torch.Tensor       # [(Hq+2*Hkv)*D, H]  rows: Q heads, K heads, V heads  (or a QuantLinear)
    w_o: torch.Tensor         # [H, Hq*D]                                          (or a QuantLinear)
    mlp_norm: torch.Tensor    # [H]
    w_gu: torch.Tensor        # [2*I, H]  rows [0,I) gate, [I,2I) up               (or a QuantLinear)
    w_down: torch.Tensor      # [H, I]                                             (or a QuantLinear)


MATRICES = ("w_qkv", "w_o", "w_gu", "w_down")


def _ptr(t) -> int | dict:
    """A tensor's device pointer, or a QuantLinear's dict (docs/quantization.md)."""
    if isinstance(t, QuantLinear):
        return {"mode": t.mode, "group": t.group, "q": t.q.data_ptr(), "scale": t.scale.data_ptr(),
                "minv": 0 if t.minv is None else t.minv.data_ptr()}
    return t.data_ptr()


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
    quant: str = "none"                    # "none" | "int8" | "int4": the mode of the layers' QuantLinears
    group: int = 0                         # the group size every QuantLinear shares; 0 when they differ (per-row
                                           # int8, a GGUF's lm_head, int4's default on a K 128 does not divide)
    qarena: torch.Tensor | None = None     # uint8: every QuantLinear's q/scale/minv (quantized models)

    @property
    def dtype(self) -> torch.dtype:
        return self.arena.dtype

    @property
    def device(self) -> torch.device:
        return self.arena.device

    def pointers(self) -> dict:
        """Raw device pointers for the extension: ints, except that a QuantLinear field is a dict
        {"mode", "group", "q", "scale", "minv" (0 for int8)}; a layer's "b_qkv" only where the model has
        q/k/v biases (as the cuda backend's plan)."""
        return {
            "embed": self.embed.data_ptr(), "final_norm": self.final_norm.data_ptr(),
            "lm_head": _ptr(self.lm_head), "rope_cos": self.rope_cos.data_ptr(),
            "rope_sin": self.rope_sin.data_ptr(),
            "layers": [{**{k: _ptr(getattr(lw, k)) for k in LayerWeights.__dataclass_fields__},
                        **({"b_qkv": self.b_qkv[l].data_ptr()} if self.b_qkv else {})}
                       for l, lw in enumerate(self.layers)],
        }

    def quant_linears(self) -> list[QuantLinear]:
        mats = [getattr(lw, k) for lw in self.layers for k in MATRICES] + [self.lm_head]
        return [m for m in mats if isinstance(m, QuantLinear)]

    def quant_bytes(self) -> int:
        """Bytes a decode step reads from quantized matrices (q + scale + minv of each; 0 unquantized)."""
        return sum(m.nbytes() for m in self.quant_linears())

    def nbytes(self) -> int:
        """Resident weight bytes: both arenas."""
        n = self.arena.numel() * self.arena.element_size()
        return n + (0 if self.qarena is None else self.qarena.numel())


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
    if cfg.rope_freq_factors:  # a GGUF's rope_freqs: ggml's rope divides each pair's theta by its factor
        inv_freq = inv_freq / torch.tensor(cfg.rope_freq_factors, dtype=torch.float32)
    return inv_freq


def rope_tables(cfg: ModelConfig, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_seq, R/2] in fp32, computed the way HF's RoPE of cfg.rope_type does (every
    type we take has attention_factor 1: no scaling of cos/sin). Both backends read these."""
    inv_freq = rope_inv_freq(cfg)
    pos = torch.arange(cfg.max_seq_len, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]
    return freqs.cos().contiguous().to(device), freqs.sin().contiguous().to(device)


def matrix_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """[n, k] of every matrix a decode step multiplies by: the layers' projections and lm_head."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    out = {}
    for l in range(cfg.num_layers):
        out.update({f"{l}.w_qkv": (cfg.qkv_rows, H), f"{l}.w_o": (H, cfg.q_dim),
                    f"{l}.w_gu": (2 * I, H), f"{l}.w_down": (H, I)})
    out["lm_head"] = (cfg.vocab_size, H)
    return out


def quant_schemes(cfg: ModelConfig, quant: str, group: int | None, where: str) -> dict[str, tuple[str, int]]:
    """{matrix: (mode, group)} for load-time quantization of every projection and the lm_head.
    int8: one scale per row unless `group` is given. int4: `group`, or by default 128 where it divides
    the matrix's input dimension and else the largest of 64, 32 that does. A given group that does not
    divide an input dimension is a BadInput naming `where` (the model) and the matrix."""
    if quant not in MODES:
        raise BadInput(f"--quant must be one of {', '.join(MODES)}, got '{quant}'")
    if quant == "none":
        return {}
    if group is not None and group not in GROUP_SIZES:
        raise BadInput(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group}")
    out = {}
    for name, (n, k) in matrix_shapes(cfg).items():
        if group is not None:
            if k % group:
                raise ConfigError(f"{where}: --group-size {group} does not divide the input dimension {k} of "
                                  f"{name.split('.')[-1]} (choose a group size that divides {k})")
            g = group
        elif quant == "int8":
            g = k
        else:
            fits = [g for g in sorted(GROUP_SIZES, reverse=True) if k % g == 0]
            if not fits:
                raise ConfigError(f"{where}: int4 needs input dimensions that are multiples of 32; "
                                  f"{name.split('.')[-1]} has {k}")
            g = fits[0]
        out[name] = (quant, g)
    return out


def _plan(cfg: ModelConfig, elem: int, schemes: dict | None = None) -> tuple[dict[str, tuple[int, tuple]], int]:
    """Offsets (in elements) of every dense tensor in the arena, each 256-byte aligned (the matrices
    in `schemes` live in the byte arena instead: `_qplan`)."""
    schemes = schemes or {}
    H, I, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: list[tuple[str, tuple]] = [("embed", (V, H)), ("final_norm", (H,))]
    if not cfg.tie_word_embeddings and "lm_head" not in schemes:
        shapes.append(("lm_head", (V, H)))
    for l in range(cfg.num_layers):
        shapes += [(f"{l}.attn_norm", (H,)), (f"{l}.w_qkv", (cfg.qkv_rows, H)), (f"{l}.w_o", (H, cfg.q_dim)),
                   (f"{l}.mlp_norm", (H,)), (f"{l}.w_gu", (2 * I, H)), (f"{l}.w_down", (H, I))]
        if cfg.qkv_bias:  # after the layer's matrices: models without biases keep their layout
            shapes.append((f"{l}.b_qkv", (cfg.qkv_rows,)))
    shapes = [(n, s) for n, s in shapes if n not in schemes]
    align = ALIGN_BYTES // elem
    off, plan = 0, {}
    for name, shape in shapes:
        n = 1
        for s in shape:
            n *= s
        plan[name] = (off, shape)
        off += (n + align - 1) // align * align
    return plan, off


def _qplan(cfg: ModelConfig, schemes: dict) -> tuple[dict[str, dict[str, tuple[int, int]]], int]:
    """Byte offsets and sizes of each quantized matrix's q, scale, minv in the byte arena."""
    shapes = matrix_shapes(cfg)
    off, plan = 0, {}
    for name, (mode, g) in schemes.items():
        n, k = shapes[name]
        parts = {"q": n * k if mode == "int8" else n * k // 2, "scale": n * (k // g) * 2}
        if mode == "int4":
            parts["minv"] = n * (k // g) * 2
        plan[name] = {}
        for part, nb in parts.items():
            plan[name][part] = (off, nb)
            off += (nb + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES
    return plan, off


def arena_bytes(cfg: ModelConfig, dtype: str | torch.dtype, schemes: dict | None = None) -> int:
    """Bytes of the weight arenas of `cfg` in `dtype` (alignment padding included): the dense arena
    plus, for the matrices in `schemes`, the quantized byte arena."""
    elem = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return _plan(cfg, elem, schemes)[1] * elem + (_qplan(cfg, schemes)[1] if schemes else 0)


def _summary(schemes: dict) -> tuple[str, int]:
    """ModelWeights.quant / .group for a schemes dict."""
    if not schemes:
        return "none", 0
    layer_modes = [m for n, (m, _) in schemes.items() if n != "lm_head"] or [schemes["lm_head"][0]]
    mode = max(set(layer_modes), key=layer_modes.count)
    groups = {g for _, g in schemes.values()}
    return mode, groups.pop() if len(groups) == 1 else 0


def _assemble(cfg: ModelConfig, dtype: torch.dtype, device, fill, source: str, schemes: dict | None = None,
              qfill=None) -> ModelWeights:
    """Allocate the arenas once and let `fill(name, view)` write each dense tensor and
    `qfill(name, quant_linear)` each quantized matrix (its q/scale/minv views of the byte arena)."""
    schemes = schemes or {}
    elem = torch.empty((), dtype=dtype).element_size()
    plan, total = _plan(cfg, elem, schemes)
    arena = torch.empty(total, dtype=dtype, device=device)
    views = {}
    for name, (off, shape) in plan.items():
        n = 1
        for s in shape:
            n *= s
        views[name] = arena[off:off + n].view(shape)
        fill(name, views[name])
    qarena = None
    if schemes:
        qp, qtotal = _qplan(cfg, schemes)
        qarena = torch.empty(qtotal, dtype=torch.uint8, device=device)
        shapes = matrix_shapes(cfg)
        for name, (mode, g) in schemes.items():
            n, k = shapes[name]
            ql = empty_quant(n, k, mode, g, "meta")  # the layout; the storage is the arena's

            def view(part, like):
                off, nb = qp[name][part]
                return qarena[off:off + nb].view(like.dtype).view(like.shape)
            ql = QuantLinear(mode, n, k, g, view("q", ql.q), view("scale", ql.scale),
                             view("minv", ql.minv) if mode == "int4" else None)
            qfill(name, ql)
            views[name] = ql
    views.setdefault("lm_head", views["embed"])
    layers = [LayerWeights(*(views[f"{l}.{k}"] for k in LayerWeights.__dataclass_fields__))
              for l in range(cfg.num_layers)]
    cos, sin = rope_tables(cfg, device)
    b_qkv = [views[f"{l}.b_qkv"] for l in range(cfg.num_layers)] if cfg.qkv_bias else []
    quant, group = _summary(schemes)
    return ModelWeights(cfg, arena, views["embed"], views["final_norm"], views["lm_head"], layers,
                        cos, sin, source, b_qkv, quant, group, qarena)


# ---------------------------------------------------------------------------------------
# HF safetensors folders

def _hf_sources(cfg: ModelConfig, name: str) -> list[str]:
    """HF tensor names that make up one of our arena tensors (concatenated along rows)."""
    if name == "embed":
        return ["model.embed_tokens.weight"]
    if name == "final_norm":
        return ["model.norm.weight"]
    if name == "lm_head":  # read only when it is its own matrix: untied, or tied and quantized (from the table)
        return ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
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
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise WeightLoadError(f"{index}: not a valid safetensors index ({e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightLoadError(f"{index}: not a valid safetensors index (weight_map must map tensor names "
                                  f"to file names)")
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


def load_hf_folder(folder: str | Path, cfg: ModelConfig, dtype="float32", device="cpu",
                   schemes: dict | None = None) -> ModelWeights:
    """The folder's weights in our arena; the matrices in `schemes` quantized at load (round to
    nearest, quant.quantize_rtn) from the file's values in fp32, one matrix at a time (the only
    full-precision copy is that one matrix)."""
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
            dst.copy_(t.to(view.dtype))  # the arena's dtype, or fp32 for a matrix to quantize
            finite.append((tname, torch.isfinite(dst).all()))  # no sync: one pass over what was written
            row += t.shape[0]

    def qfill(name: str, ql: QuantLinear) -> None:
        full = torch.empty(ql.shape, dtype=torch.float32, device=device)
        fill(name, full)  # reads, checks shapes and finiteness in fp32
        q = quantize_rtn(full, ql.mode, ql.group)
        del full
        ql.q.copy_(q.q), ql.scale.copy_(q.scale)
        if ql.minv is not None:
            ql.minv.copy_(q.minv)
        # an fp16 scale or minimum that overflowed: the matrix's range is beyond fp16's
        finite.append((_hf_sources(cfg, name)[0], torch.isfinite(ql.scale).all() &
                       (torch.isfinite(ql.minv).all() if ql.minv is not None else True)))

    try:
        w = _assemble(cfg, dtype, device, fill, str(folder), schemes, qfill)
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
    """Our arena back in HF names (views, no copies; a QuantLinear as its exact fp32 dequantized
    values): to build HF models on the same weights."""
    from server.model.quant import dequantize
    cfg = w.cfg
    dense = lambda t: dequantize(t) if isinstance(t, QuantLinear) else t  # noqa: E731
    sd = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.final_norm,
          "lm_head.weight": dense(w.lm_head)}
    q, kv, I = cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
    for l, lw in enumerate(w.layers):
        lw = LayerWeights(*(dense(getattr(lw, k)) for k in LayerWeights.__dataclass_fields__))
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

def synthetic_weights(cfg: ModelConfig, dtype="float16", device="cpu", seed: int = 0,
                      schemes: dict | None = None) -> ModelWeights:
    """Seeded random weights drawn directly on `device`.

    Scales keep activations O(1) through any depth: matrices ~ N(0, 1/in_features),
    norms ~ 1 + N(0, 0.1), embedding ~ N(0, 1) and an lm_head whose logits have std ~4, so
    that greedy decoding has clear winners (tests compare argmax token for token).
    The matrices in `schemes` are drawn quantized, in place in the byte arena (quant.random_quant,
    the same standard deviations): no float copy of them exists at any time.
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

    def qfill(name: str, ql: QuantLinear) -> None:
        random_quant(ql, 4.0 / H ** 0.5 if name == "lm_head" else ql.k ** -0.5, gen)

    return _assemble(cfg, dtype, device, fill, "synthetic", schemes, qfill)


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
