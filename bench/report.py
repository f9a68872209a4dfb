"""Report tooling of bench/decode.py: the JSON, the markdown table, the PNG bar chart, and the
compact terminal table. Can also regenerate .md and .png from a results JSON:

    python bench/report.py bench/results/nvidia-h100-80gb-hbm3-20261126.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import floors  # noqa: E402

SMALL_SHAPES = ("tiny", "tiny-mha", "tiny-partial", "smollm2-135m")
QUANT_COLORS = {"None": "#1f77b4", "int8": "#2ca02c", "int4": "#d62728"}   # the PNG: fp16 / int8 / int4


def shape_groups(rows: list[dict]) -> list[tuple]:
    """(shape, dtype) of the decode rows, in first-seen order."""
    groups = []
    for r in rows:
        k = (r.get("shape"), r.get("dtype"))
        if r.get("system") not in ("copy", "gemm", "case4/prefill") and k not in groups:
            groups.append(k)
    return groups

def _f(x, fmt="{:.2f}", none="–"):
    if x is None:
        return none
    try:
        return fmt.format(x)
    except (TypeError, ValueError):
        return str(x)


def status_of(row: dict) -> str:
    if row.get("error"):
        return "ERROR"
    if row.get("skipped"):
        return "skipped"
    return "ok"


def compact_line(row: dict) -> str:
    sysname = row.get("system") or "?"
    if sysname == "gemm" and not row.get("error") and not row.get("skipped"):
        return f"  gemm  {_f(row.get('gemm_TFLOPs'), '{:.1f}')} TFLOP/s  (n={row.get('gemm_n')}, {row.get('dtype')}, rel err {row.get('rel_err')})"
    if sysname == "copy" and not row.get("error") and not row.get("skipped"):
        return f"  copy  {_f(row.get('copy_GBps'), '{:.1f}')} GB/s  ({_f(row.get('copy_bytes'), '{:,}')} B, median {row.get('repeats')})"
    where = f"{row.get('shape')}:{row.get('dtype')}{':' + row['quant'] if row.get('quant') else ''} p{row.get('prompt')}"
    if row.get("error"):
        return f"  {sysname:<22} {where:<28} ERROR {row['error'][:160]}"
    if row.get("skipped"):
        return f"  {sysname:<22} {where:<28} skipped ({row['skipped']})"
    parts = []
    if row.get("tok_s") is not None:
        parts.append(f"{row['tok_s']:>9.1f} tok/s  {row['ms_per_token']:.3f} ms/tok")
    if row.get("p50_ms") is not None:
        parts.append(f"p50 {row['p50_ms']:.3f} p99 {row['p99_ms']:.3f}")
    if row.get("ttft_ms") is not None:
        parts.append(f"TTFT {row['ttft_ms']:.2f} ms")
    if row.get("bw_fraction") is not None:
        parts.append(f"bw {row['bw_fraction']:.3f}")
    if row.get("capture_ms_per_graph") is not None:
        parts.append(f"capture {row['capture_ms_per_graph']:.3f} ms/graph")
    return f"  {sysname:<22} {where:<28} " + "  ".join(parts)


def compact_table(meta: dict, rows: list[dict]) -> str:
    cg = meta.get("copy_GBps")
    head = (f"Case4 decode bench — {meta.get('gpu')} — torch {meta.get('torch')} — "
            f"copy {_f(cg, '{:.1f}')} GB/s")
    hdr = f"{'system':<22} {'shape':<22} {'prompt':>6} {'tok/s':>9} {'ms/tok':>8} {'p50':>7} {'p99':>7} {'TTFT':>8} {'bw':>6}  note"
    lines = [head, hdr, "-" * len(hdr)]
    for r in rows:
        if r.get("system") in ("copy", "gemm"):
            continue
        note = ""
        if r.get("error"):
            note = "ERROR " + r["error"][:70]
        elif r.get("skipped"):
            note = "skipped: " + str(r["skipped"])[:70]
        elif r.get("capture_ms_per_graph") is not None:
            note = f"capture {r['capture_ms_per_graph']:.3f} ms/graph"
        q = ":" + r["quant"] if r.get("quant") else ""
        lines.append(f"{r.get('system', '?'):<22} {str(r.get('shape')) + ':' + str(r.get('dtype')) + q:<22} "
                     f"{_f(r.get('prompt'), '{}'):>6} {_f(r.get('tok_s'), '{:.1f}'):>9} "
                     f"{_f(r.get('ms_per_token'), '{:.3f}'):>8} {_f(r.get('p50_ms'), '{:.3f}'):>7} "
                     f"{_f(r.get('p99_ms'), '{:.3f}'):>7} {_f(r.get('ttft_ms'), '{:.2f}'):>8} "
                     f"{_f(r.get('bw_fraction'), '{:.3f}'):>6}  {note}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- targets (issue 6)

def _find(rows, system, shape, dtype, prompt=None, quant=None):
    """The first ok row of system/shape/dtype[/prompt] with quant `quant` (None: the unquantized one)."""
    for r in rows:
        if (r.get("system") == system and r.get("shape") == shape and r.get("dtype") == dtype
                and (prompt is None or r.get("prompt") == prompt) and r.get("quant") == quant
                and status_of(r) == "ok"):
            return r
    return None


def _best_case4(rows, shape, dtype, sampling, quant=None):
    cands = [r for r in rows if str(r.get("system", "")).startswith("case4/") and str(r.get("system")).endswith(
        "/" + sampling) and r.get("shape") == shape and r.get("dtype") == dtype and r.get("tok_s")
        and r.get("quant") == quant and status_of(r) == "ok"]
    return max(cands, key=lambda r: r["tok_s"]) if cands else None


def targets(meta: dict, rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue-6 targets that the rows can decide."""
    out = []

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    s, d = "llama2-7b", "float16"
    best = _best_case4(rows, s, d, "device")
    eager = _find(rows, "hf/eager", s, d)
    static = _find(rows, "hf/static-compile", s, d)
    if best:
        bw = best.get("bw_fraction")
        out.append(("7B fp16: ≥ 0.95 of the copy-bandwidth floor",
                    f"{best['system']}: {best['tok_s']:.1f} tok/s, bw fraction {_f(bw, '{:.3f}')}",
                    verdict(None if bw is None else bw >= 0.95)))
        out.append(("7B fp16: ≥ 1.6× HF static cache + compile",
                    f"{best['tok_s'] / static['tok_s']:.2f}×" if static else "no hf/static-compile row",
                    verdict(None if not static else best["tok_s"] / static["tok_s"] >= 1.6)))
        out.append(("7B fp16: ≥ 4.5× HF eager",
                    f"{best['tok_s'] / eager['tok_s']:.2f}×" if eager else "no hf/eager row",
                    verdict(None if not eager else best["tok_s"] / eager["tok_s"] >= 4.5)))
        client = _best_case4(rows, s, d, "client")
        if client:
            ratio = client["tok_s"] / best["tok_s"]
            out.append(("7B fp16: client sampling within 5% of device sampling",
                        f"best client {client['tok_s']:.1f} vs best device {best['tok_s']:.1f} tok/s ({ratio:.3f})",
                        verdict(ratio >= 0.95)))
    sm = _best_case4([r for r in rows if r.get("system", "").split("/")[1:2] != ["none"]],
                     "smollm2-135m", "float16", "device")
    if sm:
        out.append(("SmolLM2-135M: ≥ 3,000 tok/s with graphs, device sampling",
                    f"{sm['system']}: {sm['tok_s']:.1f} tok/s", verdict(sm["tok_s"] >= 3000)))
    t512 = _find(rows, "case4/prefill", s, d, 512)
    if t512:
        out.append(("7B fp16: TTFT for a 512-token prompt ≤ 30 ms", f"{t512['ttft_ms']:.2f} ms",
                    verdict(t512["ttft_ms"] <= 30)))
    ex = _find(rows, "case4/exact/device", s, d) or _find(rows, "case4/exact/client", s, d)
    if ex and ex.get("capture_ms_per_graph") is not None:
        ratio = ex["ms_per_token"] / ex["capture_ms_per_graph"] if ex["capture_ms_per_graph"] else None
        out.append(("Exact mode: capture of one 7B graph ≥ 3× faster than its replay",
                    f"capture {ex['capture_ms_per_graph']:.3f} ms/graph vs replay {ex['ms_per_token']:.3f} ms/token"
                    + (f" ({ratio:.2f}×)" if ratio else ""), verdict(None if ratio is None else ratio >= 3)))
    return out


def _quant_of(rows, mode):
    """The label of the first ok row quantized as `mode` ('int8' per row first, then any int8 / 'int4:g128')."""
    labels = [r.get("quant") for r in rows if r.get("quant") and status_of(r) == "ok"]
    return mode if mode in labels else next((q for q in labels if q.split(":")[0] == mode), None)


def targets26(meta: dict, rows: list[dict]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 26's targets (weight-only int8/int4) that the rows can decide."""
    out = []

    def verdict(ok):
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    def bw(r):
        return f"{r['system']}: {r['tok_s']:.1f} tok/s, bw fraction {_f(r.get('bw_fraction'), '{:.3f}')}"

    s, d = "llama2-7b", "float16"
    fp16 = _best_case4(rows, s, d, "device")
    q8 = _quant_of([r for r in rows if r.get("shape") == s], "int8")
    b8 = _best_case4(rows, s, d, "device", q8) if q8 else None
    if b8:
        out.append((f"7B {q8}: ≥ 0.90 of the floor of its own bytes", bw(b8),
                    verdict(None if b8.get("bw_fraction") is None else b8["bw_fraction"] >= 0.90)))
        out.append((f"7B {q8}: ≥ 1.8× the fp16 row", f"{b8['tok_s'] / fp16['tok_s']:.2f}× ({fp16['system']} "
                    f"{fp16['tok_s']:.1f} tok/s)" if fp16 else "no fp16 row",
                    verdict(None if not fp16 else b8["tok_s"] / fp16["tok_s"] >= 1.8)))
        peer = _find(rows, "torch/int8-compile", s, d, quant=q8)
        if peer:
            out.append((f"7B {q8}: vs torch/int8-compile (no target; for scale)",
                        f"{b8['tok_s'] / peer['tok_s']:.2f}× ({peer['tok_s']:.1f} tok/s)", "n/a"))
    b4 = _best_case4(rows, s, d, "device", "int4:g128")
    if b4:
        out.append(("7B int4:g128: ≥ 0.80 of its floor", bw(b4),
                    verdict(None if b4.get("bw_fraction") is None else b4["bw_fraction"] >= 0.80)))
        peer = _find(rows, "torch/int4-tinygemm", s, d, quant="int4:g128")
        out.append(("7B int4:g128: ≥ 2.5× torch/int4-tinygemm",
                    f"{b4['tok_s'] / peer['tok_s']:.2f}× ({peer['tok_s']:.1f} tok/s)" if peer
                    else "no torch/int4-tinygemm row", verdict(None if not peer else b4["tok_s"] / peer["tok_s"] >= 2.5)))
    big = _best_case4(rows, "llama2-70b", "float16", "device", "int4:g128")
    if big:
        out.append(("70B int4:g128 on one card: ≥ 0.80 of its floor",
                    bw(big) + f", resident weights {big.get('resident_weight_bytes', 0) / 1e9:.2f} GB",
                    verdict(None if big.get("bw_fraction") is None else big["bw_fraction"] >= 0.80)))
    else:
        r70 = next((r for r in rows if r.get("shape") == "llama2-70b" and status_of(r) != "ok"), None)
        if r70:
            out.append(("70B int4:g128 on one card: ≥ 0.80 of its floor",
                        str(r70.get("skipped") or r70.get("error"))[:200].replace("|", "/"), "n/a"))
    t16 = _find(rows, "case4/prefill", s, d, 512)
    t4 = _find(rows, "case4/prefill", s, d, 512, "int4:g128")
    if t4:
        ratio = t4["ttft_ms"] / t16["ttft_ms"] if t16 else None
        out.append(("7B int4:g128: TTFT for a 512-token prompt ≤ 1.3× fp16's",
                    f"{t4['ttft_ms']:.2f} ms vs {t16['ttft_ms']:.2f} ms ({ratio:.2f}×)" if t16 else "no fp16 TTFT row",
                    verdict(None if ratio is None else ratio <= 1.3)))
    own = _best_case4(rows, "smollm2", d, "device", "gguf")
    deq = _best_case4(rows, "smollm2", d, "device")
    if own or deq:  # --models smollm2: the built-in GGUF on its own blocks and dequantized, best device row of each
        out.append(("SmolLM2 GGUF Q4_1 on the GPU faster than its fp16 row",
                    f"{own['system']} {own['tok_s']:.1f} tok/s vs {deq['system']} {deq['tok_s']:.1f} tok/s "
                    f"({own['tok_s'] / deq['tok_s']:.2f}×)" if own and deq else "one of the two rows is missing",
                    verdict(None if not (own and deq) else own["tok_s"] > deq["tok_s"])))
    elif out:
        out.append(("SmolLM2 GGUF Q4_1 on the GPU faster than its fp16 row",
                    "not measured here (no --models smollm2 rows)", "n/a"))
    return out


# ----------------------------------------------------------------------------- markdown

def markdown(meta: dict, rows: list[dict]) -> str:
    cg = meta.get("copy_GBps")
    L = [f"# Case4 decode benchmark — {meta.get('gpu')} — {meta.get('date')}", ""]
    L.append(f"torch {meta.get('torch')}, CUDA {meta.get('cuda')}, transformers {meta.get('transformers')}; "
             f"device `{meta.get('device')}`; status: {meta.get('status')}; elapsed {meta.get('elapsed_s')} s.")
    L.append("")
    L.append(f"**Copy ceiling** (device-to-device, (read+write bytes)/time, median): **{_f(cg, '{:.1f}')} GB/s** "
             f"(DESIGN reference on an H100 80GB HBM3: {floors.REFERENCE_COPY_GBPS:g} GB/s).")
    L.append("")
    L.append(f"**Matmul ceiling** (fp16 n³, median): {_f(meta.get('gemm_TFLOPs'), '{:.1f}')} TFLOP/s.")
    L.append("")
    bad = [r for r in rows if r.get("system") in ("copy", "gemm") and (r.get("error") or r.get("skipped"))]
    for r in bad:
        L.append(f"- {r['system']}: " + (("**ERROR** " + r["error"][:300]) if r.get("error") else "skipped: " + str(r["skipped"])))
    if bad:
        L.append("")
    L.append("Batch 1. `bw` = (weight bytes + KV bytes read per token) / (ms per token) / copy rate; "
             "`floor` = those bytes at the copy rate. Device-sampling rows have no per-token p50/p99 "
             "(all steps run in one call). See bench/README.md for what each row measures.")
    L.append("")
    groups = shape_groups(rows)
    for shape, dtype in groups:
        grp = [r for r in rows if (r.get("shape"), r.get("dtype")) == (shape, dtype)
               and r.get("system") not in ("copy", "gemm", "case4/prefill")]
        fl = (meta.get("floors") or {}).get(f"{shape}:{dtype}", {})
        head = f"## {shape} {dtype}"
        if fl.get("bytes_per_token") and cg:
            fms = floors.floor_ms(fl["bytes_per_token"], cg)
            head += (f" — {fl['bytes_per_token'] / 1e9:.4f} GB/token → floor {fms:.3f} ms/token "
                     f"({1e3 / fms:,.0f} tok/s) at {cg:.0f} GB/s")
        L += [head, ""]
        eager = _find(rows, "hf/eager", shape, dtype)
        static = _find(rows, "hf/static-compile", shape, dtype)
        L.append("| system | quant | prompt | steps | tok/s | ms/token | p50 ms | p99 ms | TTFT ms | bw fraction "
                 "| floor ms/token | × HF eager | × HF static | capture ms/graph | note |")
        L.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in grp:
            note = ""
            if r.get("error"):
                note = "**ERROR** " + r["error"].replace("|", "/").replace("\n", " ")[:200]
            elif r.get("skipped"):
                note = "skipped: " + str(r["skipped"]).replace("|", "/")
            else:
                bits = []
                if r.get("misses_during_row") is not None:
                    bits.append(f"misses {r['misses_during_row']}")
                if r.get("compiled") is False:
                    bits.append("NOT compiled")
                if r.get("note"):
                    bits.append(str(r["note"]).replace("|", "/"))
                note = "; ".join(bits)
            xe = r["tok_s"] / eager["tok_s"] if r.get("tok_s") and eager else None
            xs = r["tok_s"] / static["tok_s"] if r.get("tok_s") and static else None
            if r.get("resident_weight_bytes"):
                note = (note + "; " if note else "") + f"resident weights {r['resident_weight_bytes'] / 1e9:.2f} GB"
            L.append(f"| {r.get('system')} | {r.get('quant') or 'none'} "
                     f"| {_f(r.get('prompt'), '{}')} | {_f(r.get('steps'), '{}')} "
                     f"| {_f(r.get('tok_s'), '{:.1f}')} | {_f(r.get('ms_per_token'), '{:.3f}')} "
                     f"| {_f(r.get('p50_ms'), '{:.3f}')} | {_f(r.get('p99_ms'), '{:.3f}')} "
                     f"| {_f(r.get('ttft_ms'), '{:.2f}')} | {_f(r.get('bw_fraction'), '{:.3f}')} "
                     f"| {_f(r.get('floor_ms_per_token'), '{:.3f}')} | {_f(xe, '{:.2f}')} | {_f(xs, '{:.2f}')} | {_f(r.get('capture_ms_per_graph'), '{:.3f}')} "
                     f"| {note} |")
        L.append("")
        for q in dict.fromkeys(r.get("quant") for r in grp):   # the same weights: the same greedy tokens
            toks = {r["system"]: r.get("first_tokens") for r in grp if r.get("quant") == q
                    and str(r.get("system", "")).startswith("case4/") and r.get("first_tokens")}
            if len(toks) > 1:
                ref = next(iter(toks.values()))
                same = [k for k, v in toks.items() if v[:min(len(v), len(ref))] == ref[:min(len(v), len(ref))]]
                diff = [k for k in toks if k not in same]
                L.append(f"Greedy tokens (first 16) agree across {len(same)} Case4 rows"
                         + (f" ({q})" if q else "") + (f"; differ: {', '.join(diff)}" if diff else "") + ".")
                L.append("")
    pre = [r for r in rows if r.get("system") == "case4/prefill"]
    if pre:
        L += ["## TTFT (case4/prefill: be.prefill + last logits to host)", "",
              "| shape | dtype | quant | prompt | TTFT ms (median) | min ms | note |",
              "| --- | --- | --- | ---: | ---: | ---: | --- |"]
        for r in pre:
            note = ("**ERROR** " + r["error"][:200]) if r.get("error") else (
                ("skipped: " + str(r["skipped"])) if r.get("skipped") else "")
            L.append(f"| {r.get('shape')} | {r.get('dtype')} | {r.get('quant') or '–'} | {r.get('prompt')} "
                     f"| {_f(r.get('ttft_ms'), '{:.2f}')} "
                     f"| {_f(r.get('ttft_min_ms'), '{:.2f}')} | {note.replace('|', '/')} |")
        L.append("")
    t = targets(meta, rows)
    if t:
        L += ["## Issue-6 targets in this run", "", "| target | measured | verdict |", "| --- | --- | --- |"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in t]
        L.append("")
    t = targets26(meta, rows)
    if t:
        L += ["## Issue-26 targets in this run (weight-only int8 / int4)", "",
              "| target | measured | verdict |", "| --- | --- | --- |"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in t]
        L.append("")
    return "\n".join(L)


# ----------------------------------------------------------------------------- PNG

def png(meta: dict, rows: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.patches  # noqa: F401
        import matplotlib.pyplot as plt
    except Exception as e:
        print(f"bench: no PNG ({e!r})", file=sys.stderr)
        return None
    groups = shape_groups(rows)
    if not groups:
        return None
    cg = meta.get("copy_GBps")
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 1.2 + 0.42 * max(
        len([r for r in rows if (r.get("shape"), r.get("dtype")) == g and r.get("system") != "case4/prefill"])
        for g in groups) * len(groups) + 0.6 * len(groups)), squeeze=False)
    for ax, (shape, dtype) in zip(axes[:, 0], groups):
        grp = [r for r in rows if (r.get("shape"), r.get("dtype")) == (shape, dtype)
               and r.get("system") not in ("copy", "gemm", "case4/prefill")]
        # one line per system, one bar per weight format on it: fp16 (the shape's dtype), int8, int4 side by side
        names = list(dict.fromkeys(r["system"] for r in grp))
        quants = list(dict.fromkeys(r.get("quant") for r in grp))
        h = 0.8 / max(1, len(quants))
        vmax = max([r.get("tok_s") or 0.0 for r in grp] + [1.0])
        for j, q in enumerate(quants):
            color = QUANT_COLORS.get(str(q).split(":")[0], "#9467bd")
            for r in (r for r in grp if r.get("quant") == q):
                y = names.index(r["system"]) - 0.4 + h * (j + 0.5)
                hatch = None if str(r["system"]).startswith("case4/") and "reference" not in r["system"] else "//"
                ax.barh(y, r.get("tok_s") or 0.0, height=h, color=color, hatch=hatch, edgecolor="white", lw=0)
                label = f"{r['tok_s']:.1f}" if r.get("tok_s") else status_of(r)
                ax.text((r.get("tok_s") or 0) + vmax * 0.01, y, label, va="center", fontsize=6)
        ax.set_yticks(list(range(len(names))))
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        handles = [matplotlib.patches.Patch(color=QUANT_COLORS.get(str(q).split(":")[0], "#9467bd"),
                                            label=q or dtype) for q in quants]
        title = f"{shape} {dtype} activations, batch 1, prompt {grp[0].get('prompt') if grp else ''}"
        fl = (meta.get("floors") or {}).get(f"{shape}:{dtype}", {})
        floor_of = {None: fl.get("bytes_per_token")}
        for q in quants:   # each format's floor: the bytes its rows read, from the first row that has them
            if q is not None:
                floor_of[q] = next((r["bytes_per_token"] for r in grp if r.get("quant") == q
                                    and str(r.get("system", "")).startswith("case4/") and r.get("bytes_per_token")),
                                   None)
        if cg:
            for q in quants:
                if floor_of.get(q):
                    ftoks = 1e3 / floors.floor_ms(floor_of[q], cg)
                    ax.axvline(ftoks, color=QUANT_COLORS.get(str(q).split(":")[0], "k"), ls="--", lw=1)
                    ax.text(ftoks, 1.0, f" floor {q or dtype} {ftoks:,.0f}", fontsize=6, va="bottom",
                            transform=ax.get_xaxis_transform())   # x in data, y on the axes' top edge
                    vmax = max(vmax, ftoks)
        ax.set_xlim(0, vmax * 1.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens / s (hatched: other tools)", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if len(quants) > 1:
            ax.legend(handles=handles, fontsize=7, loc="lower right")
    fig.suptitle(f"Case4 decode — {meta.get('gpu')} — {meta.get('date')} — copy {_f(cg, '{:.0f}')} GB/s",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(base: Path, meta: dict, rows: list[dict], png_too: bool = True, png: bool | None = None):
    """Write base.json and base.md (and base.png when asked); returns the paths written."""
    if png is not None:
        png_too = png
    base = Path(base)
    doc = dict(meta)
    doc["rows"] = rows
    jp, mp, pp = base.with_suffix(".json"), base.with_suffix(".md"), base.with_suffix(".png")
    tmp = jp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    tmp.replace(jp)
    mp.write_text(markdown(meta, rows))
    paths = [jp, mp]
    if png_too:
        try:
            if _png(meta, rows, pp):
                paths.append(pp)
        except Exception as e:
            print(f"bench: PNG failed: {e!r}", file=sys.stderr)
    return paths


_png = png


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for a in argv:
        p = Path(a)
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            print(f"report: error: {a}: {e}", file=sys.stderr)
            return 2
        rows = doc.pop("rows", [])
        paths = write_outputs(p.with_suffix(""), doc, rows)
        print(compact_table(doc, rows))
        print("wrote", ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
