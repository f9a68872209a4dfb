"""CPU checks of the kernel-timeline tool's host side (bench/quick_timing.py): its per-launch
summary of the per-block records equals a plain Python min / max over the written entries. (The layout
itself comes from the extension at run time: ops.h's constants exported by bindings.cpp.)"""
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import quick_timing as qt  # noqa: E402


# a record layout of the device's shape (ops.h: kKtraceBlocks, kKtraceRec, kKtraceWarp0; quick_timing reads the real
# one from the extension), with the phase marks below the warp ends
BLOCKS, REC, WARP0 = 544, 48, 12


def test_summary_equals_min_max_over_written_entries():
    assert all(2 <= k < WARP0 for k in qt.PHASES)  # attention's phase marks lie below the warp ends
    rng = random.Random(1234)
    for _ in range(50):
        rec = torch.zeros(BLOCKS, REC, dtype=torch.int64)
        nblocks = rng.randint(1, BLOCKS)
        nwarps = rng.randint(1, 32)
        for b in range(nblocks):
            if rng.random() < 0.9:  # some blocks (idle ones) write no wait time
                rec[b, 1] = rng.randint(10**9, 2 * 10**9)
            rec[b, 0] = rng.randint(10**9, 2 * 10**9)
            for w in range(nwarps):
                rec[b, WARP0 + w] = rng.randint(10**9, 2 * 10**9)
            for k in qt.PHASES:
                if rng.random() < 0.5:
                    rec[b, k] = rng.randint(10**9, 2 * 10**9)
        got = qt.trace_summary(rec, WARP0)
        rows = rec.tolist()

        def pos(col):
            return [r[col] for r in rows if r[col] > 0]

        ends = [v for r in rows for v in r[WARP0:] if v > 0]
        assert got["start"] == min(pos(0))
        assert got["last_start"] == max(pos(0))
        assert got["wait"] == (min(pos(1)) if pos(1) else 0)
        assert got["last_wait"] == (max(pos(1)) if pos(1) else 0)
        assert got["end"] == max(ends)
        for k in qt.PHASES:
            assert got[k] == (max(pos(k)) if pos(k) else 0)


def test_summary_of_an_unwritten_launch_is_zero():
    got = qt.trace_summary(torch.zeros(BLOCKS, REC, dtype=torch.int64), WARP0)
    assert got["start"] == got["wait"] == got["end"] == 0
