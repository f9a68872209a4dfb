"""Which backend the server runs (docs/architecture.md "Backend"): `reference` (pure torch,
server/reference_backend.py), `cuda` (custom kernels + CUDA graphs, server/cuda_backend.py),
or `auto`: `cuda` when a GPU and the built extension are present, else `reference` (and
it says why). The interface both implement is server/backend.py.
"""
from __future__ import annotations

import sys

import torch

from case4_errors import BadInput
from server.backend import Backend
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


def pick_backend(name: str) -> str:
    if name not in BACKENDS:
        raise BadInput(f"--backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    if name != "auto":
        return name
    ok, why = cuda_available()
    if not ok:
        print(f"[case4] backend auto -> reference ({why})", file=sys.stderr, flush=True)
        return "reference"
    return "cuda"


def make_backend(name: str, model: LoadedModel, sessions: int = 1, device=None, graph_mode: str = "exact",
                 gemm: str = "custom") -> Backend:
    name = pick_backend(name)
    if graph_mode not in GRAPH_MODES:
        raise BadInput(f"--graph-mode must be one of {', '.join(GRAPH_MODES)}, got '{graph_mode}'")
    if name == "reference":
        return ReferenceBackend(model, sessions)
    if not torch.cuda.is_available():
        raise BadInput("--backend cuda needs a CUDA GPU and none is visible (use --backend reference)")
    if model.weights.device.type != "cuda":
        raise BadInput("the cuda backend needs the model on a CUDA device (--device cuda)")
    from server.cuda_backend import CudaBackend  # loads the extension: only when it is asked for
    return CudaBackend(model, sessions=sessions, graph_mode=graph_mode, gemm=gemm)
