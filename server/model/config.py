"""Model configuration: one frozen dataclass, the table of supported architectures, HF
config parsing and validation, and the named synthetic shapes (gpt-fast style table).

Everything downstream (weight arena, KV arena, kernels, reference) is sized from a
`ModelConfig`; nothing reads the HF config dict again after `config_from_hf`. A new
architecture is one `ARCHITECTURES` entry (plus the parsing of any field it handles that
the others refuse); docs/architecture.md, "The model", says where the rest of the path lives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from case4_errors import BadInput


class ConfigError(BadInput):
    """An unsupported or malformed model config; the message names the field."""


@dataclass(frozen=True)
class Refusal:
    """A config.json field the kernels do not implement: refused, by name, when `applies`."""
    field: str
    applies: Callable[[dict], bool]  # (the HF config dict) -> the field asks for what we lack
    why: str                         # the message after "config field '<field>': "


# Every field that some HF Llama-family class reads and no backend implements. Fields an
# architecture handles are parsed in config_from_hf instead (Mistral's sliding_window, Qwen2's
# use_sliding_window / max_window_layers / layer_types); RoPE types are checked in _rope.
REFUSALS: dict[str, Refusal] = {r.field: r for r in (
    Refusal("attention_bias", lambda hf: bool(hf.get("attention_bias")),
            "attention biases are not supported (q/k/v/o; only Qwen2's q/k/v biases are)"),
    Refusal("mlp_bias", lambda hf: bool(hf.get("mlp_bias")), "MLP biases are not supported"),
    Refusal("sliding_window",
            lambda hf: hf.get("sliding_window") not in (None, 0) and hf.get("use_sliding_window", True),
            "sliding-window attention ({sliding_window}) is not supported for this architecture "
            "(MistralForCausalLM and Qwen2ForCausalLM have it)"),
    Refusal("layer_types", lambda hf: any(t != "full_attention" for t in hf.get("layer_types") or ()),
            "layer types other than full_attention ({layer_types}) are not supported for this architecture"),
    Refusal("hidden_act", lambda hf: hf.get("hidden_act", "silu") != "silu",
            "'{hidden_act}' is not supported (only silu)"),
)}


@dataclass(frozen=True)
class Architecture:
    """One supported HF architecture: how config.json names it, and what of it is refused."""
    name: str                        # config.json "architectures"[0]
    model_type: str                  # config.json "model_type" (names the class when "architectures" is absent)
    refuses: tuple[str, ...] = tuple(REFUSALS)  # keys of REFUSALS checked for it; the rest it handles
    qkv_bias: bool = False           # q/k/v_proj carry a bias (Qwen2), stored fused in the arena
    # RoPE types other than default/linear/dynamic/llama3 are refused for every architecture (_rope).


_ALL_BUT = lambda *handled: tuple(f for f in REFUSALS if f not in handled)  # noqa: E731
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama"),
    # Mistral: every layer attends within sliding_window (HF ignores layer_types for it, and so do we).
    Architecture("MistralForCausalLM", "mistral", _ALL_BUT("sliding_window", "layer_types")),
    # Qwen2 / Qwen2.5: q/k/v biases (no o bias); a window only where use_sliding_window, on the
    # layers >= max_window_layers (or as layer_types says).
    Architecture("Qwen2ForCausalLM", "qwen2", _ALL_BUT("sliding_window", "layer_types"), qkv_bias=True),
)}
SUPPORTED_ARCHS = tuple(ARCHITECTURES)


@dataclass(frozen=True)
class ModelConfig:
    arch: str                    # a key of ARCHITECTURES ("LlamaForCausalLM", ...)
    vocab_size: int              # V
    hidden_size: int             # H
    intermediate_size: int       # I
    num_layers: int              # L
    num_heads: int               # Hq: query heads
    num_kv_heads: int            # Hkv: key/value heads (GQA when Hkv < Hq)
    head_dim: int                # D
    rotary_dim: int              # R: the first R dims of each head are rotated (R <= D, even)
    rope_theta: float            # RoPE base
    rms_norm_eps: float
    max_seq_len: int             # positions the model was trained for (max_position_embeddings)
    tie_word_embeddings: bool    # lm_head shares the embedding matrix
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    rope_type: str = "default"   # "default", "linear", "dynamic" or "llama3": how rope_tables builds inv_freq
    rope_scaling: tuple[tuple[str, float], ...] = ()  # its parameters (factor, ...), as (name, value) pairs
    qkv_bias: bool = False       # q/k/v projections add a bias (Qwen2)
    sliding_window: int | None = None  # a query at position p sees keys p-window+1..p, on `sliding_layers`
    sliding_layers: tuple[int, ...] = ()
    # a GGUF's rope_freqs tensor (llama.cpp's Llama-3.1 scaling): pair i's inv_freq is divided by factor i
    # (ggml's freq_factors), on top of rope_type; R/2 of them, or () for none. No config.json has it.
    rope_freq_factors: tuple[float, ...] = ()

    @property
    def rope_params(self) -> dict[str, float]:
        return dict(self.rope_scaling)

    def window_of(self, layer: int) -> int | None:
        """The attention window of `layer`, or None when it attends to the whole prefix."""
        return self.sliding_window if layer in self.sliding_layers else None

    @property
    def q_dim(self) -> int:      # Hq * D
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:     # Hkv * D
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_rows(self) -> int:   # rows of the fused QKV weight
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def group(self) -> int:      # query heads per KV head
        return self.num_heads // self.num_kv_heads

    def weight_elements(self) -> int:
        """Elements in the weight arena (tied head counted once)."""
        H, I, V = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 2 * H + self.qkv_rows * H + H * self.q_dim + 2 * I * H + H * I
        per_layer += self.qkv_rows if self.qkv_bias else 0
        return self.num_layers * per_layer + H + V * H * (1 if self.tie_word_embeddings else 2)

    def decode_weight_bytes(self, elem_size: int) -> int:
        """Bytes of weights one decode step must read: every matrix and norm, the lm_head,
        and one embedding row."""
        H, V = self.hidden_size, self.vocab_size
        per_layer = 2 * H + self.qkv_rows * H + H * self.q_dim + 3 * self.intermediate_size * H
        per_layer += self.qkv_rows if self.qkv_bias else 0
        return elem_size * (self.num_layers * per_layer + H + V * H + H)

    def validate(self) -> "ModelConfig":
        def need(cond: bool, field: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{field}': {why}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_seq_len"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "must be a positive integer")
        need(self.num_heads % self.num_kv_heads == 0, "num_key_value_heads",
             f"{self.num_kv_heads} does not divide num_attention_heads={self.num_heads}")
        need(self.head_dim % 8 == 0, "head_dim", f"{self.head_dim} is not a multiple of 8")
        need(self.hidden_size % 8 == 0, "hidden_size", f"{self.hidden_size} is not a multiple of 8")
        need(self.intermediate_size % 8 == 0, "intermediate_size",
             f"{self.intermediate_size} is not a multiple of 8")
        need(0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0, "partial_rotary_factor",
             f"rotary dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.rms_norm_eps >= 0, "rms_norm_eps", f"must be >= 0, got {self.rms_norm_eps}")
        return self


def _number(hf: dict, field: str, default: float, value=None) -> float:
    """A config field that must be a finite number (ConfigError naming it otherwise): float("x")
    was a ValueError traceback, and a NaN eps or factor made every logit NaN."""
    v = hf.get(field, default) if value is None else value
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"config field '{field}': must be a finite number, got {v!r}")
    return float(v)


def _object(hf: dict, field: str) -> dict:
    v = hf.get(field)
    if v is not None and not isinstance(v, dict):
        raise ConfigError(f"config field '{field}': must be an object of RoPE parameters, got {v!r}")
    return v or {}


ROPE_TYPES = ("default", "linear", "dynamic", "llama3")  # what rope_tables computes (server/model/weights.py)
_ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _rope(hf: dict) -> tuple[float, str, tuple[tuple[str, float], ...]]:
    """(rope_theta, rope_type, its parameters) from rope_parameters (transformers >= 5) or
    rope_scaling (older config.json files), read as transformers' standardize_rope_params does.
    Each of linear, dynamic and llama3 has attention_factor 1 in transformers, so the cos/sin
    tables are all they change."""
    params = _object(hf, "rope_parameters")
    scaling = _object(hf, "rope_scaling")
    kind = lambda d: d.get("rope_type", d.get("type")) or "default"  # noqa: E731
    # the one that asks for scaling decides (rope_parameters first, as transformers >= 5 writes it)
    src, name = (scaling, "rope_scaling") if kind(params) == "default" and scaling else (params, "rope_parameters")
    rtype = kind(src)
    if rtype not in ROPE_TYPES:
        raise ConfigError(f"config field '{name}.rope_type': unsupported RoPE type '{rtype}' "
                          f"(implemented: {', '.join(ROPE_TYPES)})")
    theta = hf.get("rope_theta", params.get("rope_theta", scaling.get("rope_theta")))
    if theta is None:
        theta = 10000.0  # the HF Llama default
    vals: dict[str, float] = {}
    for key in _ROPE_KEYS.get(rtype, ()):
        v = src.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
            raise ConfigError(f"config field '{name}.{key}': RoPE type '{rtype}' needs a positive number, got {v!r}")
        vals[key] = float(v)
    if rtype == "llama3":
        # transformers: a top-level original_max_position_embeddings wins, then the rope dict's,
        # then max_position_embeddings
        om = hf.get("original_max_position_embeddings", src.get("original_max_position_embeddings",
                                                                  hf.get("max_position_embeddings", 2048)))
        vals["original_max_position_embeddings"] = float(om)
        if vals["high_freq_factor"] == vals["low_freq_factor"]:
            raise ConfigError(f"config field '{name}.high_freq_factor': must differ from low_freq_factor")
    if rtype == "dynamic":
        # inv_freq depends on the sequence length past max_position_embeddings; below it, it is
        # the formula at seq_len = max_position_embeddings (rope_tables), and the served context
        # never exceeds it (with_max_seq)
        vals["max_position_embeddings"] = float(hf.get("max_position_embeddings", 2048))
    return _number(hf, "rope_theta", 10000.0, theta), rtype, tuple(sorted(vals.items()))


def _windows(hf: dict, arch: str, num_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, the layers it applies to), as the HF class of `arch` decides them."""
    w = hf.get("sliding_window")
    if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        w = None  # Qwen2Config drops the window unless use_sliding_window
    if w in (None, 0):
        return None, ()
    if not isinstance(w, int) or w < 1:
        raise ConfigError(f"config field 'sliding_window': must be a positive integer, got {w!r}")
    if arch == "MistralForCausalLM":
        return w, tuple(range(num_layers))
    types = hf.get("layer_types")
    if types is None:  # Qwen2Config's default: layers from max_window_layers on slide
        mwl = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(num_layers)]
    if len(types) != num_layers or any(t not in ("full_attention", "sliding_attention") for t in types):
        raise ConfigError(f"config field 'layer_types': expected {num_layers} of full_attention / "
                          f"sliding_attention, got {types}")
    return w, tuple(i for i, t in enumerate(types) if t == "sliding_attention")


def config_from_hf(hf: dict) -> ModelConfig:
    """Parse an HF `config.json` dict; refuse what the kernels do not implement."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"config field 'architectures': must be a list of class names, got {archs!r}")
    by_type = {a.model_type: a.name for a in ARCHITECTURES.values()}
    arch = archs[0] if archs else by_type.get(hf.get("model_type", ""), hf.get("model_type", "<none>"))
    if arch not in ARCHITECTURES:
        raise ConfigError(f"config field 'architectures': unsupported architecture '{arch}' "
                          f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    for field in ARCHITECTURES[arch].refuses:
        r = REFUSALS[field]
        if r.applies(hf):
            raise ConfigError(f"config field '{field}': " + r.why.format(**{field: hf.get(field)}))
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if key not in hf:
            raise ConfigError(f"config field '{key}': missing")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads", "head_dim",
                "max_position_embeddings"):
        v = hf.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ConfigError(f"config field '{key}': must be a positive integer, got {v!r}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or (hf["hidden_size"] // heads if heads else None)
    partial = _number(hf, "partial_rotary_factor", 1.0, hf.get("partial_rotary_factor", _object(
        hf, "rope_parameters").get("partial_rotary_factor", 1.0)))
    theta, rope_type, rope_scaling = _rope(hf)
    window, window_layers = _windows(hf, arch, hf["num_hidden_layers"])
    eos, bos = hf.get("eos_token_id"), hf.get("bos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    for key, ids in (("eos_token_id", eos_ids), ("bos_token_id", () if bos is None else (bos,))):
        if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            raise ConfigError(f"config field '{key}': must be a token id (an integer) or a list of them, "
                              f"got {hf[key]!r}")
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool) and tie is not None:
        raise ConfigError(f"config field 'tie_word_embeddings': must be true or false, got {tie!r}")
    return ModelConfig(
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial) if head_dim else 0,
        rope_theta=theta,
        rms_norm_eps=_number(hf, "rms_norm_eps", 1e-6),
        max_seq_len=2048 if hf.get("max_position_embeddings") is None else hf["max_position_embeddings"],
        tie_word_embeddings=bool(tie),
        bos_token_id=bos,
        eos_token_ids=eos_ids,
        rope_type=rope_type,
        rope_scaling=rope_scaling,
        qkv_bias=ARCHITECTURES[arch].qkv_bias,
        sliding_window=window,
        sliding_layers=window_layers,
    ).validate()


def hf_config_dict(cfg: ModelConfig) -> dict:
    """The HF `config.json` dict of a ModelConfig (to build HF models from our shapes)."""
    d = {
        "architectures": [cfg.arch], "model_type": ARCHITECTURES[cfg.arch].model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None,
    }
    d["rope_parameters"] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta, **{
        k: v for k, v in cfg.rope_params.items() if k != "max_position_embeddings"}}
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
        if cfg.arch == "Qwen2ForCausalLM":
            d["use_sliding_window"] = True
            d["layer_types"] = ["sliding_attention" if cfg.window_of(l) else "full_attention"
                                for l in range(cfg.num_layers)]
    if cfg.rope_freq_factors:  # a GGUF's per-pair factors: no HF RoPE type says exactly that
        raise ConfigError("per-pair RoPE factors (a GGUF's rope_freqs tensor) have no config.json form")
    if cfg.rotary_dim != cfg.head_dim:
        d["partial_rotary_factor"] = d["rope_parameters"]["partial_rotary_factor"] = cfg.rotary_dim / cfg.head_dim
    return d


def _llama(V, H, I, L, Hq, Hkv, D=None, theta=10000.0, tied=False, max_seq=4096, eps=1e-5, R=None):
    D = D or H // Hq
    return ModelConfig("LlamaForCausalLM", V, H, I, L, Hq, Hkv, D, R or D, theta, eps, max_seq, tied,
                       bos_token_id=256, eos_token_ids=(257,)).validate()


# Named synthetic shapes: random weights, real sizes (decode speed depends on bytes, not values).
SYNTHETIC_SHAPES: dict[str, ModelConfig] = {
    "tiny": _llama(V=512, H=128, I=256, L=2, Hq=4, Hkv=2, max_seq=512),
    "tiny-mha": _llama(V=512, H=128, I=256, L=2, Hq=4, Hkv=4, max_seq=512),
    "tiny-partial": _llama(V=512, H=128, I=256, L=2, Hq=4, Hkv=2, R=16, max_seq=512),
    "smollm2-135m": _llama(V=49152, H=576, I=1536, L=30, Hq=9, Hkv=3, theta=100000.0, tied=True,
                           max_seq=8192),
    "llama2-7b": _llama(V=32000, H=4096, I=11008, L=32, Hq=32, Hkv=32),
    "llama2-13b": _llama(V=32000, H=5120, I=13824, L=40, Hq=40, Hkv=40),
    # the int4 target of issue 26 (one 80 GB card); check_fits refuses it in fp16
    "llama2-70b": _llama(V=32000, H=8192, I=28672, L=80, Hq=64, Hkv=8),
    "gqa-32-8": _llama(V=32000, H=4096, I=14336, L=32, Hq=32, Hkv=8, theta=500000.0),  # Llama-3-8B-like
    "mha-1b": _llama(V=32000, H=2048, I=5632, L=22, Hq=32, Hkv=32),
}
# Llama-2 has no bos/eos of our byte tokenizer; the synthetic models all use the byte-level
# fallback tokenizer of the client (ids < 259, 256 = BOS, 257 = EOS), so the ids above are those.


def with_max_seq(cfg: ModelConfig, max_seq: int | None) -> ModelConfig:
    """Cap the context the server plans for (KV arena, RoPE tables)."""
    if max_seq is None or max_seq >= cfg.max_seq_len:
        return cfg
    if max_seq <= 0:
        raise ConfigError(f"--max-seq must be positive, got {max_seq}")
    return replace(cfg, max_seq_len=max_seq)
