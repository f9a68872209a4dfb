"""The `Backend` interface the server process drives (docs/architecture.md "Backend"),
declared in code, and the argument checks every backend shares.

Implementations: `ReferenceBackend` (server/reference_backend.py, pure torch, any device),
`HFBackend` (server/hf_backend.py, transformers' model) and `CudaBackend`
(server/cuda_backend.py, custom kernels + CUDA graphs); the first two share
`TorchLogitsBackend` below. The factory that
picks one is server/backends.py. This module imports neither, so a backend can import it
without an import circle.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from case4_errors import BadInput, GraphsUnavailable
from case4_sampling import SamplingParams
from server.kv import KVArena
from server.model.resolve import LoadedModel
from server.reference_sampler import device_sample


class Backend(ABC):
    name: str = "base"            # "reference" | "cuda"
    supports_graphs: bool = False
    kv: KVArena                   # each backend allocates its KV arena (all sessions) in __init__

    def __init__(self, model: LoadedModel, sessions: int = 1):
        self.model = model
        self.cfg = model.cfg
        self.sessions = sessions

    # -- decode ---------------------------------------------------------------------------
    @abstractmethod
    def prefill(self, session: int, ids: list[int]) -> torch.Tensor:
        """Reset `session` and run the prompt; fp32 logits [V] (CPU tensor) of its last position."""

    def prefill_from(self, session: int, ids: list[int], keep: int) -> torch.Tensor:
        """The prompt `ids` of which the session's KV already holds ids[:keep] (serve's prompt
        cache: the caller keeps what each session holds): the positions from `keep` on are
        run, the rest kept; fp32 logits [V] of the last position. This default steps the new
        tokens one at a time (exactly a decode step's kernels); backends batch them."""
        ids = self.check_keep(session, ids, keep)
        self.rewind(session, keep)
        for t in ids[keep:]:
            logits = self.step(session, t)
        return logits

    def plan_keep(self, session: int, ids: list[int], keep: int) -> int:
        """How many of the `keep` cached positions serve's prompt cache should reuse: `keep` (pre-fill
        only the rest, prefill_from), or 0 where a cold prefill of the whole prompt is the faster way
        (CudaBackend: a prompt that a prefill graph covers). Never wrong either way: both give the same
        KV and logits up to the prefill's summation order."""
        return keep

    def rewind(self, session: int, n: int) -> None:
        """Forget the positions from n on (their rows are overwritten by what comes next)."""
        self.kv.seq_len[session] = n

    @abstractmethod
    def step(self, session: int, token: int) -> torch.Tensor:
        """One eager step at position seq_len(session); fp32 logits [V] (CPU tensor)."""

    @abstractmethod
    def replay(self, session: int, seq_len: int, token: int) -> torch.Tensor:
        """The step at T = seq_len through the graph mode (eager on a backend without graphs)."""

    @abstractmethod
    def sample(self, session: int, params: SamplingParams, position: int) -> int:
        """Draw the next token from the session's latest logits (those its last prefill / step /
        replay returned) with the backend's own (device) sampler; `position` keys the draw
        (docs/architecture.md "Sampling")."""

    @abstractmethod
    def generate(self, session: int, start_token: int, steps: int, params: SamplingParams,
                 stop_ids=()) -> list[int]:
        """`steps` decode steps from `start_token`, each token drawn by the device sampler;
        stops after a stop id (which is returned, not fed)."""

    def seq_len(self, session: int) -> int:
        """Positions filled in `session` (validates the session)."""
        return self.kv.seq_len[self.kv.check_session(session)]

    @abstractmethod
    def reset(self, session: int) -> None:
        """Forget the session's history: seq_len = 0."""

    # -- graphs (a backend without them raises GraphsUnavailable) ------------------------------
    @abstractmethod
    def bg_capture_start(self, session: int, window: int) -> dict:
        """Start capturing graphs for the next `window` positions in the background."""

    @abstractmethod
    def wait_precapture(self, session: int, count: int, timeout_s: float = 60.0) -> dict:
        """Block until `count` graphs ahead of the session's position are captured."""

    @abstractmethod
    def bg_capture_stop(self, session: int = -1) -> dict:
        """Stop the background capture of one session (-1: all)."""

    # -- facts ---------------------------------------------------------------------------------
    @abstractmethod
    def status(self) -> dict:
        """Backend, device, model, dtype, graph and memory facts (the `status` op's reply)."""

    def trace_events(self) -> list[dict]:
        """Chrome "X" events of the backend's own threads; ts/dur in us of CLOCK_MONOTONIC."""
        return []

    def close(self) -> None:
        """Release what the backend holds beyond its tensors (streams, threads, graphs)."""

    # -- the argument checks of every backend -------------------------------------------------
    def check_position(self, session: int, seq_len) -> None:
        cur = self.seq_len(session)
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len != cur:
            raise BadInput(f"seq_len {seq_len!r} does not match session {session}'s position {cur}")
        if cur >= self.cfg.max_seq_len:
            raise BadInput(f"session {session} is full: context of {self.cfg.max_seq_len} tokens reached")

    def check_prompt(self, session: int, ids) -> list[int]:
        """The checks of every prefill, in one place: session, non-empty, fits, token ids."""
        self.kv.check_session(session)
        ids = list(ids)
        if not ids:
            raise BadInput("the prompt is empty")
        if len(ids) >= self.cfg.max_seq_len:
            raise BadInput(f"prompt of {len(ids)} tokens does not fit the context of "
                           f"{self.cfg.max_seq_len} tokens (see --max-seq)")
        for t in ids:
            self.check_token(t)
        return ids

    def check_keep(self, session: int, ids, keep) -> list[int]:
        ids = self.check_prompt(session, ids)
        have = self.seq_len(session)
        if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep < len(ids) or keep > have:
            raise BadInput(f"keep must be in [0, min({len(ids)} prompt tokens, {have} positions held)], got {keep!r}")
        return ids

    def check_token(self, token) -> int:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < self.cfg.vocab_size:
            raise BadInput(f"token {token!r} out of range [0, {self.cfg.vocab_size})")
        return token


class TorchLogitsBackend(Backend):
    """A backend that keeps each session's last logits as a torch tensor in `self.last` and has no
    background graph capture (reference, hf): device sampling is server/reference_sampler.py on those
    logits, and `generate` is step + sample per token."""
    no_bg_capture = "background graph capture is unavailable"  # each subclass says why, in one line

    def sample(self, session: int, params: SamplingParams, position: int) -> int:
        logits = self.last[self.kv.check_session(session)]
        if logits is None:
            raise BadInput(f"sample: session {session} has no logits yet (prefill it first)")
        return device_sample(logits, params, position)

    def generate(self, session: int, start_token: int, steps: int, params: SamplingParams,
                 stop_ids=()) -> list[int]:
        out, tok = [], self.check_token(start_token)
        for _ in range(steps):
            pos = self.seq_len(session)  # the position of the fed token keys the draw
            self.step(session, tok)
            tok = self.sample(session, params, pos)
            out.append(tok)
            if tok in stop_ids:
                break
        return out

    def _no_bg(self, *_a, **_k):
        raise GraphsUnavailable(self.no_bg_capture)

    def bg_capture_start(self, session: int, window: int) -> dict:
        self._no_bg()

    def wait_precapture(self, session: int, count: int, timeout_s: float = 60.0) -> dict:
        self._no_bg()

    def bg_capture_stop(self, session: int = -1) -> dict:
        self._no_bg()
