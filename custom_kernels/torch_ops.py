"""Case4's decode attention kernel as a torch op: `torch.ops.case4.sdp_single_q(q, k, v, scale)`
(the seed's name), for the hf backend's `--force-flash` (server/hf_backend.py).

    q [Hq, D], k and v [Hkv, S, D] (fp16 / bf16, CUDA): q already rotated, k/v the layer's cached
    rows 0..S-1 (the current token's row included, as transformers' cache hands them to attention).
    -> [Hq, D]: softmax(q k^T * scale) v over the S rows, GQA by head group.

It calls the extension's `sdp_single_q` binding (custom_kernels/csrc/bindings.cpp), which runs the
decode attention kernel of attention.cu with `prerotated` set (no RoPE). The kernel scales by
1/sqrt(D) and takes head_dim 32/64/128/256 and up to 8 query heads per KV head: anything else is
refused by the binding (ValueError), never computed differently.
"""
from __future__ import annotations

import torch

from case4_errors import BadInput

_registered = False


def register_sdp_single_q() -> None:
    """Define `torch.ops.case4.sdp_single_q` once (BadInput without a GPU or the extension)."""
    global _registered
    if _registered:
        return
    if not torch.cuda.is_available():
        raise BadInput("--force-flash runs Case4's CUDA decode attention kernel: it needs a CUDA GPU, "
                       "and none is visible")
    from custom_kernels.ext import load_extension
    try:
        ext = load_extension()
    except Exception as e:  # ExtensionUnavailable: one line saying why
        raise BadInput(f"--force-flash needs Case4's CUDA extension: {e}") from None
    split = int(ext.SPLIT_LEN)
    dtypes = {torch.float16: 0, torch.bfloat16: 1}  # ops.h DType

    lib = torch.library.Library("case4", "FRAGMENT")
    lib.define("sdp_single_q(Tensor q, Tensor k, Tensor v, float scale) -> Tensor")

    def impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        Hq, D = q.shape
        Hkv, S, _ = k.shape
        if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
            raise ValueError(f"sdp_single_q: q, k, v must share fp16 or bf16, got {q.dtype}, {k.dtype}, {v.dtype}")
        k, v = k.contiguous(), v.contiguous()
        # the kernel reads the current row from qkv and rows 0..S-2 from the caches (it rewrites row S-1)
        qkv = torch.cat([q.reshape(-1), k[:, S - 1].reshape(-1), v[:, S - 1].reshape(-1)])
        splits = (S + split - 1) // split
        part_acc = torch.empty((Hq, splits, D), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((Hq, splits, 2), dtype=torch.float32, device=q.device)
        counters = torch.zeros((Hq,), dtype=torch.int32, device=q.device)
        ctx = torch.empty((Hq, D), dtype=q.dtype, device=q.device)
        ext.sdp_single_q(qkv.data_ptr(), k.data_ptr(), v.data_ptr(), Hq, Hkv, D, S, S - 1, float(scale),
                         part_acc.data_ptr(), part_ml.data_ptr(), splits, counters.data_ptr(), ctx.data_ptr(),
                         dtypes[q.dtype], torch.cuda.current_stream(q.device).cuda_stream)
        return ctx

    lib.impl("sdp_single_q", impl, "CUDA")
    register_sdp_single_q.lib = lib  # the Library must outlive this call
    _registered = True
