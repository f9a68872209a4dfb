"""The static KV cache: one arena for every session, allocated once.

Layout `[S, L, 2, Hkv, max_seq, D]` (index 0 of the third axis = K, 1 = V): the D values
of one head at one position are contiguous (128 bytes for D=64 fp16), so the attention
kernel reads whole 16-byte vectors, coalesced along D, and the positions of one head
follow each other.
"""
from __future__ import annotations

import torch

from case4_errors import BadInput
from server.model.config import ModelConfig


class KVArena:
    def __init__(self, cfg: ModelConfig, sessions: int, dtype: torch.dtype, device="cpu"):
        if sessions < 1:
            raise BadInput(f"sessions must be >= 1, got {sessions}")
        self.cfg = cfg
        self.sessions = sessions
        self.max_seq = cfg.max_seq_len
        # kv[s, l, 0|1, h, t, :] = K|V of head h at position t of layer l, session s
        self.kv = torch.zeros(sessions, cfg.num_layers, 2, cfg.num_kv_heads, cfg.max_seq_len, cfg.head_dim,
                              dtype=dtype, device=device)
        self.seq_len = [0] * sessions  # positions filled, per session

    def check_session(self, s) -> int:
        if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s < self.sessions:
            raise BadInput(f"session must be an integer in [0, {self.sessions}), got {s!r}")
        return s

    def k(self, s: int, l: int) -> torch.Tensor:  # [Hkv, max_seq, D]
        return self.kv[s, l, 0]

    def v(self, s: int, l: int) -> torch.Tensor:  # [Hkv, max_seq, D]
        return self.kv[s, l, 1]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
