"""Which backend the server runs (docs/architecture.md "Backend"): `reference` (pure torch,
server/reference_backend.py), `cuda` (custom kernels + CUDA graphs, server/cuda_backend.py),
or `auto`: `cuda` when a GPU and the built extension are present and the kernels cover the
model (`cuda_refusal`), else `reference` (and it says why, in one stderr line). The interface
both implement is server/backend.py; docs/decisions.md says which architecture takes which.
"""
from __future__ import annotations

import sys

import torch

from case4_errors import BadInput
from server.backend import Backend
from server.model.config import ModelConfig
from server.model.resolve import LoadedModel
from server.reference_backend import ReferenceBackend

BACKENDS = ("auto", "cuda", "reference")
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


def cuda_refusal(cfg: ModelConfig, quant: str = "none") -> str | None:
    """Why the cuda kernels cannot run `cfg` (one line naming the field), or None when they can.
    They read RoPE from the arena's tables (so every RoPE type of config.py is theirs), but they
    add no bias and attend to the whole prefix. Quantized weights (`quant`, ModelWeights.quant):
    not yet (the int8/int4 kernels of issue 26 land separately)."""
    if quant != "none":
        return f"--quant {quant}: the cuda kernels have no quantized GEMV yet"
    if cfg.qkv_bias:
        return (f"{cfg.arch} adds q/k/v_proj biases (self_attn.q_proj.bias, ...), which the cuda kernels "
                "do not")
    if cfg.sliding_window is not None and cfg.max_seq_len > cfg.sliding_window:
        return (f"config field 'sliding_window': the cuda kernels have no attention window and the served "
                f"context --max-seq {cfg.max_seq_len} exceeds sliding_window {cfg.sliding_window} "
                f"(--max-seq {cfg.sliding_window} fits inside it)")
    return None


def pick_backend(name: str, cfg: ModelConfig | None = None, quant: str = "none") -> str:
    """The backend `name` stands for on this machine and for `cfg` (when given)."""
    if name not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    if name != "auto":
        return name
    why = cuda_refusal(cfg, quant) if cfg is not None else None
    if why is not None:  # before probing the GPU: the model decides, whatever the machine
        print(f"[case4] backend auto -> reference ({why})", file=sys.stderr, flush=True)
        return "reference"
    ok, why = cuda_available()
    if not ok:
        print(f"[case4] backend auto -> reference ({why})", file=sys.stderr, flush=True)
        return "reference"
    return "cuda"


def make_backend(name: str, model: LoadedModel, sessions: int = 1, device=None, graph_mode: str = "exact",
                 gemm: str = "custom") -> Backend:
    quant = getattr(model.weights, "quant", "none")
    name = pick_backend(name, model.cfg, quant)
    if graph_mode not in GRAPH_MODES:
        raise BadInput(f"--graph-mode must be one of {', '.join(GRAPH_MODES)}, got '{graph_mode}'")
    if name == "reference":
        return ReferenceBackend(model, sessions)
    why = cuda_refusal(model.cfg, quant)
    if why is not None:
        raise BadInput(f"--backend cuda cannot run this model: {why}; use --backend reference or auto")
    if not torch.cuda.is_available():
        raise BadInput("--backend cuda needs a CUDA GPU and none is visible (use --backend reference)")
    if model.weights.device.type != "cuda":
        raise BadInput("the cuda backend needs the model on a CUDA device (--device cuda)")
    from server.cuda_backend import CudaBackend  # loads the extension: only when it is asked for
    return CudaBackend(model, sessions=sessions, graph_mode=graph_mode, gemm=gemm)
