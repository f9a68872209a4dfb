"""Will the model fit? Checked before anything is allocated, so that a model too large for
the device is a one-line BadInput naming what it needs and what to use instead, not an
out-of-memory failure half-way through filling the arena.

The estimate is a floor: the weight arenas (server/model/weights.py `arena_bytes`: the dense one
and, for a quantized model, the bytes of its quantized matrices) plus the
KV arena (server/kv.py: `[S, L, 2, Hkv, max_seq, D]` in the model dtype). Scratch buffers,
activations and CUDA graphs come on top, so passing the check does not promise a fit;
failing it does mean the model cannot fit.
"""
from __future__ import annotations

import torch

from case4_errors import BadInput
from server.model.config import SYNTHETIC_SHAPES, ModelConfig, with_max_seq
from server.model.weights import arena_bytes, quant_schemes


class ModelTooLarge(BadInput):
    """The model's weights and KV cache need more memory than the device has available."""


def kv_bytes(cfg: ModelConfig, dtype: torch.dtype, sessions: int) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return sessions * cfg.num_layers * 2 * cfg.kv_dim * cfg.max_seq_len * elem


def need_bytes(cfg: ModelConfig, dtype: torch.dtype, sessions: int = 1, schemes: dict | None = None) -> int:
    return arena_bytes(cfg, dtype, schemes) + kv_bytes(cfg, dtype, sessions)


def available_bytes(device) -> int:
    """Device memory free for this process (CUDA), or the kernel's MemAvailable (CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        # memory this process's allocator caches but does not use is free for us too
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("/proc/meminfo has no MemAvailable line")


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def check_floor(spec: str, cfg: ModelConfig, device) -> None:
    """Before anything walks the layers (quant_schemes, the arena plan of need_bytes): weights that cannot
    fit even at 4 bits (half a byte each, the smallest of any scheme) are refused at once. A config.json
    with num_hidden_layers 10**9 made those walks run for many minutes before check_fits could answer."""
    have, floor = available_bytes(device), cfg.weight_elements() // 2
    if floor > have:
        where = f"GPU {torch.device(device)}" if torch.device(device).type == "cuda" else "the CPU"
        raise ModelTooLarge(f"{spec} needs at least {_gb(floor)} for its weights alone ({cfg.num_layers} layers, "
                            f"vocabulary {cfg.vocab_size}, even at 4 bits) but {where} has {_gb(have)} "
                            f"available: use a smaller model")


def check_fits(spec: str, cfg: ModelConfig, dtype: torch.dtype, device, sessions: int = 1,
               schemes: dict | None = None) -> None:
    """ModelTooLarge (one line: what it needs, what is there, what to use instead) unless the
    weight and KV arenas of `cfg` (its matrices quantized as `schemes` says) fit the memory
    available on `device`."""
    have = available_bytes(device)
    need = need_bytes(cfg, dtype, sessions, schemes)
    if need <= have:
        return
    dev = torch.device(device)
    where = f"GPU {dev}" if dev.type == "cuda" else "the CPU"
    dt = str(dtype).replace("torch.", "")
    instead = []
    if dtype == torch.float32 and need_bytes(cfg, torch.bfloat16, sessions, schemes) <= have:
        instead.append("--dtype bfloat16")
    for q in ("int8", "int4"):
        if not schemes or q == "int4" and any(m != "int4" for m, _ in schemes.values()):
            try:
                fits = need_bytes(cfg, dtype, sessions, quant_schemes(cfg, q, None, spec)) <= have
            except BadInput:
                fits = False
            if fits:
                instead.append(f"--quant {q}")
                break
    wbytes = arena_bytes(cfg, dtype, schemes)
    if kv_bytes(cfg, dtype, sessions) > 0 and wbytes < have:
        instead.append("a smaller --max-seq")
    if spec.startswith("synthetic:"):
        fit = [n for n, c in SYNTHETIC_SHAPES.items()
               if need_bytes(with_max_seq(c, cfg.max_seq_len), dtype, sessions) <= have]
        instead.append(f"a smaller shape ({', '.join('synthetic:' + n for n in fit)})" if fit
                       else "a smaller shape")
    else:
        instead.append("a smaller model")
    if dev.type != "cuda":
        instead.append("a GPU (--device cuda)" if torch.cuda.is_available() else "a machine with a GPU")
    quant = f" with {schemes[next(iter(schemes))][0]} weights" if schemes else ""
    raise ModelTooLarge(f"{spec} in {dt}{quant} needs {_gb(need)} ({_gb(wbytes)} of weights + "
                      f"{_gb(kv_bytes(cfg, dtype, sessions))} of KV cache for {sessions} session{'s' * (sessions > 1)} x "
                      f"{cfg.max_seq_len} positions) but {where} has {_gb(have)} available: use "
                      f"{' or '.join(instead)}")
