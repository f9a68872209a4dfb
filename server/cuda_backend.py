"""The `cuda` backend: custom CUDA kernels + CUDA graphs (docs/kernels.md, docs/architecture.md).

Memory is owned by torch tensors allocated here once (KV arena, scratch, per-session
device state, pinned host buffers); the extension gets their raw pointers. The C++
`Engine` (custom_kernels/csrc/graphs.cpp) owns the non-blocking replay and capture
streams, the graph cache and the background capture thread; every call into it releases
the GIL. Prefill runs the torch path (cuBLAS GEMMs + SDPA) of the ReferenceDecoder in the
model dtype on the same KV arena, replayed as a CUDA graph per prompt-length bucket
(server/prefill_graphs.py). Quantized weights (server/model/quant.py QuantLinear): the decode step runs them in
the quantized gemv kernels (custom_kernels/csrc/gemv_quant.cu), chosen once when the Engine is built; prefill
sees each quantized matrix dequantized, when the forward reaches it, into one preplanned scratch of the largest
matrix's size, except for a single row (the last position's lm_head), which the quantized gemv takes
(`DequantWeights`). The Engine's options (ext.EngineOptions: PDL level and the A/B switches that the
GPU tests and the timing tool use) are its own, set at construction (custom_kernels/csrc/step.h).
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

from case4_errors import BadInput
from server.model.config import with_max_seq
from custom_kernels.ext import load_extension
from server.backend import Backend
from server.kv import KVArena
from server.model.quant import QuantLinear
from server.model.resolve import LoadedModel
from server.prefill_graphs import PrefillGraphs
from server.reference import ReferenceDecoder

GRAPH_MODES = ("exact", "dynamic", "none")
GEMMS = ("custom", "cublas")


class PrecaptureTimeout(RuntimeError):
    """wait_precapture ran out of time (the extension's PrecaptureTimeout, re-raised as this backend's)."""


# The quantized gemv's A/B knobs, read once by the extension (custom_kernels/csrc/gemv_quant.cu qgemv_init, which
# refuses a bad value with a ValueError). Checked here first, so that a bad value is the user's one-line error
# (BadInput: exit 2), not an internal failure of the server process.
KERNEL_ENV = {"CASE4_QGEMV": ("auto", "f32", "h2", "tc"), "CASE4_QGEMV_GRID": ("resident", "x4"),
              "CASE4_QGEMV_TCW": ("auto", "8", "16")}


def check_kernel_env() -> None:
    for name, ok in KERNEL_ENV.items():
        v = os.environ.get(name, "")
        if v and v not in ok:
            raise BadInput(f"{name} must be {', '.join(ok[:-1])} or {ok[-1]}, got '{v}'")


def default_options(ext):
    """The Engine's options: the defaults, with the PDL level from CASE4_PDL (0 plain launches, 1 PDL,
    2 + L2 prefetch, 3 + register preload; default 3)."""
    raw = os.environ.get("CASE4_PDL", "3")
    if raw not in ("0", "1", "2", "3"):
        raise BadInput(f"CASE4_PDL must be 0, 1, 2 or 3, got '{raw}'")
    return ext.EngineOptions(pdl=int(raw))


MATRICES = ("w_qkv", "w_o", "w_gu", "w_down")
GEMV_STORE = 0  # ops.h GemvMode kGemvStore: out = round(W x (+ bias))


def matrix_entry(m):
    """A matrix of the Engine's plan: its pointer (fp16/bf16 arena view), or for a QuantLinear the dict
    ModelWeights.pointers() gives (docs/architecture.md): {"mode", "group", "q", "scale", "minv" (0 for int8)}."""
    if not isinstance(m, QuantLinear):
        return m.data_ptr()
    want = {"int8": torch.int8, "int4": torch.uint8}[m.mode]
    if m.q.dtype != want or m.scale.dtype != torch.float16 or not (m.q.is_contiguous() and m.scale.is_contiguous()):
        raise BadInput(f"a quantized {m.n}x{m.k} matrix must hold contiguous {want} q and float16 scales")
    if m.q.device.type != "cuda" or (m.minv is not None and m.minv.dtype != torch.float16):
        raise BadInput(f"a quantized {m.n}x{m.k} matrix must be on the GPU with float16 minimums")
    return {"mode": m.mode, "group": m.group, "q": m.q.data_ptr(), "scale": m.scale.data_ptr(),
            "minv": m.minv.data_ptr() if m.minv is not None else 0}


def quantized(w) -> list[QuantLinear]:
    """The weights' quantized matrices (lm_head included), in no particular order."""
    mats = [getattr(lw, k) for lw in w.layers for k in MATRICES] + [w.lm_head]
    return [m for m in mats if isinstance(m, QuantLinear)]


def quant_name(w) -> str:
    """'none', or the modes of the quantized matrices ('int4', 'int8', or 'int4+int8' for a mixed GGUF)."""
    return "+".join(sorted({m.mode for m in quantized(w)})) or "none"


class DequantWeights:
    """The weights as the prefill decoder (ReferenceDecoder in the model dtype) sees them: every attribute is the
    real weights', except that a quantized matrix comes back as a `DequantMatrix`, whose `prefill_linear(x, b)` the
    decoder's `_lin` calls, on torch's current stream:
      * more than one row: the matrix dequantized into `scratch` (one buffer of the largest quantized matrix, model
        dtype) by the extension's dequant kernel, then F.linear (cuBLAS). One buffer serves every matrix because the
        forward uses a matrix in one linear before it reads the next (stream order);
      * one row (the lm_head of a prompt's last position, every matrix of a one-token continuation): the decode
        step's quantized gemv on the quantized weights (`ext.qgemv`, store mode, the bias in its epilogue), which
        reads a quarter (int4) or half (int8) of the bytes that dequantizing and multiplying would write and read.
    Capturable: no allocation but the output, plain launches (no PDL)."""

    def __init__(self, w, ext, scratch: torch.Tensor):
        self._w, self._ext, self._scratch = w, ext, scratch
        self._dt = 0 if w.dtype == torch.float16 else 1
        self._max_blocks = 0  # the gemv's grid cap, as the decode step's (SMs x 4); set on first use
        self.layers = [_DequantLayer(self, lw) for lw in w.layers]

    def __getattr__(self, name):
        return getattr(self._w, name)

    @property
    def lm_head(self):
        return self.matrix(self._w.lm_head)

    def matrix(self, m):
        return DequantMatrix(self, m) if isinstance(m, QuantLinear) else m  # checked by the plan (matrix_entry)

    def dequant(self, m: QuantLinear) -> torch.Tensor:
        """m dequantized into the scratch (a view [n, k])."""
        out = self._scratch[:m.n * m.k].view(m.n, m.k)
        e = matrix_entry(m)
        self._ext.dequant(e["q"], e["scale"], e["minv"], 8 if m.mode == "int8" else 4, m.group, m.n, m.k,
                          out.data_ptr(), self._dt, torch.cuda.current_stream(out.device).cuda_stream)
        return out

    def gemv(self, m: QuantLinear, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x [1, k] @ W.T (+ b) -> [1, n] in x's dtype by the quantized gemv (fp32 sums of the exact values, one
        rounding: the decode step's numbers)."""
        if not self._max_blocks:
            self._max_blocks = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
        if not x.is_contiguous() or x.data_ptr() % 16:  # the gemv reads x in 16-byte vectors
            x = x.clone(memory_format=torch.contiguous_format)
        y = torch.empty(1, m.n, dtype=x.dtype, device=x.device)
        e = matrix_entry(m)
        self._ext.qgemv(e["q"], e["scale"], e["minv"], 8 if m.mode == "int8" else 4, m.group, m.n, m.k, x.data_ptr(),
                        0, 0.0, y.data_ptr(), GEMV_STORE, self._dt, torch.cuda.current_stream(x.device).cuda_stream, 1,
                        self._max_blocks, pdl=0, bias=0 if b is None else b.contiguous().data_ptr())
        return y


class DequantMatrix:
    """A quantized matrix as the prefill decoder's `_lin` takes it (DequantWeights)."""

    def __init__(self, owner: DequantWeights, m: QuantLinear):
        self._owner, self.m = owner, m

    def prefill_linear(self, x: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, k] @ W.T (+ b): [T, n] in x's dtype, each fp32 sum rounded once, as F.linear."""
        if x.shape[0] == 1:
            return self._owner.gemv(self.m, x, b)
        return F.linear(x, self._owner.dequant(self.m), b)


class _DequantLayer:
    def __init__(self, owner: DequantWeights, lw):
        self._owner, self._lw = owner, lw

    def __getattr__(self, name):
        v = getattr(self._lw, name)
        return self._owner.matrix(v) if name in MATRICES else v


class CudaBackend(Backend):
    name = "cuda"
    supports_graphs = True

    def __init__(self, model: LoadedModel, sessions: int = 1, graph_mode: str = "exact", gemm: str = "custom",
                 max_seq: int | None = None, steps_per_graph: int = 8, ring_len: int = 4096, warmup: bool = True,
                 options=None):
        """options: an ext.EngineOptions (None: default_options, i.e. the defaults and CASE4_PDL)."""
        if graph_mode not in GRAPH_MODES:
            raise BadInput(f"graph_mode must be one of {', '.join(GRAPH_MODES)}, got '{graph_mode}'")
        if gemm not in GEMMS:
            raise BadInput(f"gemm must be one of {', '.join(GEMMS)}, got '{gemm}'")
        super().__init__(model, sessions)
        check_kernel_env()
        self.ext = load_extension()
        w = model.weights
        if w.device.type != "cuda":
            raise BadInput("the cuda backend needs the weights on a CUDA device")
        if w.dtype not in (torch.float16, torch.bfloat16):
            raise BadInput(f"the cuda backend runs float16 or bfloat16, not {str(w.dtype).replace('torch.', '')}")
        self.cfg = cfg = with_max_seq(model.cfg, max_seq)
        self.quant = quant_name(w)
        if self.quant != "none" and gemm != "custom":
            raise BadInput(f"quantized weights ({self.quant}) run on the custom kernels: use --gemm custom")
        self.graph_mode, self.gemm = graph_mode, gemm
        mode = getattr(self.ext.GraphMode, graph_mode)  # the user's string, mapped once
        self.options = default_options(self.ext) if options is None else options
        self.steps_per_graph = max(1, int(steps_per_graph))
        self.bg_windows: dict[int, int] = {}  # session -> window of the running background capture
        self.ring_len = ring_len
        dev, dt = w.device, w.dtype
        with torch.cuda.device(dev):
            self.kv = KVArena(cfg, sessions, dt, dev)
            qmats = quantized(w)
            # prefill's dequantization scratch: the largest quantized matrix, in the model dtype
            self.dequant_scratch = (torch.empty(max(m.n * m.k for m in qmats), dtype=dt, device=dev)
                                    if qmats else None)
            pw = DequantWeights(w, self.ext, self.dequant_scratch) if qmats else w
            self.prefill_dec = ReferenceDecoder(pw, self.kv, compute_dtype=dt)
            # prompt forwards replayed as CUDA graphs per (session, bucket); CASE4_PREFILL_GRAPHS=0: eager
            self.prefill_graphs = (PrefillGraphs(self.prefill_dec, cfg.max_seq_len)
                                   if os.environ.get("CASE4_PREFILL_GRAPHS", "1") != "0" else None)
            H, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
            self.max_splits = -(-cfg.max_seq_len // self.ext.SPLIT_LEN)
            # O fused into attention (small models): attention's block rows are the query heads x o_parts
            o_parts = self.ext.attn_o_parts(H, cfg.num_heads, cfg.num_kv_heads, D)
            rows = cfg.num_heads * max(1, o_parts)

            def buf(n, dtype=dt):
                return torch.zeros(n, dtype=dtype, device=dev)

            self.scratch = {
                "x": buf(H), "xn": buf(H), "qkv": buf(cfg.qkv_rows), "ctx": buf(cfg.q_dim), "mlp": buf(I),
                "tmp": buf(max(2 * I, cfg.qkv_rows, H, V)), "logits": buf(V, torch.float32),
                "part_acc": buf(rows * self.max_splits * D, torch.float32),
                "part_ml": buf(rows * self.max_splits * 2, torch.float32),
                "counters": buf(rows, torch.int32),
                **({"o_sum": buf(H, torch.int64)} if o_parts else {}),  # zero at rest (the fused O's sums)
                "token_dev": buf(sessions, torch.int32), "seq_len_dev": buf(sessions, torch.int32),
                "params_dev": buf(sessions * self.ext.SAMPLE_PARAMS_BYTES, torch.uint8),
                "ring": buf(sessions * ring_len, torch.int32),
            }
            self.logits_host = torch.empty(V, dtype=torch.float32, pin_memory=True)
            self.ring_host = torch.empty(ring_len, dtype=torch.int32, pin_memory=True)
            torch.cuda.synchronize(dev)  # start-up only: the zero fills are done before our streams run
            # the matrices as the plan takes them (an int, or a dict for a QuantLinear: matrix_entry)
            # q/k/v biases (Qwen2): each layer's fused [qkv_rows] bias in the arena, added by the QKV gemv; the plan's
            # qkv_bias says the model has them, and Plan::validate checks that every layer's pointer is there
            layers = [{"attn_norm": lw.attn_norm.data_ptr(), "mlp_norm": lw.mlp_norm.data_ptr(),
                       **{k: matrix_entry(getattr(lw, k)) for k in MATRICES},
                       **({"b_qkv": w.b_qkv[l].data_ptr()} if w.b_qkv else {})} for l, lw in enumerate(w.layers)]
            plan = {
                "dtype": str(dt).replace("torch.", ""), "V": V, "H": H, "I": I, "L": cfg.num_layers,
                "Hq": cfg.num_heads, "Hkv": cfg.num_kv_heads, "D": D, "R": cfg.rotary_dim,
                "max_seq": cfg.max_seq_len, "sessions": sessions, "eps": float(cfg.rms_norm_eps),
                "round_logits": 1, "qkv_bias": bool(cfg.qkv_bias),
                "embed": w.embed.data_ptr(), "final_norm": w.final_norm.data_ptr(),
                "lm_head": matrix_entry(w.lm_head), "rope_cos": w.rope_cos.data_ptr(),
                "rope_sin": w.rope_sin.data_ptr(), "layers": layers,
                "kv": self.kv.kv.data_ptr(), "max_splits": self.max_splits, "ring_len": ring_len, "gemm": gemm,
                **{k: t.data_ptr() for k, t in self.scratch.items()},
            }
            try:
                self.engine = self.ext.Engine(plan, mode, self.options)
            except self.ext.BadArgument as e:
                raise BadInput(str(e)) from None
            if graph_mode == "dynamic":
                for s in range(sessions):
                    self.engine.prepare_dynamic(s, 1)
        self._closed = False
        if warmup:
            self._warmup()

    def _warmup(self) -> None:
        """Start-up only: prefills of 4, 64 and 512 tokens (torch/cuBLAS handles and GEMM/SDPA kernel
        loads) and one eager step with a logits fetch (our kernels, the D2H path) on session 0,
        then reset it, so the first request's TTFT does not pay the initialisation. With prefill
        graphs, one prefill per bucket up to 2048 tokens instead, on every session: each captures
        its graph (one per session and bucket). A session left to capture on first use cost `serve`
        its first request on each slot: an H100 load bench measured a 102 ms TTFT for a 32-token
        prompt on a fresh slot (the capture, and the background decode capture paused meanwhile).
        Scratch, KV rows past the reset position and the token ring are overwritten by real work."""
        V, cap = self.cfg.vocab_size, self.cfg.max_seq_len - 2
        lens = {min(4, cap), min(64, cap), min(512, cap)}  # GEMM kernels differ by prompt length
        buckets = set(self.prefill_graphs.buckets(min(2048, cap))) if self.prefill_graphs is not None else set()
        for s in range(self.sessions):
            for n in sorted(lens | buckets if s == 0 else buckets):
                if n < 1:
                    continue
                ids = [(7 * i + 1) % V for i in range(n)]
                tok = int(self.prefill(s, ids).argmax())
                if s == 0 and n == min(4, cap):
                    self.step(0, tok)
            self.engine.sync()
            self.reset(s)
        if self.prefill_graphs is not None:
            self._time_prefills(sorted(buckets))

    def _time_prefills(self, buckets: list[int]) -> None:
        """Start-up, after the warm-up: one replay of each prefill graph and one eager prefill of the
        smallest bucket on session 0 (wall time to the logits on the host), for serve's prompt cache
        (plan_keep: PrefillGraphs.recompute_cheaper)."""
        pg, V = self.prefill_graphs, self.cfg.vocab_size
        for n in buckets:
            ids = [(7 * i + 1) % V for i in range(n)]
            t0 = time.perf_counter()
            self.prefill(0, ids)
            pg.replay_ms[n] = (time.perf_counter() - t0) * 1e3
        n = min(buckets) if buckets else 0
        if n > 1:
            ids = [(5 * i + 3) % V for i in range(n)]
            self.prefill(0, ids[:1])  # the session holds ids[:1]: the continuation below is eager
            for _ in range(2):  # the second run is timed (the first loads its kernels)
                t0 = time.perf_counter()
                self.prefill_from(0, ids, 1)
                pg.eager_ms = (time.perf_counter() - t0) * 1e3
        self.engine.sync()
        self.reset(0)

    def plan_keep(self, session: int, ids: list[int], keep: int) -> int:
        """0 (pre-fill the whole prompt again, in its graph) where that is measured to be faster than the
        eager continuation from `keep` (PrefillGraphs.recompute_cheaper), else keep."""
        ids = self.check_keep(session, ids, keep)  # a bad keep is the caller's error either way
        pg = self.prefill_graphs
        if pg is not None and keep > 0 and pg.recompute_cheaper(session, len(ids), len(ids) - keep):
            return 0
        return keep

    # -- positions ---------------------------------------------------------------------------
    def seq_len(self, session: int) -> int:
        return self.kv.seq_len[self.kv.check_session(session)]

    def reset(self, session: int) -> None:
        self.kv.check_session(session)
        self.kv.seq_len[session] = 0
        self.engine.set_seq_len(session, 0)

    def _logits(self) -> torch.Tensor:
        # no copy: the pinned buffer itself is returned (see step/replay)
        self.engine.fetch_logits(self.logits_host.data_ptr())
        return self.logits_host

    # -- decode --------------------------------------------------------------------------------
    def prefill(self, session: int, ids: list[int]) -> torch.Tensor:
        ids = self.check_prompt(session, ids)
        self.engine.sync()  # earlier steps on the replay stream are done with the arena
        pg, paused = self.prefill_graphs, {}
        if pg is not None and self.bg_windows and not pg.ready(session, len(ids)):
            # a prefill graph is captured first: torch.cuda.graph synchronizes the device, which is
            # not permitted while the engine's thread captures a decode graph, so that thread pauses
            paused = dict(self.bg_windows)
            self.engine.bg_capture_stop(-1)
        try:
            logits = pg.run(session, ids) if pg is not None else None
        finally:
            for s, w in paused.items():
                self.engine.bg_capture_start(s, w)
        if logits is None:  # no graph for this length (or graphs off): the eager torch path
            logits = self.prefill_dec.prefill(session, ids)
        self.kv.seq_len[session] = len(ids)
        # the logits into the engine's scratch, where step/replay leave theirs, for sample()
        self.scratch["logits"].copy_(logits.reshape(-1))
        torch.cuda.current_stream(self.kv.kv.device).synchronize()  # the KV rows and the logits are written
        self.engine.set_seq_len(session, len(ids))
        return logits.float().cpu()

    def rewind(self, session: int, n: int) -> None:
        self.kv.seq_len[session] = n
        self.engine.set_seq_len(session, n)

    def prefill_from(self, session: int, ids: list[int], keep: int) -> torch.Tensor:
        """One new token: a decode step (the same kernels as the solo run); more: the eager torch
        prefill of the new positions (no prefill graph: they are keyed by prompt length)."""
        ids = self.check_keep(session, ids, keep)
        if len(ids) - keep == 1:
            return super().prefill_from(session, ids, keep)
        self.engine.sync()  # earlier steps on the replay stream are done with the arena
        logits = self.prefill_dec.forward(session, ids[keep:], keep, last_only=True)[-1]
        self.kv.seq_len[session] = len(ids)
        self.scratch["logits"].copy_(logits.reshape(-1))  # where sample() reads
        torch.cuda.current_stream(self.kv.kv.device).synchronize()
        self.engine.set_seq_len(session, len(ids))
        return logits.float().cpu()

    def step(self, session: int, token: int) -> torch.Tensor:
        """One eager step (custom kernels, no graph).

        Returns the fp32 logits as a CPU tensor that is the backend's pinned host buffer: it
        stays valid until the next step/replay call overwrites it (clone it to keep it)."""
        self.kv.check_session(session)
        T = self.seq_len(session)
        self.check_position(session, T)
        self.engine.eager(session, T, self.check_token(token))
        self.kv.seq_len[session] = T + 1
        return self._logits()

    def replay(self, session: int, seq_len: int, token: int) -> torch.Tensor:
        """The step at T = seq_len through the graph mode (exact: graph T or eager on a miss).

        Returns the fp32 logits as a CPU tensor that is the backend's pinned host buffer (no
        per-token copy): valid until the next step/replay call; clone it to keep it."""
        self.kv.check_session(session)
        self.check_position(session, seq_len)
        self.engine.replay(session, seq_len, self.check_token(token))
        self.kv.seq_len[session] = seq_len + 1
        return self._logits()

    def sample(self, session: int, params, position: int) -> int:
        """Draw the next token from the latest logits (those the last prefill / step / replay left in the engine's
        logits scratch, which all sessions share) with the device sampler: the finish kernel's sampling, RNG
        position `position` (as case4_sampling.py), no seq_len change. token_dev[session] becomes the token, so a
        following generate() continues from it; the token comes back to the host (one 4-byte D2H)."""
        self.kv.check_session(session)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise BadInput(f"position must be an integer >= 0, got {position!r}")
        return int(self.engine.sample(session, position, float(params.temperature), int(params.top_k),
                                      float(params.top_p), int(params.seed) & ((1 << 64) - 1)))

    def generate(self, session: int, start_token: int, steps: int, params, stop_ids=()) -> list[int]:
        """`steps` decode steps with device sampling; tokens come back from the ring in chunks."""
        self.kv.check_session(session)
        tok = self.check_token(start_token)
        if not isinstance(steps, int) or steps < 0:
            raise BadInput(f"steps must be an integer >= 0, got {steps!r}")
        steps = min(steps, self.cfg.max_seq_len - self.seq_len(session))
        if steps <= 0:
            return []
        stop = set(int(t) for t in stop_ids)
        chunk = 32 if stop else self.ring_len - 1
        self.engine.set_params(session, float(params.temperature), int(params.top_k), float(params.top_p),
                               int(params.seed) & ((1 << 64) - 1), 1)
        self.engine.set_token(session, tok)
        out: list[int] = []
        try:
            while len(out) < steps:
                T0 = self.seq_len(session)
                n = min(chunk, steps - len(out))
                self.engine.generate(session, T0, n, self.steps_per_graph)
                self.engine.fetch_ring(session, self.ring_host.data_ptr())
                ring = self.ring_host.tolist()
                got = [ring[(T0 + 1 + i) % self.ring_len] for i in range(n)]
                self.kv.seq_len[session] = T0 + n
                for i, t in enumerate(got):
                    out.append(t)
                    if t in stop:  # fed tokens end before the stop token: rewind the position
                        self.kv.seq_len[session] = T0 + i + 1
                        self.engine.set_seq_len(session, T0 + i + 1)
                        return out
        finally:
            self.engine.set_params(session, 0.0, 0, 1.0, 0, 0)
        return out

    # -- graphs ---------------------------------------------------------------------------------
    def bg_capture_start(self, session: int, window: int) -> dict:
        self.kv.check_session(session)
        if not isinstance(window, int) or window < 1:
            raise BadInput(f"window must be an integer >= 1, got {window!r}")
        if self.graph_mode != "exact":
            return {"note": f"graph mode {self.graph_mode}: no background capture needed", **self.graph_stats()}
        self.engine.bg_capture_start(session, window)
        self.bg_windows[session] = window
        return self.graph_stats()

    def wait_precapture(self, session: int, count: int, timeout_s: float = 60.0) -> dict:
        self.kv.check_session(session)
        if self.graph_mode == "exact":
            try:
                self.engine.wait_precapture(session, int(count), float(timeout_s))
            except self.ext.PrecaptureTimeout as e:
                raise PrecaptureTimeout(str(e)) from None
            except self.ext.BadArgument as e:
                raise BadInput(str(e)) from None
        return self.graph_stats()

    def bg_capture_stop(self, session: int = -1) -> dict:
        self.engine.bg_capture_stop(session)
        if session < 0:
            self.bg_windows.clear()
        else:
            self.bg_windows.pop(session, None)
        return self.graph_stats()

    def graph_stats(self) -> dict:
        st = dict(self.engine.stats())
        out = {k: (int(v) if float(v).is_integer() else v) for k, v in st.items() if not k.startswith("position_")}
        out["mode"] = self.graph_mode
        if self.prefill_graphs is not None:
            out.update(self.prefill_graphs.stats())
        err = self.engine.last_error()
        if err:
            out["last_error"] = err
        return out

    def trace_events(self) -> list[dict]:
        pid = os.getpid()
        return [{"name": n, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid}
                for n, tid, ts, dur in self.engine.trace_events()]

    def status(self) -> dict:
        w = self.model.weights
        dev = w.device
        free, total = torch.cuda.mem_get_info(dev)
        return {"backend": self.name, "device": torch.cuda.get_device_name(dev), "model": self.model.name,
                "dtype": str(w.dtype).replace("torch.", ""), "quant": self.quant, "gemm": self.gemm,
                "graph_mode": self.graph_mode, "graphs": self.graph_stats(),
                "memory": {"weights_bytes": w.arena.numel() * w.arena.element_size()
                           + sum(m.nbytes() for m in quantized(w)),
                           "dequant_scratch_bytes": (0 if self.dequant_scratch is None else
                                                     self.dequant_scratch.numel() * self.dequant_scratch.element_size()),
                           "kv_bytes": self.kv.nbytes(),
                           "scratch_bytes": sum(t.numel() * t.element_size() for t in self.scratch.values()),
                           "device_free_bytes": free, "device_total_bytes": total},
                "positions": list(self.kv.seq_len)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.engine.close()
            self.prefill_graphs = None  # graphs and their memory pool
