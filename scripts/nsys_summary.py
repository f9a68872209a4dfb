"""What an Nsight Systems report of a Case4 run says about capture and replay.

    python scripts/nsys_summary.py output/nsys-<time>.nsys-rep     # or the .sqlite export of one

Prints:
  - how many capture ranges (NVTX "case4 capture", pushed by the graph engine around each capture +
    instantiate, custom_kernels/csrc/graphs.cpp) on the capture thread overlapped a kernel of the
    replay stream (kernels launched by cudaGraphLaunch), i.e. graph T+k was captured while graph T ran;
  - that no device-wide synchronize (cudaDeviceSynchronize) ran during decode (from the first to the
    last NVTX "case4 replay*" range).
Exit 1 when a device-wide synchronize ran during decode, 2 for a missing or unreadable report.

A .nsys-rep is first exported with `nsys export --type sqlite` (nsys from $NSYS or the PATH) next to
it. The tables and columns used (NVTX_EVENTS, CUPTI_ACTIVITY_KIND_KERNEL, CUPTI_ACTIVITY_KIND_RUNTIME,
StringIds) are those of Nsight Systems' SQLite export schema; run with --cuda-graph-trace=node (as
run_ipc.sh --nsys does) so that graph kernels appear one by one.
"""
from __future__ import annotations

import argparse
import bisect
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

CAPTURE = "case4 capture"
REPLAY = "case4 replay"  # prefix: also "case4 replay_dynamic"
NVTX_PUSH_POP = 59  # NVTX_EVENTS.eventType of a push/pop range
DEVICE_SYNCS = ("cudaDeviceSynchronize", "cuCtxSynchronize")
GRAPH_LAUNCH = "cudaGraphLaunch"


class ReportError(Exception):
    pass


def to_sqlite(path: Path) -> Path:
    if path.suffix == ".sqlite":
        return path
    nsys = os.environ.get("NSYS") or shutil.which("nsys")
    if not nsys:
        raise ReportError("nsys not found (set NSYS=/path/to/nsys) to export the report to SQLite")
    out = path.with_suffix(".sqlite")
    r = subprocess.run([nsys, "export", "--type", "sqlite", "--force-overwrite", "true", "-o", str(out), str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        last = (r.stdout + r.stderr).strip().splitlines()
        raise ReportError(f"nsys export failed: {last[-1] if last else r.returncode}")
    return out


def _tables(db) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _name(name: str, prefixes) -> bool:
    # the runtime's names carry a version suffix: cudaGraphLaunch_v10000
    return any(name == p or name.startswith(p + "_v") for p in prefixes)


def summarize(db_path: Path) -> dict:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    have = _tables(db)
    need = {"NVTX_EVENTS", "CUPTI_ACTIVITY_KIND_RUNTIME", "StringIds"}
    if need - have:
        raise ReportError(f"{db_path} has no {', '.join(sorted(need - have))} table: was the run traced with "
                          f"--trace=cuda,nvtx and did the server use the cuda backend?")
    ranges = db.execute(
        "SELECT n.start, n.end, n.globalTid, COALESCE(n.text, s.value) FROM NVTX_EVENTS AS n "
        "LEFT JOIN StringIds AS s ON s.id = n.textId WHERE n.eventType = ? AND n.end IS NOT NULL",
        (NVTX_PUSH_POP,)).fetchall()
    captures = [r for r in ranges if r[3] == CAPTURE]
    replays = [r for r in ranges if r[3] and r[3].startswith(REPLAY)]
    calls = db.execute("SELECT r.start, r.end, r.globalTid, r.correlationId, s.value FROM CUPTI_ACTIVITY_KIND_RUNTIME AS r "
                       "JOIN StringIds AS s ON s.id = r.nameId").fetchall()
    # the replay stream's kernels: those of graph launches made inside a replay range (not prefill graphs)
    rep_by_tid: dict[int, list] = {}
    for r in sorted(replays):
        rep_by_tid.setdefault(r[2], []).append(r)

    rep_starts = {t: [r[0] for r in rs] for t, rs in rep_by_tid.items()}

    def in_replay(c) -> bool:
        rs = rep_by_tid.get(c[2], [])
        i = bisect.bisect_right(rep_starts.get(c[2], []), c[0])
        return any(r[1] >= c[1] for r in rs[max(0, i - 2):i])  # the innermost or its enclosing range
    launches = {c[3] for c in calls if _name(c[4], (GRAPH_LAUNCH,)) and in_replay(c)}
    kernels = []
    if "CUPTI_ACTIVITY_KIND_KERNEL" in have:
        kernels = [(k[0], k[1], k[2]) for k in db.execute(
            "SELECT start, end, streamId, correlationId FROM CUPTI_ACTIVITY_KIND_KERNEL").fetchall() if k[3] in launches]
    streams = sorted({k[2] for k in kernels})
    # the capture thread: the one thread with the most capture ranges (the engine's background thread)
    by_tid: dict[int, list] = {}
    for c in captures:
        by_tid.setdefault(c[2], []).append(c)
    tid, cap = max(by_tid.items(), key=lambda kv: len(kv[1])) if by_tid else (None, [])
    kernels.sort()
    starts = [k[0] for k in kernels]
    ends_max = []  # running max of the kernel ends, for "any kernel with start < e and end > s"
    for k in kernels:
        ends_max.append(max(k[1], ends_max[-1]) if ends_max else k[1])
    overlapped = 0
    for s, e, *_ in cap:
        i = bisect.bisect_left(starts, e)  # kernels starting before the range ends
        if i and ends_max[i - 1] > s:
            overlapped += 1
    decode = (min(r[0] for r in replays), max(r[1] for r in replays)) if replays else None
    syncs = [c for c in calls if _name(c[4], DEVICE_SYNCS) and decode and c[0] < decode[1] and c[1] > decode[0]]
    return {"capture_thread": tid, "captures": len(cap), "captures_other_threads": len(captures) - len(cap),
            "captures_overlapping_replay": overlapped, "replay_streams": streams, "replay_kernels": len(kernels),
            "replay_ranges": len(replays), "decode_ns": (decode[1] - decode[0]) if decode else 0,
            "device_syncs_in_decode": len(syncs)}


def report(s: dict) -> list[str]:
    lines = []
    if s["captures"]:
        lines.append(f"capture thread {s['capture_thread']}: {s['captures_overlapping_replay']} of {s['captures']} "
                     f"capture ranges overlapped kernels of the replay stream {s['replay_streams']} "
                     f"({s['replay_kernels']} graph kernels)")
    else:
        lines.append("no capture ranges (graph mode dynamic or none, or no background capture)")
    if s["replay_ranges"]:
        lines.append(f"decode: {s['replay_ranges']} replay ranges over {s['decode_ns'] / 1e6:.1f} ms; "
                     + ("no device-wide synchronize ran during decode" if not s["device_syncs_in_decode"] else
                        f"{s['device_syncs_in_decode']} device-wide synchronize calls ran during decode"))
    else:
        lines.append("no replay ranges: no decode on the cuda backend in this report")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help=".nsys-rep or its .sqlite export")
    a = ap.parse_args(argv)
    path = Path(a.report)
    try:
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        s = summarize(to_sqlite(path))
    except (ReportError, sqlite3.Error) as e:
        print(f"nsys_summary: {e}", file=sys.stderr)
        return 2
    for line in report(s):
        print(line)
    return 1 if s["device_syncs_in_decode"] else 0


if __name__ == "__main__":
    sys.exit(main())
