"""Which backend the server runs (docs/architecture.md "Backend"): `reference` (pure torch,
server/reference_backend.py), `cuda` (custom kernels + CUDA graphs, server/cuda_backend.py),
`hf` (transformers' AutoModelForCausalLM with its own caches, server/hf_backend.py), or `auto`:
  - an architecture (or config field) that config.py does not parse -> `hf`;
  - else `cuda` when the kernels cover the model (`cuda_refusal`) and a GPU and the built
    extension are present;
  - else `reference` (our oracle, and fast enough on a CPU for the shapes it covers);
  - an hf-only option (--attn other than sdpa, --force-flash) -> `hf`.
`--quant int8|int4` is ours on cuda and reference (gemv_quant.cu, docs/quantization.md); on hf,
int8 goes through bitsandbytes.
It says which and why in one stderr line. The interface they implement is server/backend.py;
docs/decisions.md says which architecture takes which. `load_backend(opts)` is the server's one
way from its options to (model, backend).
"""
from __future__ import annotations

import sys

import torch

from case4_errors import BadInput
from server.backend import Backend
from server.model.config import ModelConfig
from server.model.resolve import LoadedModel
from server.reference_backend import ReferenceBackend

BACKENDS = ("auto", "cuda", "reference", "hf")
GRAPH_MODES = ("exact", "dynamic", "none")


def cuda_available() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    try:
        from custom_kernels.ext import load_extension
        load_extension()
    except Exception as e:  # ExtensionUnavailable carries the build command
        return False, str(e)
    return True, ""


def cuda_refusal(cfg: ModelConfig) -> str | None:
    """Why the cuda kernels cannot run `cfg` (one line naming the field), or None when they can.
    They read RoPE from the arena's tables (so every RoPE type of config.py is theirs), run
    int8/int4 weights (gemv_quant.cu) and add Qwen2's q/k/v biases in the QKV gemv, but they
    attend to the whole prefix (no sliding window)."""
    if cfg.sliding_window is not None and cfg.max_seq_len > cfg.sliding_window:
        return (f"config field 'sliding_window': the cuda kernels have no attention window and the served "
                f"context --max-seq {cfg.max_seq_len} exceeds sliding_window {cfg.sliding_window} "
                f"(--max-seq {cfg.sliding_window} fits inside it)")
    return None


def _auto(choice: str, why: str) -> str:
    print(f"[case4] backend auto -> {choice} ({why})", file=sys.stderr, flush=True)
    return choice


def pick_backend(name: str, cfg: ModelConfig | None = None) -> str:
    """The backend `name` stands for on this machine and for `cfg` (when given)."""
    if name not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    if name != "auto":
        return name
    why = cuda_refusal(cfg) if cfg is not None else None
    if why is not None:  # before probing the GPU: the model decides, whatever the machine
        return _auto("reference", why)
    ok, why = cuda_available()
    if not ok:
        return _auto("reference", why)
    return "cuda"


def make_backend(name: str, model: LoadedModel, sessions: int = 1, device=None, graph_mode: str = "exact",
                 gemm: str = "custom") -> Backend:
    name = pick_backend(name, model.cfg)
    if graph_mode not in GRAPH_MODES:
        raise BadInput(f"--graph-mode must be one of {', '.join(GRAPH_MODES)}, got '{graph_mode}'")
    if name == "hf":
        raise BadInput("--backend hf loads its model through transformers: use load_backend")
    if name == "reference":
        return ReferenceBackend(model, sessions)
    why = cuda_refusal(model.cfg)
    if why is not None:
        raise BadInput(f"--backend cuda cannot run this model: {why}; use --backend reference or auto")
    if not torch.cuda.is_available():
        raise BadInput("--backend cuda needs a CUDA GPU and none is visible (use --backend reference)")
    if model.weights.device.type != "cuda":
        raise BadInput("the cuda backend needs the model on a CUDA device (--device cuda)")
    from server.cuda_backend import CudaBackend  # loads the extension: only when it is asked for
    return CudaBackend(model, sessions=sessions, graph_mode=graph_mode, gemm=gemm)


def _hf_options(opts: dict) -> list[str]:
    """The options only the hf backend implements, as the user gave them."""
    out = []
    if opts.get("attn") not in (None, "sdpa"):
        out.append(f"--attn {opts['attn']}")
    if opts.get("force_flash"):
        out.append("--force-flash")
    return out


def load_backend(opts: dict, device: str, dtype: str):
    """(model, backend) for the server's options: the backend `auto` stands for, its model
    loaded the way that backend reads it (our weight arena, or transformers' module)."""
    from server.model.config import ConfigError
    from server.model.resolve import load_config, resolve_model
    name, sessions, max_seq = opts.get("backend", "auto"), opts.get("sessions", 1), opts.get("max_seq")
    if name not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    hf_only = _hf_options(opts)
    if name == "auto":
        if hf_only:
            name = _auto("hf", f"{' '.join(hf_only)} is an option of the hf backend")
        else:
            try:
                load_config(opts["model"], max_seq)  # config.json only (a GGUF: its header, kept for the load)
            except ConfigError as e:  # neither custom path covers it: transformers runs it
                name = _auto("hf", f"{e}; transformers runs it")
    elif name != "hf" and hf_only:
        raise BadInput(f"{' '.join(hf_only)} applies to --backend hf only (got --backend {name})")
    if name == "hf":
        from server.hf_backend import HFBackend, load_hf_model
        model = load_hf_model(opts["model"], dtype=dtype, device=device, seed=opts.get("seed", 0),
                              max_seq=max_seq, attn=opts.get("attn") or "sdpa", quant=opts.get("quant") or "none",
                              force_flash=bool(opts.get("force_flash")))
        return model, HFBackend(model, sessions=sessions, graph_mode=opts.get("graph_mode", "exact"),
                                force_flash=bool(opts.get("force_flash")))
    model = resolve_model(opts["model"], dtype=dtype, device=device, seed=opts.get("seed", 0),
                          max_seq=max_seq, sessions=sessions, quant=opts.get("quant"),
                          group=opts.get("group_size"))
    backend = make_backend(name, model, sessions=sessions, device=device,
                           graph_mode=opts.get("graph_mode", "exact"), gemm=opts.get("gemm", "custom"))
    return model, backend
