"""The weight-only quantized peers of the decode benchmark (issue 26), built from PyTorch's own operators so
that nothing is installed on the GPU machine:

  torch/int8-compile    int8 weights [N, K] + one fp16 scale a row, dequantized inside the matmul
                        (`sum(x * w.float(), -1) * s`: gpt-fast's int8 weight-only linear written as the batch-1
                        GEMV, which inductor fuses into one reduction kernel), activations in the shape's dtype
  torch/int4-tinygemm   torch.ops.aten._weight_int4pack_mm (tinygemm) on weights packed by
                        aten._convert_weight_to_int4pack (CUDA layout since torch 2.5: uint8 [N, K/2] in,
                        int32 [N/8, K/(16 * inner_k_tiles), 32, inner_k_tiles/2] out), groups of 128 along K,
                        scales and zeros bf16 [K/G, N, 2]; activations bf16 (the op's only dtype on CUDA)

A minimal Llama decode step (RMSNorm, fused QKV, RoPE, a static KV cache written with index_copy_, SDPA over the
cache with a position mask, SwiGLU MLP, lm_head, argmax on the device) whose per-layer function and head are
compiled once by torch.compile (inductor; every layer has the same shapes, so one compile serves all of them)
and whose whole step is captured in one CUDA graph that feeds its argmax back as the next input: the same
"compiled + CUDA graphs" a gpt-fast user gets from mode="reduce-overhead", without inductor compiling 32 (or
80) unrolled layers. Weights are random (decode speed depends on bytes, not values) and drawn quantized: no
fp16 copy of a matrix exists. Timed like case4/*/device: replays of the step graph, one sync at the end.

GPU only: on a CPU the rows are skipped, saying why. A mixin of runner.Bench."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from common import RowSkipped, free_memory, median, now_s, prompt_ids, rnd, sync

TINYGEMM_GROUP = 128


def _largest(cands, ok):
    return next((c for c in cands if ok(c)), None)


class _Int8:
    """Weight [N, K] int8 and one scale a row: gpt-fast's WeightOnlyInt8Linear."""

    def __init__(self, n, k, gen, dev):
        self.w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev, generator=gen)
        self.s = ((0.5 + torch.rand(n, device=dev, generator=gen)) / (73.0 * math.sqrt(k))).half()

    def tensors(self):
        return (self.w, self.s)

    @staticmethod
    def apply(x, w, s):
        """x [1, K] times w^T: written as the batch-1 GEMV it is, so inductor emits one reduction kernel that
        converts the int8 in registers (F.linear(x, w.to(x.dtype)) may instead materialize the fp16 weight
        and call cuBLAS, reading 3 bytes a weight, depending on the torch version's mixed-mm fusion)."""
        return ((x.float() * w.float()).sum(-1) * s.float()).to(x.dtype).view(1, -1)


class _Int4:
    """tinygemm's layout: the uint8 [N, K/2] nibbles (high nibble first, as torchao packs them) repacked by
    _convert_weight_to_int4pack; the uint8 draw is freed right after."""

    def __init__(self, n, k, gen, dev):
        self.group = _largest((TINYGEMM_GROUP, 64, 32), lambda g: k % g == 0)
        self.tiles = _largest((8, 4, 2), lambda t: k % (16 * t) == 0)
        if self.group is None or self.tiles is None or n % 8:
            raise RowSkipped(f"tinygemm needs N % 8 == 0 and K % 32 == 0; a matrix here is [{n}, {k}]")
        nib = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=dev, generator=gen)
        self.w = torch.ops.aten._convert_weight_to_int4pack(nib, self.tiles)
        del nib
        scale = (0.5 + torch.rand(k // self.group, n, device=dev, generator=gen)) / (4.6 * math.sqrt(k))
        self.sz = torch.stack((scale, torch.zeros_like(scale)), dim=-1).to(torch.bfloat16).contiguous()

    def tensors(self):
        return (self.w, self.sz)


def quant_tensor_bytes(mats) -> int:
    """Bytes of the quantized matrices a step reads (every weight tensor of every matrix)."""
    return sum(t.numel() * t.element_size() for m in mats for t in m.tensors())


class TorchQuantModel:
    """Random weights of `cfg` quantized for one peer, a static KV cache of `max_seq` positions, and the decode
    step (compiled layer / head functions) captured in one CUDA graph by `capture()`."""

    def __init__(self, cfg, peer: str, max_seq: int, seed: int, dev="cuda"):
        self.cfg, self.dev = cfg, dev
        self.dtype = torch.bfloat16 if peer == "torch/int4-tinygemm" else torch.float16
        gen = torch.Generator(device=dev).manual_seed(seed + 4242)
        H, I, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        Hq, Hkv, L = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
        Lin = _Int8 if peer == "torch/int8-compile" else _Int4
        ones = lambda: (1.0 + 0.1 * torch.randn(H, device=dev, generator=gen)).to(self.dtype)  # noqa: E731
        self.layers = [dict(attn_norm=ones(), qkv=Lin((Hq + 2 * Hkv) * D, H, gen, dev), o=Lin(H, Hq * D, gen, dev),
                            mlp_norm=ones(), gu=Lin(2 * I, H, gen, dev), down=Lin(H, I, gen, dev)) for _ in range(L)]
        self.lm_head = Lin(cfg.vocab_size, H, gen, dev)
        self.final_norm = ones()
        self.embed = torch.randn(cfg.vocab_size, H, device=dev, generator=gen).to(self.dtype)
        self.mats = [lw[k] for lw in self.layers for k in ("qkv", "o", "gu", "down")] + [self.lm_head]
        self.max_seq = max_seq
        self.k = [torch.zeros(1, Hkv, max_seq, D, dtype=self.dtype, device=dev) for _ in range(L)]
        self.v = [torch.zeros_like(c) for c in self.k]
        R = D // 2
        inv = 1.0 / (float(getattr(cfg, "rope_theta", 10000.0)) ** (torch.arange(R, device=dev).float() / R))
        ang = torch.arange(max_seq, device=dev).float()[:, None] * inv[None]
        self.cos, self.sin = ang.cos(), ang.sin()
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)     # the step's input token
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)     # its position
        self.hist = torch.zeros(max_seq + 1, dtype=torch.long, device=dev)  # hist[p + 1]: the token after p
        eps = float(cfg.rms_norm_eps)
        # groups are per matrix name (every layer's matrix of a name has the same K): Python constants
        groups = {k: getattr(self.layers[0][k], "group", None) for k in ("qkv", "o", "gu", "down")}
        groups["lm_head"] = getattr(self.lm_head, "group", None)

        def lin(x, w, s, name):
            if Lin is _Int8:
                return _Int8.apply(x, w, s)
            return torch.ops.aten._weight_int4pack_mm(x, w, groups[name], s)

        def rms(x, w):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

        def rope(t, cos, sin):  # t [1, h, 1, D], rotate-half form
            a, b = t.float().chunk(2, dim=-1)
            return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1).to(t.dtype)

        def layer(x, pos, attn_norm, qkv_w, qkv_s, o_w, o_s, mlp_norm, gu_w, gu_s, down_w, down_s, kc, vc,
                  cos_t, sin_t):
            h = rms(x, attn_norm)
            q, k, v = lin(h, qkv_w, qkv_s, "qkv").split((Hq * D, Hkv * D, Hkv * D), dim=-1)
            cos, sin = cos_t[pos][:, None, :], sin_t[pos][:, None, :]
            q = rope(q.view(1, Hq, 1, D), cos, sin)
            k = rope(k.view(1, Hkv, 1, D), cos, sin)
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v.view(1, Hkv, 1, D))
            mask = (torch.arange(kc.shape[2], device=kc.device) <= pos).view(1, 1, 1, -1)
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=Hq != Hkv)
            x = x + lin(a.reshape(1, Hq * D), o_w, o_s, "o")
            g, u = lin(rms(x, mlp_norm), gu_w, gu_s, "gu").chunk(2, dim=-1)
            return x + lin(F.silu(g) * u, down_w, down_s, "down")

        def head(x, norm, w, s):
            return torch.argmax(lin(rms(x, norm), w, s, "lm_head").float(), dim=-1)

        # one compile per function: the layers share shapes, dtypes and groups (their tensors are inputs)
        self._layer_c = torch.compile(layer, dynamic=False)
        self._head_c = torch.compile(head, dynamic=False)
        self.graph = None

    def _step(self):
        x = self.embed[self.tok]                         # [1, H]: one row read
        for lw, kc, vc in zip(self.layers, self.k, self.v):
            x = self._layer_c(x, self.pos, lw["attn_norm"], *lw["qkv"].tensors(), *lw["o"].tensors(), lw["mlp_norm"],
                              *lw["gu"].tensors(), *lw["down"].tensors(), kc, vc, self.cos, self.sin)
        nxt = self._head_c(x, self.final_norm, *self.lm_head.tensors())
        self.hist.index_copy_(0, self.pos + 1, nxt)
        self.tok.copy_(nxt)
        self.pos.add_(1)

    def capture(self) -> float:
        """Compile (eager warm-up calls on a side stream), then capture the whole step; returns seconds."""
        t0 = now_s()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        torch.cuda.synchronize()
        return now_s() - t0

    def run(self, ids: list[int], steps: int) -> tuple[float, list[int]]:
        """The prompt token by token through the graph (untimed), then `steps` timed replays; (ms, tokens)."""
        for i, t in enumerate(ids):
            self.tok.fill_(t)
            self.pos.fill_(i)
            self.graph.replay()
        sync(self.dev)
        t0 = now_s()
        for _ in range(steps):
            self.graph.replay()
        sync(self.dev)
        ms = (now_s() - t0) * 1e3
        n = len(ids)
        return ms, self.hist[n + 1:n + 1 + steps].tolist()


class TorchQuantRows:
    def row_torch_quant(self, item: dict, row: dict) -> None:
        peer = item["system"]
        if not self.device.startswith("cuda"):
            raise RowSkipped(f"GPU only: {peer} needs CUDA (inductor's GPU kernels, "
                             + ("tinygemm's CUDA int4 matmul" if "int4" in peer else "CUDA graphs") + ")")
        if "int4" in peer and not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
            raise RowSkipped(f"this torch ({torch.__version__}) has no aten._weight_int4pack_mm")
        self.drop_model()   # the case4 model's memory back before this one's weights
        cfg = self.cfg_of(item["shape"])
        steps, prompt = int(item["steps"]), int(item["prompt"])
        ids = prompt_ids(cfg, prompt, self.args.seed)
        max_seq = -(-(prompt + max(steps, self.args.warmup_steps) + 2) // 64) * 64
        m = None
        try:
            t0 = now_s()
            m = TorchQuantModel(cfg, peer, max_seq, self.args.seed, self.device)
            build_s = now_s() - t0
            capture_s = m.capture()
            m.run(ids, self.args.warmup_steps)   # warm-up
            runs = []
            for _ in range(self.args.repeats):
                if runs and self.deadline.expired():
                    row["note"] = f"stopped after {len(runs)} repeats: time budget"
                    break
                runs.append(m.run(ids, steps))
            qb = quant_tensor_bytes(m.mats)
            dtype = str(m.dtype).replace("torch.", "")
            group = sorted({x.group for x in m.mats if hasattr(x, "group")})
        finally:
            del m
            torch._dynamo.reset()
            free_memory(self.device)
        per_run = [ms / steps for ms, _ in runs]
        ms = median(per_run)
        row.update(repeats=len(runs), ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2), ms_per_token_runs=[
            rnd(x) for x in per_run], first_tokens=runs[0][1][:16], compile_and_capture_s=rnd(capture_s, 2),
            build_s=rnd(build_s, 2), activations=dtype, quant_group=group[0] if len(group) == 1 else (group or None),
            tokens_identical_across_repeats=all(r[1] == runs[0][1] for r in runs), kv_positions=max_seq,
            latency_note="device sampling (argmax in the graph): p50/p99 per token not observable",
            note=("torch.compile'd layer and head (inductor), the whole step in one CUDA graph; "
                  + ("tinygemm int4, bf16 activations" if "int4" in peer else "int8 weight-only, fp16 activations")))
        self.add_bytes(row, cfg, steps, quant_bytes=qb)
