"""The `hf` backend (issue 28, the seed's KV-only path): the server hosts transformers'
`AutoModelForCausalLM` itself, with its own KV cache per session, behind the Backend interface
(server/backend.py; docs/architecture.md "Backend"). It runs any decoder-only causal LM that
transformers can load, so `--backend auto` uses it for architectures neither custom path covers.

Caches and graphs: `--graph-mode none`, or a CPU device, or `--force-flash`: a `DynamicCache` per
session and eager steps. `exact` / `dynamic` on a GPU: a `StaticCache` per session and one CUDA
graph per session of the one-token step, whose token and position are read from device buffers
(so both graph modes are the same graph here); captured after two eager warm-up steps. A capture
that fails leaves that backend eager on the static cache, says so on stderr and in `status`.

Device sampling is server/reference_sampler.py's torch sampler run where the logits are, so
`--sampling device` draws the same tokens as the reference and cuda backends.

`--attn`: sdpa (default), eager, flash2 (transformers' flash_attention_2, needs `flash_attn`),
xformers (an attention function registered with transformers' AttentionInterface that calls
`xformers.ops.memory_efficient_attention`, needs `xformers`). A missing package is a BadInput,
never a silent fallback. `--quant int8`: bitsandbytes' LLM.int8() through transformers
(needs `bitsandbytes` and a GPU). `--force-flash`: single-query decode attention calls Case4's
decode attention kernel (`torch.ops.case4.sdp_single_q`, custom_kernels/torch_ops.py); prefill
and any masked call keep SDPA.
"""
from __future__ import annotations

import importlib.util
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from case4_errors import BadInput
from server.backend import TorchLogitsBackend
from server.model.config import ConfigError, ModelConfig, config_from_hf, hf_config_dict, with_max_seq
from server.model.resolve import (DEFAULT_MAX_SEQ, ModelError, _eos_ids, _read_config, _tokenizer_dir,
                                  resolve_folder, resolve_model)
from server.model.weights import hf_state_dict, parse_dtype

ATTNS = ("sdpa", "flash2", "xformers", "eager")
QUANTS = ("none", "int8")
# --attn -> transformers' attn_implementation (xformers and force-flash register their own below)
_ATTN_IMPL = {"sdpa": "sdpa", "eager": "eager", "flash2": "flash_attention_2", "xformers": "case4_xformers"}
# the name --force-flash registers: transformers treats any implementation whose name contains "flash"
# as a flash-attention kernel to fetch from the hub (is_flash_attention_requested), so ours must not
FORCE_FLASH_IMPL = "case4_single_q"
_ATTN_PACKAGE = {"flash2": ("flash_attn", "flash-attn"), "xformers": ("xformers", "xformers")}


def _log(msg: str) -> None:
    print(f"[case4] {msg}", file=sys.stderr, flush=True)


def check_attn(attn: str, quant: str = "none") -> None:
    """The checks that need no model (BadInput): known names, packages importable."""
    if attn not in ATTNS:
        raise BadInput(f"--attn must be one of {', '.join(ATTNS)}, got '{attn}'")
    if attn in _ATTN_PACKAGE:
        mod, pkg = _ATTN_PACKAGE[attn]
        if importlib.util.find_spec(mod) is None:
            raise BadInput(f"--attn {attn} needs the '{pkg}' package, which is not installed "
                           f"(pip install {pkg}, or use --attn sdpa)")
    if quant not in QUANTS:
        raise BadInput(f"--quant must be one of {', '.join(QUANTS)}, got '{quant}'")
    if quant == "int8" and importlib.util.find_spec("bitsandbytes") is None:
        raise BadInput("--quant int8 needs the 'bitsandbytes' package, which is not installed "
                       "(pip install bitsandbytes)")


# ----------------------------------------------------------------------------------------------
# attention functions registered with transformers (xformers, force-flash)

def _xformers_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention-function signature over xformers' memory-efficient kernel.
    q/k/v arrive [B, heads, T, D]; xformers takes [B, T, heads, D] and expands GQA itself when the
    K/V heads are given as a 5-D [B, T, Hkv, group, D] view."""
    import xformers.ops as xops
    B, Hq, T, D = query.shape
    Hkv = key.shape[1]
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    if Hq != Hkv:
        g = Hq // Hkv
        q = q.reshape(B, T, Hkv, g, D)
        k = k[:, :, :, None, :].expand(B, k.shape[1], Hkv, g, D)
        v = v[:, :, :, None, :].expand(B, v.shape[1], Hkv, g, D)
    bias = None
    if attention_mask is not None:  # sdpa_mask's boolean mask [B, 1, T, S] -> an additive bias
        m = attention_mask[:, :, :, : key.shape[2]]
        bias = torch.zeros(m.shape, dtype=query.dtype, device=query.device).masked_fill(~m, float("-inf"))
        bias = bias.expand(B, Hq, T, key.shape[2])
        if Hq != Hkv:
            bias = bias.reshape(B, Hkv, Hq // Hkv, T, key.shape[2])
    elif T > 1:
        bias = xops.LowerTriangularFromBottomRightMask()
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scaling,
                                          p=dropout if module.training else 0.0)
    return out.reshape(B, T, Hq, D), None


class _FlashCounter:
    calls = 0     # single-query calls that went to sdp_single_q (the GPU test reads them)
    deferred = 0  # calls that kept SDPA (prefill, a mask, an unsupported shape)


def _force_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Single-query decode attention through Case4's kernel; everything else through SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    B, Hq, T, D = query.shape
    if (T == 1 and B == 1 and attention_mask is None and not kwargs.get("softcap")
            and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)):
        q = query.reshape(Hq, D)
        out = torch.ops.case4.sdp_single_q(q, key[0], value[0], float(scaling if scaling is not None else D ** -0.5))
        _FlashCounter.calls += 1
        return out.reshape(1, 1, Hq, D), None
    _FlashCounter.deferred += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _register(name: str, fn) -> None:
    """An attention function and its mask (sdpa's boolean mask) under `name`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


# ----------------------------------------------------------------------------------------------
# the model

@dataclass
class HFModel:
    """What the server reports of a model (LoadedModel's fields) plus the transformers module."""
    name: str
    cfg: ModelConfig              # facts (vocab, context, eos); shapes as far as the config names them
    hf: torch.nn.Module           # AutoModelForCausalLM, eval mode, on the device
    tokenizer_dir: Path | None
    eos_ids: tuple[int, ...]
    folder: Path | None
    device: torch.device
    dtype: torch.dtype
    attn: str
    quant: str


def _generic_config(hf_cfg, arch: str, max_seq: int) -> ModelConfig:
    """A ModelConfig of facts for an architecture config.py does not parse (the hf backend only
    needs vocab, context and eos; the shapes go to `status`)."""
    t = hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg
    g = lambda *names, default=0: next((getattr(t, n) for n in names if getattr(t, n, None) is not None), default)
    H, Hq = int(g("hidden_size", "n_embd", "d_model")), int(g("num_attention_heads", "n_head"))
    D = int(g("head_dim", default=H // Hq if Hq else 0))
    eos = t.eos_token_id if isinstance(t.eos_token_id, list) else [t.eos_token_id] if t.eos_token_id is not None else []
    cfg = ModelConfig(arch=arch, vocab_size=int(t.vocab_size), hidden_size=H,
                      intermediate_size=int(g("intermediate_size", "n_inner", "ffn_dim")),
                      num_layers=int(g("num_hidden_layers", "n_layer")), num_heads=Hq,
                      num_kv_heads=int(g("num_key_value_heads", default=Hq)), head_dim=D, rotary_dim=D,
                      rope_theta=float(g("rope_theta", default=0.0)),
                      rms_norm_eps=float(g("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=0.0)),
                      max_seq_len=int(g("max_position_embeddings", "n_positions", default=max_seq)),
                      tie_word_embeddings=bool(getattr(t, "tie_word_embeddings", False)),
                      bos_token_id=t.bos_token_id, eos_token_ids=tuple(int(i) for i in eos))
    return with_max_seq(cfg, max_seq)


def hf_model_of(m, impl: str = "sdpa", attn: str = "sdpa", quant: str = "none") -> HFModel:
    """transformers' Llama over a LoadedModel's weight arena (its parameters become views of the
    arena: no copy), so the hf backend runs the very weights the other backends run (synthetic
    shapes, the benchmark's case4-hf rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    w = m.weights
    hcfg = LlamaConfig(**{k: v for k, v in hf_config_dict(m.cfg).items() if k != "architectures"})
    hcfg._attn_implementation = impl
    with torch.device(w.device):  # built where it runs; its random init is replaced below
        hf = LlamaForCausalLM._from_config(hcfg, dtype=w.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict(w), strict=False, assign=True)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"the arena's weights do not fit transformers' Llama: {missing} {unexpected}")
    if m.cfg.tie_word_embeddings:
        hf.tie_weights()
    return HFModel(m.name, m.cfg, hf.eval(), m.tokenizer_dir, tuple(m.eos_ids), m.folder, w.device, w.dtype,
                   attn, quant)


def _first_line(e: BaseException) -> str:
    s = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return s[:300]


def load_hf_model(spec: str, dtype: str = "float32", device: str = "cpu", seed: int = 0,
                  max_seq: int | None = None, attn: str = "sdpa", quant: str = "none",
                  force_flash: bool = False) -> HFModel:
    """`--model` loaded by transformers onto `device` (BadInput for what cannot be loaded).
    synthetic:<shape> builds the Llama of that shape on the same seeded weights the other
    backends use, so the three backends can be compared on it."""
    check_attn(attn, quant)
    dt = parse_dtype(dtype)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for, but no CUDA GPU is visible (use --device cpu)")
    if quant == "int8" and not str(device).startswith("cuda"):
        raise BadInput("--quant int8 (bitsandbytes) needs a CUDA device (--device cuda)")
    cap = DEFAULT_MAX_SEQ if max_seq is None else max_seq
    impl = _ATTN_IMPL[attn]
    if attn == "xformers":
        _register("case4_xformers", _xformers_attention)
    if force_flash:
        from custom_kernels.torch_ops import register_sdp_single_q
        register_sdp_single_q()  # BadInput without a GPU or the extension
        if attn != "sdpa":
            raise BadInput(f"--force-flash replaces sdpa's single-query decode: it needs --attn sdpa, got {attn}")
        _register(FORCE_FLASH_IMPL, _force_flash_attention)
        impl = FORCE_FLASH_IMPL
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # transformers >= 5.2x renames forward's past_key_values to cache; the GPU image's 5.17 knows only
    # the old name, so we pass that and keep the deprecation notice off the server's stderr
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    folder = resolve_folder(spec)
    if folder is None:  # synthetic: our seeded arena, as transformers' Llama
        if quant != "none":
            raise BadInput(f"--quant {quant} quantizes an HF folder as transformers loads it; a synthetic model has none")
        m = resolve_model(spec, dtype=dtype, device=device, seed=seed, max_seq=max_seq)
        return hf_model_of(m, impl, attn, quant)
    hf_dict = _read_config(folder)
    tok_dir = _tokenizer_dir(folder)
    try:
        hcfg = AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # unknown model_type, a config transformers rejects
        raise ModelError(f"{folder}: transformers cannot load this configuration: {_first_line(e)}") from None
    if getattr(hcfg, "is_encoder_decoder", False):
        raise ModelError(f"{folder}: an encoder-decoder model ({hcfg.model_type}); Case4 serves decoder-only causal LMs")
    arch = (hf_dict.get("architectures") or [type(hcfg).__name__])[0]
    try:
        cfg = with_max_seq(config_from_hf(hf_dict), cap)
    except ConfigError:  # an architecture or field our own path does not parse: the facts only
        cfg = _generic_config(hcfg, arch, cap)
    kw = {"dtype": dt, "attn_implementation": impl}
    if quant == "int8":
        from transformers import BitsAndBytesConfig
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kw["device_map"] = {"": torch.device(device).index or 0}
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(folder), **kw)
    except ImportError as e:
        raise BadInput(f"{folder}: transformers needs a package to load it: {_first_line(e)}") from None
    except Exception as e:  # not a causal LM, missing weights, an attention the architecture lacks
        raise ModelError(f"{folder}: transformers cannot load it as a causal LM ({arch}): {_first_line(e)}") from None
    if quant != "int8":
        hf = hf.to(device)
    hf.eval()
    return HFModel(spec, cfg, hf, tok_dir, _eos_ids(folder, cfg), folder, torch.device(device), dt, attn, quant)


# ----------------------------------------------------------------------------------------------
# the backend

class _Sessions:
    """Positions per session (the `kv.seq_len` / `kv.check_session` the Backend base reads);
    the caches themselves are transformers' objects, one per session."""

    def __init__(self, n: int):
        self.sessions = n
        self.seq_len = [0] * n

    def check_session(self, s) -> int:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < self.sessions:
            raise BadInput(f"session must be an integer in [0, {self.sessions}), got {s!r}")
        return s


class _Graph:
    """One session's CUDA graph of the one-token step on its StaticCache."""

    def __init__(self):
        self.graph = None
        self.warm = 0
        self.tok = None   # [1, 1] int64 input
        self.pos = None   # [1] int64 cache position
        self.out = None   # [1, 1, V] logits the graph writes


class HFBackend(TorchLogitsBackend):
    name = "hf"
    no_bg_capture = ("the hf backend has no background graph capture (its one graph per session is captured "
                     "on the fly: --precapture 0 --no-bg-capture)")
    WARMUP_STEPS = 2  # eager steps on the static cache before a session's capture

    def __init__(self, model: HFModel, sessions: int = 1, graph_mode: str = "exact", force_flash: bool = False):
        super().__init__(model, sessions)
        self.hf = model.hf
        self.device = model.device
        self.kv = _Sessions(sessions)
        self.force_flash = force_flash
        self.graph_error: str | None = None
        on_gpu = self.device.type == "cuda"
        # static cache + graphs where they can run: a GPU, a graph mode, not force-flash (its op
        # takes the dynamic cache's unpadded K/V; a static cache's calls carry a mask and keep SDPA)
        self.static = on_gpu and graph_mode != "none" and not force_flash
        if self.static:
            self.mode = "static-cache+cuda-graph"
            self.mode_note = (f"graph mode {graph_mode}: StaticCache and one CUDA graph per session of the "
                              f"one-token step (token and position from device buffers)")
        else:
            why = ("--graph-mode none" if graph_mode == "none" else
                   "--force-flash runs on the dynamic cache" if force_flash else "CUDA graphs need a GPU")
            self.mode = "dynamic-cache+eager"
            self.mode_note = f"DynamicCache and eager steps ({why})"
        self.caches = [None] * sessions
        self.graphs = [_Graph() for _ in range(sessions)]
        self.pool = torch.cuda.graph_pool_handle() if self.static else None
        self.last: list[torch.Tensor | None] = [None] * sessions

    # -- caches
    def _new_cache(self):
        from transformers import DynamicCache, StaticCache
        if self.static:
            return StaticCache(config=self.hf.config, max_cache_len=self.cfg.max_seq_len)
        return DynamicCache(config=self.hf.config)

    def _cache(self, session: int):
        c = self.caches[session]
        if c is None:
            c = self.caches[session] = self._new_cache()
        return c

    @torch.no_grad()
    def _forward(self, session: int, ids: torch.Tensor, start: int) -> torch.Tensor:
        """ids [1, n] at positions start..start+n-1 -> the last position's logits [V] (device)."""
        n = ids.shape[1]
        pos = torch.arange(start, start + n, device=self.device)
        out = self.hf(input_ids=ids, position_ids=pos[None], cache_position=pos,
                      past_key_values=self._cache(session), use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]

    def _keep(self, session: int, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        self.last[session] = logits
        return logits.cpu()

    # -- decode
    def prefill(self, session: int, ids: list[int]) -> torch.Tensor:
        ids = self.check_prompt(session, ids)
        self.reset(session)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self._forward(session, x, 0)
        self.kv.seq_len[session] = len(ids)
        return self._keep(session, logits)

    def step(self, session: int, token: int) -> torch.Tensor:
        T = self.seq_len(session)
        self.check_position(session, T)
        tok = self.check_token(token)
        if self.static:
            logits = self._graph_step(session, T, tok)
        else:
            logits = self._forward(session, torch.tensor([[tok]], device=self.device), T)
        self.kv.seq_len[session] = T + 1
        return self._keep(session, logits)

    def replay(self, session: int, seq_len: int, token: int) -> torch.Tensor:
        self.check_position(session, seq_len)
        return self.step(session, token)

    @torch.no_grad()
    def _graph_step(self, session: int, T: int, tok: int) -> torch.Tensor:
        g = self.graphs[session]
        if g.graph is None and g.warm < self.WARMUP_STEPS or self.graph_error is not None:
            g.warm += 1
            return self._forward(session, torch.tensor([[tok]], device=self.device), T)
        if g.graph is None:
            try:
                self._capture(session, g)
            except Exception as e:  # noqa: BLE001 -- correctness is kept: eager on the same static cache
                self.graph_error = f"{type(e).__name__}: {_first_line(e)}"
                _log(f"hf backend: CUDA graph capture failed, decoding eagerly on the static cache ({self.graph_error})")
                g.graph = None
                torch.cuda.synchronize()
                return self._forward(session, torch.tensor([[tok]], device=self.device), T)
        g.tok.fill_(tok)
        g.pos.fill_(T)
        g.graph.replay()
        return g.out[0, -1]

    def _capture(self, session: int, g: _Graph) -> None:
        cache = self._cache(session)
        g.tok = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        g.pos = torch.zeros((1,), dtype=torch.long, device=self.device)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            g.out = self.hf(input_ids=g.tok, position_ids=g.pos[None], cache_position=g.pos,
                            past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        g.graph = graph

    def reset(self, session: int) -> None:
        s = self.kv.check_session(session)
        self.kv.seq_len[s] = 0
        self.last[s] = None
        c = self.caches[s]
        if c is None:
            return
        if self.static:
            c.reset()  # zeroes in place: a captured graph keeps its tensors
        else:
            self.caches[s] = None

    def status(self) -> dict:
        p = next(self.hf.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in self.hf.parameters())
        st = {"backend": self.name, "device": str(self.device), "model": self.model.name,
              "arch": self.cfg.arch, "dtype": str(p.dtype).replace("torch.", ""), "attn": self.model.attn,
              "quant": self.model.quant, "force_flash": self.force_flash, "hf_mode": self.mode,
              "graphs": "hf-static" if self.static and self.graph_error is None else None,
              "graphs_note": self.mode_note, "memory": {"weights_bytes": nbytes},
              "positions": list(self.kv.seq_len)}
        if self.graph_error:
            st["graph_error"] = self.graph_error
            st["graphs_note"] += f"; capture failed, eager on the static cache ({self.graph_error})"
        if self.force_flash:
            st["force_flash_calls"] = {"sdp_single_q": _FlashCounter.calls, "sdpa": _FlashCounter.deferred}
        return st

    def close(self) -> None:
        self.graphs = [_Graph() for _ in range(self.sessions)]
        self.caches = [None] * self.sessions
