"""The decode backends the server process drives (DESIGN §3.3).

`reference`: the pure-torch ReferenceDecoder (CPU or GPU), no graphs: graph ops raise
`GraphsUnavailable` and `replay` runs the step eagerly, so the user's flow is the same
everywhere. `cuda`: custom kernels + CUDA graphs (server/cuda_backend.py). `auto` picks
`cuda` when a GPU and the built extension are present, else `reference` (and says why).
"""
from __future__ import annotations

import sys

import torch

from case4_errors import BadInput, GraphsUnavailable
from server.kv import KVArena
from server.models import LoadedModel
from server.reference import ReferenceDecoder

BACKENDS = ("auto", "cuda", "reference")
GRAPH_MODES = ("exact", "dynamic", "none")


class Backend:
    """The interface of docs/architecture.md; the reference implementation of its host logic."""
    name = "base"
    supports_graphs = False

    def __init__(self, model: LoadedModel, sessions: int = 1):
        self.model = model
        self.cfg = model.cfg
        self.sessions = sessions

    def check_position(self, session: int, seq_len) -> None:
        cur = self.seq_len(session)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len != cur:
            raise BadInput(f"seq_len {seq_len!r} does not match session {session}'s position {cur}")
        if cur >= self.cfg.max_seq_len:
            raise BadInput(f"session {session} is full: context of {self.cfg.max_seq_len} tokens reached")

    def check_prompt(self, session: int, ids) -> list[int]:
        """The checks of every prefill, in one place: session, non-empty, fits, token ids."""
        self.seq_len(session)  # validates the session
        ids = list(ids)
        if not ids:
            raise BadInput("the prompt is empty")
        if len(ids) >= self.cfg.max_seq_len:
            raise BadInput(f"prompt of {len(ids)} tokens does not fit the context of "
                           f"{self.cfg.max_seq_len} tokens (see --max-seq)")
        for t in ids:
            self.check_token(t)
        return ids

    def check_token(self, token) -> int:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.cfg.vocab_size:
            raise BadInput(f"token {token!r} out of range [0, {self.cfg.vocab_size})")
        return token

    def generate(self, session: int, start_token: int, steps: int, params, stop_ids=()) -> list[int]:
        """`steps` decode steps with sampling done server-side; stops after a stop id."""
        from case4_sampling import sample
        out, tok = [], self.check_token(start_token)
        for _ in range(steps):
            pos = self.seq_len(session)
            tok = int(sample(self.step(session, tok).numpy(), params, pos))
            out.append(tok)
            if tok in stop_ids:
                break
        return out

    def trace_events(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


class ReferenceBackend(Backend):
    name = "reference"

    def __init__(self, model: LoadedModel, sessions: int = 1):
        super().__init__(model, sessions)
        w = model.weights
        self.kv = KVArena(self.cfg, sessions, w.dtype, w.device)
        self.dec = ReferenceDecoder(w, self.kv)

    def prefill(self, session: int, ids: list[int]) -> torch.Tensor:
        return self.dec.prefill(session, self.check_prompt(session, ids)).cpu()

    def step(self, session: int, token: int) -> torch.Tensor:
        self.kv.check_session(session)
        self.check_position(session, self.seq_len(session))
        return self.dec.step(session, self.check_token(token)).cpu()

    def seq_len(self, session: int) -> int:
        return self.kv.seq_len[self.kv.check_session(session)]

    def reset(self, session: int) -> None:
        self.kv.seq_len[self.kv.check_session(session)] = 0

    def _no_graphs(self, *_a, **_k):
        raise GraphsUnavailable("CUDA graphs are unavailable on the reference backend (use --backend cuda on a GPU)")

    bg_capture_start = wait_precapture = bg_capture_stop = _no_graphs

    def replay(self, session: int, seq_len: int, token: int) -> torch.Tensor:
        self.kv.check_session(session)
        self.check_position(session, seq_len)
        return self.step(session, token)

    def status(self) -> dict:
        w = self.model.weights
        return {"backend": self.name, "device": str(w.device), "model": self.model.name,
                "dtype": str(w.dtype).replace("torch.", ""), "graphs": None,
                "graphs_note": "CUDA graphs are unavailable on the reference backend",
                "memory": {"weights_bytes": w.arena.numel() * w.arena.element_size(), "kv_bytes": self.kv.nbytes()},
                "positions": list(self.kv.seq_len)}


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
    from server.cuda_backend import CudaBackend
    return CudaBackend(model, sessions=sessions, graph_mode=graph_mode, gemm=gemm)


def default_device() -> str:
    """Where the weights go: the GPU when there is one (the reference runs there too)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
