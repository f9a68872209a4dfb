"""The `reference` backend: the pure-torch ReferenceDecoder (CPU or GPU) behind the Backend
interface (server/backend.py; docs/architecture.md "Backend"). It has no graphs: graph ops
raise `GraphsUnavailable` and `replay` runs the step eagerly, so the user's flow is the
same everywhere. Device sampling is the torch reference of the CUDA sampler
(server/reference_sampler.py), run where the logits are.
"""
from __future__ import annotations

import torch

from server.backend import TorchLogitsBackend
from server.kv import KVArena
from server.model.resolve import LoadedModel
from server.reference import ReferenceDecoder


class ReferenceBackend(TorchLogitsBackend):
    name = "reference"
    no_bg_capture = "CUDA graphs are unavailable on the reference backend (use --backend cuda on a GPU)"

    def __init__(self, model: LoadedModel, sessions: int = 1):
        super().__init__(model, sessions)
        w = model.weights
        self.kv = KVArena(self.cfg, sessions, w.dtype, w.device)
        self.dec = ReferenceDecoder(w, self.kv)
        self.last: list[torch.Tensor | None] = [None] * sessions  # each session's latest logits (for sample)

    def _keep(self, session: int, logits: torch.Tensor) -> torch.Tensor:
        self.last[session] = logits
        return logits.cpu()

    def prefill(self, session: int, ids: list[int]) -> torch.Tensor:
        ids = self.check_prompt(session, ids)
        return self._keep(session, self.dec.prefill(session, ids))

    def prefill_from(self, session: int, ids: list[int], keep: int) -> torch.Tensor:
        """The new positions in one forward, as a prefill (one token: the very op of a step)."""
        ids = self.check_keep(session, ids, keep)
        logits = self.dec.forward(session, ids[keep:], keep, last_only=True)[-1]
        self.kv.seq_len[session] = len(ids)
        return self._keep(session, logits)

    def step(self, session: int, token: int) -> torch.Tensor:
        self.check_position(session, self.seq_len(session))
        return self._keep(session, self.dec.step(session, self.check_token(token)))

    def replay(self, session: int, seq_len: int, token: int) -> torch.Tensor:
        self.check_position(session, seq_len)
        return self.step(session, token)

    def reset(self, session: int) -> None:
        self.kv.seq_len[self.kv.check_session(session)] = 0
        self.last[session] = None

    def status(self) -> dict:
        w = self.model.weights
        return {"backend": self.name, "device": str(w.device), "model": self.model.name,
                "dtype": str(w.dtype).replace("torch.", ""), "graphs": None,
                "graphs_note": "CUDA graphs are unavailable on the reference backend",
                "quant": w.quant, "group": w.group,
                "memory": {"weights_bytes": w.nbytes(), "quant_bytes": w.quant_bytes(), "kv_bytes": self.kv.nbytes()},
                "positions": list(self.kv.seq_len)}
