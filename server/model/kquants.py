"""llama.cpp's K-quant blocks (Q4_K, Q5_K, Q6_K: the types of its Q4_K_M / Q5_K_M / Q6_K files) dequantized with
torch on the load's device, to the values the `gguf` package's numpy code gives, bit for bit (tests/test_gguf.py on
the CPU, tests/gpu/test_gguf_gpu.py on the GPU). server/model/gguf.py uses it for a cuda load: the raw blocks
(0.56-0.82 bytes a value) go to the GPU and are dequantized there, where the package's single-threaded numpy takes
0.3-0.7 s per 58.7 M values (4096 x 14336) on the CPU machines, a minute or more for an 8B Q4_K_M file. On the CPU
this code is slower than the package (Q4_K 1.28 s against 0.33 on 2 threads), so a CPU load keeps the package.

A block holds 256 values of one row. Each value is computed in float32 with the package's operations in its order,
every product and difference rounded once (torch runs them as separate elementwise kernels, on the GPU too: no
contraction into an FMA, and CUDA's fp32 multiply and subtract round as IEEE's):
  Q4_K (144 bytes): d, dmin (fp16), 12 bytes of eight 6-bit scales and eight 6-bit minimums, 128 bytes of nibbles;
                    value = (d * scale_j) * q - dmin * min_j over sub-block j of 32 values.
  Q5_K (176 bytes): Q4_K's header, then 32 bytes holding the fifth bit of every value, then the 128 nibble bytes.
  Q6_K (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, sixteen int8 scales, d (fp16);
                    value = (d * scale_j) * (q - 32) over sub-block j of 16 values.
"""
from __future__ import annotations

import numpy as np
import torch

QK = 256


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 little-endian fp16 bits -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and minimums of Q4_K / Q5_K's 12 scale bytes ([n, 12] uint8 -> two [n, 8] float32).
    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 minimums 0-3; bytes 8-11 hold the low 4 bits of
    scales 4-7 (low nibble) and of minimums 4-7 (high nibble), whose top 2 bits are the top bits of bytes 0-3 / 4-7."""
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 63, (c & 15) | ((a >> 6) << 4)], dim=1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32]: sub-block 2g is the low nibbles of bytes 32g..32g+31, 2g+1 their high ones."""
    q = qs.view(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).view(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scales_mins(b[:, 4:16])
    q = _nibbles(b[:, 16:144]).float()
    return ((d * sc).unsqueeze(2) * q - (dmin * mn).unsqueeze(2)).reshape(-1, QK)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scales_mins(b[:, 4:16])
    high = b[:, 16:48].view(-1, 1, 32)  # bit j of byte i: the fifth bit of value i of sub-block j
    bits = torch.cat([(high >> j) & 1 for j in range(8)], dim=1)
    q = (_nibbles(b[:, 48:176]) | (bits << 4)).float()
    return ((d * sc).unsqueeze(2) * q - (dmin * mn).unsqueeze(2)).reshape(-1, QK)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql = b[:, 0:128].view(-1, 2, 1, 64)  # per half of 128 values: 64 low-nibble bytes (values 0-63, then 64-127)
    low = torch.cat([ql & 15, ql >> 4], dim=2).view(-1, 8, 32)
    qh = b[:, 128:192].view(-1, 2, 1, 32)  # per half: 32 bytes, 2 bits for each of its four runs of 32 values
    high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2).view(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int16) - 32).float().view(-1, 16, 16)
    scale = b[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(b[:, 208:210])
    return ((d * scale).unsqueeze(2) * q).reshape(-1, QK)


_KERNELS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}
KINDS = tuple(_KERNELS)  # the GGML type names this module dequantizes


def dequantize(raw, kind: str, device="cpu", chunk_blocks: int = 1 << 16) -> torch.Tensor:
    """The values of K-quant rows: raw [rows, bytes] uint8 (numpy or torch) -> float32 [rows, bytes / size * 256]
    on `device` (the raw bytes are copied there first), chunk_blocks blocks at a time (bounded temporaries)."""
    b = (raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw, dtype=np.uint8))).to(device)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    rows = b.shape[0]
    size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]  # bytes a block of QK values
    blocks = b.reshape(-1, size)
    out = torch.empty(blocks.shape[0], QK, dtype=torch.float32, device=b.device)
    for i in range(0, blocks.shape[0], chunk_blocks):
        out[i:i + chunk_blocks] = _KERNELS[kind](blocks[i:i + chunk_blocks])
    return out.view(rows, -1)
