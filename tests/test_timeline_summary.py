"""CPU checks of the kernel-timeline tool's host side (bench/quick_timing.py): its record layout
matches the device's (custom_kernels/csrc/ops.h, common.cuh), and its per-launch summary of the
per-block records equals a plain Python min / max over the written entries."""
import random
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import quick_timing as qt  # noqa: E402


def _constexpr(text: str, name: str) -> int:
    m = re.search(rf"constexpr\s+(?:int|size_t)\s+{name}\s*=\s*(\d+)\s*;", text)
    assert m, f"{name} not found in ops.h"
    return int(m.group(1))


def test_record_layout_matches_the_device():
    ops = (ROOT / "custom_kernels" / "csrc" / "ops.h").read_text()
    assert qt.TRACE_BLOCKS == _constexpr(ops, "kKtraceBlocks")
    assert qt.TRACE_REC == _constexpr(ops, "kKtraceRec")
    common = (ROOT / "custom_kernels" / "csrc" / "common.cuh").read_text()
    # warp ends at 12 + warp: room for 32 warps (1024 threads), and the phase marks below 12
    assert "r[12 + threadIdx.x / 32]" in common
    assert 12 + 32 <= qt.TRACE_REC
    assert all(2 <= k < 12 for k in qt.PHASES)


def test_summary_equals_min_max_over_written_entries():
    rng = random.Random(1234)
    for _ in range(50):
        rec = torch.zeros(qt.TRACE_BLOCKS, qt.TRACE_REC, dtype=torch.int64)
        nblocks = rng.randint(1, qt.TRACE_BLOCKS)
        nwarps = rng.randint(1, 32)
        for b in range(nblocks):
            if rng.random() < 0.9:  # some blocks (idle ones) write no wait time
                rec[b, 1] = rng.randint(10**9, 2 * 10**9)
            rec[b, 0] = rng.randint(10**9, 2 * 10**9)
            for w in range(nwarps):
                rec[b, 12 + w] = rng.randint(10**9, 2 * 10**9)
            for k in qt.PHASES:
                if rng.random() < 0.5:
                    rec[b, k] = rng.randint(10**9, 2 * 10**9)
        got = qt.trace_summary(rec)
        rows = rec.tolist()

        def pos(col):
            return [r[col] for r in rows if r[col] > 0]

        ends = [v for r in rows for v in r[12:] if v > 0]
        assert got["start"] == min(pos(0))
        assert got["last_start"] == max(pos(0))
        assert got["wait"] == (min(pos(1)) if pos(1) else 0)
        assert got["last_wait"] == (max(pos(1)) if pos(1) else 0)
        assert got["end"] == max(ends)
        for k in qt.PHASES:
            assert got[k] == (max(pos(k)) if pos(k) else 0)


def test_summary_of_an_unwritten_launch_is_zero():
    got = qt.trace_summary(torch.zeros(qt.TRACE_BLOCKS, qt.TRACE_REC, dtype=torch.int64))
    assert got["start"] == got["wait"] == got["end"] == 0
