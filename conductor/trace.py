"""--trace: a Chrome-trace JSON (open in Perfetto / chrome://tracing) and a PNG timeline."""
from __future__ import annotations

import json
from pathlib import Path

PALETTE = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray")  # red = capture


def write_trace(base: Path, events: list[dict]) -> list[str]:
    """Write base.json and base.png from "X" events whose pid/tid may be names; the
    backend's own events (Backend.trace_events(), e.g. capture intervals per stream) are
    merged in by the server's status op. ts/dur are microseconds of time.perf_counter()."""
    events = [e for e in events if e.get("ph", "X") == "X" and "ts" in e]
    pids, tids, out = {}, {}, []
    for e in events:
        pid = pids.setdefault(str(e.get("pid", "server")), len(pids) + 1)
        tid = tids.setdefault((pid, str(e.get("tid", "main"))), len(tids) + 1)
        out.append({**e, "ph": "X", "pid": pid, "tid": tid, "dur": e.get("dur", 0)})
    t_min = min((e["ts"] for e in out), default=0)
    for e in out:
        e["ts"] -= t_min
    meta = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": n}} for n, pid in pids.items()]
    meta += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": n}}
             for (pid, n), tid in tids.items()]
    Path(f"{base}.json").write_text(json.dumps({"traceEvents": meta + out, "displayTimeUnit": "ms"}))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [Path(f"{base}.json").name]
    names = {pid: n for n, pid in pids.items()}
    tracks = sorted(tids.items(), key=lambda kv: kv[1])
    labels = [f"{names[pid]} / {t}" for (pid, t), _ in tracks]
    # second panel: a zoom on ~8 tokens around a capture in the middle of the run, where
    # individual capture intervals can be seen against the replays they overlap
    cap = sorted(e["ts"] for e in out if "captur" in labels[[t for _, t in tracks].index(e["tid"])].lower())
    rep = sorted(e["ts"] for e in out if labels[[t for _, t in tracks].index(e["tid"])].endswith("/ replay"))
    zoom = None
    if cap and len(rep) > 2:
        gaps = sorted(b - a for a, b in zip(rep, rep[1:]))
        width = 8 * max(gaps[len(gaps) // 2], 1.0)
        mid = cap[len(cap) // 2]
        zoom = ((mid - width / 2) / 1e3, (mid + width / 2) / 1e3)
    fig, axes = plt.subplots(2 if zoom else 1, 1, figsize=(12, (1 + 0.6 * len(tracks)) * (2 if zoom else 1)),
                             squeeze=False)
    for ax, window in zip(axes[:, 0], (None, zoom)):
        for row, ((pid, tname), tid) in enumerate(tracks):
            bars = [(e["ts"] / 1e3, max(e["dur"] / 1e3, 0.001)) for e in out if e["tid"] == tid]
            color = "tab:red" if "captur" in tname.lower() else PALETTE[row % len(PALETTE)]
            ax.broken_barh(bars, (row - 0.35, 0.7), color=color)
        ax.set_yticks(range(len(tracks)), labels)
        ax.set_xlabel("ms since the first event")
        if window:
            ax.set_xlim(*window)
            ax.set_title("zoom: ~8 tokens around a capture in the middle of the run")
        else:
            ax.set_title("Case4 timeline: capture vs replay intervals per process / stream")
    fig.tight_layout()
    fig.savefig(f"{base}.png", dpi=100)
    plt.close(fig)
    return [Path(f"{base}.json").name, Path(f"{base}.png").name]
