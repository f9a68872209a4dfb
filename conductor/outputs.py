"""What a generation leaves behind: its metrics, the summary on stderr, and the files in
--output-dir (<name>_tokens.txt, <name>_text.txt, <name>_metrics.json, a row of
generate.csv, and with --trace the Chrome trace + PNG of conductor/trace.py)."""
from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from case4_errors import BadInput

from conductor.trace import write_trace


def prepare_output_dir(out_dir: Path, run_name: str | None) -> None:
    """Check before the model loads that the output files can be written: --output-dir is a
    folder (made if missing), and so is the folder a --run-name with a slash names; a file
    can be created there. BadInput (one line) otherwise: a generation is never thrown away
    at the end for want of a place to save it."""
    folder = (out_dir / run_name).parent if run_name else out_dir
    if out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--output-dir {out_dir} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        why = "a file of that name is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) \
            else (e.strerror or str(e))
        what = f"--output-dir {out_dir}" if folder == out_dir else f"--run-name {run_name!r} in --output-dir {out_dir}"
        raise BadInput(f"cannot write the outputs: {what}: {why}") from None


def silence_stdout() -> None:
    """After a BrokenPipeError (stdout's reader went away): what is still buffered, and any
    later print, goes to /dev/null, so no second BrokenPipeError when the interpreter
    flushes stdout at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _pct(xs, q):
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def metrics(gen, status: dict, t_start: float) -> dict:
    """TTFT, decode rate and per-token p50/p99 from the tokens' times; graphs from the status."""
    o, info, n = gen.procs.opts, gen.procs.info, len(gen.tokens)
    gaps = [(t1 - t0) * 1e3 for t0, t1 in zip(gen.t_tok, gen.t_tok[1:])]
    decode_s = gen.t_tok[-1] - gen.t_tok[0] if n > 1 else 0.0
    g = status.get("graphs") or {}
    return {
        "model": info.get("model", o.model), "model_dir": info.get("tokenizer_dir"),
        "backend": info.get("backend"), "device": status.get("device"),
        "dtype": status.get("dtype"), "graph_mode": o.graph_mode, "graphs": gen.graphs_note,
        "sampling": gen.req.sampling, "params": gen.req.params.to_dict(), "chat": bool(gen.chat),
        "eos_ids": sorted(gen.eos), "prompt_tokens": len(gen.prompt_ids),
        "generated_tokens": n, "stop_reason": gen.stop_reason,
        "load_s": info.get("load_s"),
        "ttft_ms": (gen.t_tok[0] - gen.t0) * 1e3 if n else None,
        "decode_tok_s": (n - 1) / decode_s if decode_s > 0 else None,
        "p50_ms": _pct(gaps, 50), "p99_ms": _pct(gaps, 99),
        "graphs_captured": g.get("captured"), "graph_misses": g.get("misses"),
        "capture_ms_p50": g.get("capture_ms_p50"), "capture_ms_p99": g.get("capture_ms_p99"),
        "total_s": time.perf_counter() - t_start, "server_status": status,
    }


def write_outputs(gen, status: dict, text: str | None, out_dir, run_name: str | None, t_start: float,
                  quiet: bool) -> None:
    """The files of one generation, then the summary. text None: the streamed pieces (the
    client did not detokenize the whole answer, e.g. after an interrupt)."""
    o = gen.procs.opts
    m = metrics(gen, status, t_start)
    m["server_status"] = {k: v for k, v in status.items() if k != "trace_events"}
    text = text if text is not None else "".join(gen.pieces)
    name = run_name or f"{o.model.replace('/', '_').replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}_tokens.txt").write_text(" ".join(map(str, gen.tokens)) + "\n")
    (out / f"{name}_text.txt").write_text(text)
    (out / f"{name}_metrics.json").write_text(json.dumps(m, indent=2, default=str) + "\n")
    row = {"run_name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": m["model"],
           "backend": m["backend"], "graph_mode": o.graph_mode, "sampling": gen.req.sampling,
           "prompt_tokens": m["prompt_tokens"], "new_tokens": m["generated_tokens"],
           "ttft_ms": m["ttft_ms"], "decode_tok_s": m["decode_tok_s"], "p50_ms": m["p50_ms"],
           "p99_ms": m["p99_ms"], "graphs_captured": m["graphs_captured"],
           "graph_misses": m["graph_misses"], "stop_reason": m["stop_reason"]}
    csv_path = out / "generate.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)
    written = [f"{name}_tokens.txt", f"{name}_text.txt", f"{name}_metrics.json", "generate.csv"]
    if o.trace:
        written += write_trace(out / f"{name}_trace", gen.procs.events + status.get("trace_events", []))
    summary(m, out, written, quiet)


def summary(m: dict, out: Path, written: list[str], quiet: bool) -> None:
    f = lambda v, fmt: "n/a" if v is None else format(v, fmt)  # noqa: E731
    lines = [
        "",
        f"--- case4: {m['model']} | {m['backend']} backend on {m['device']}, {m['dtype']} | graphs: {m['graphs']}",
        f"prompt {m['prompt_tokens']} tokens, generated {m['generated_tokens']} (stop: {m['stop_reason']}), "
        f"sampling {m['sampling']}",
        f"TTFT {f(m['ttft_ms'], '.1f')} ms | decode {f(m['decode_tok_s'], '.1f')} tok/s | "
        f"per token p50 {f(m['p50_ms'], '.2f')} ms, p99 {f(m['p99_ms'], '.2f')} ms",
    ]
    if m["graphs_captured"] is not None:
        lines.append(f"graphs captured {m['graphs_captured']}, misses {m['graph_misses']}, capture ms "
                     f"p50 {f(m['capture_ms_p50'], '.2f')} p99 {f(m['capture_ms_p99'], '.2f')}")
    lines.append(f"outputs in {out}/: {', '.join(written)}")
    if not quiet:
        try:
            print(flush=True)
        except BrokenPipeError:
            silence_stdout()
    print("\n".join(lines), file=sys.stderr, flush=True)
