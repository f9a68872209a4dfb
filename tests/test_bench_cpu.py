"""CPU checks of the decode benchmark (bench/decode.py) and its byte counts.

The benchmark itself runs on a GPU (tests/run_gpu.sh); here it runs end to end on the
`tiny` synthetic shape with the reference backend and HF transformers, and the JSON it
writes is checked against the schema that bench/README.md documents.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import floors  # noqa: E402

TOP_KEYS = {"gpu", "date", "torch", "copy_GBps", "rows"}
ROW_KEYS = {"system", "shape", "dtype", "prompt", "tok_s", "ms_per_token", "p50_ms", "p99_ms", "ttft_ms",
            "bw_fraction", "bytes_per_token"}
FAST = ["--device", "cpu", "--shapes", "tiny", "--steps", "4", "--repeats", "1", "--warmup-steps", "2",
        "--ttft-prompts", "16", "--hf-steps", "3", "--hf-repeats", "1", "--reference-steps", "3",
        "--cpu-copy-mib", "8", "--copy-repeats", "3", "--no-hf-latency"]


def run_bench(out: Path, *extra, env=None, timeout=600):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--out", str(out), *FAST, *extra],
                       capture_output=True, text=True, timeout=timeout, env=e, cwd=str(ROOT))
    return p


def load_result(out: Path) -> dict:
    js = sorted(out.glob("*.json"))
    assert len(js) == 1, js
    base = js[0].with_suffix("")
    assert base.name.startswith("cpu-") and base.name[-8:].isdigit()   # <gpu-slug>-<yyyymmdd>
    assert base.with_suffix(".md").exists()
    return json.loads(js[0].read_text())


def check_schema(doc: dict) -> None:
    assert TOP_KEYS <= set(doc), set(doc)
    assert isinstance(doc["copy_GBps"], float) and doc["copy_GBps"] > 0
    assert [r["system"] for r in doc["rows"][:2]] == ["copy", "gemm"]
    assert doc["gemm_TFLOPs"] > 0 and doc["rows"][1]["rel_err"] < 1e-3
    for r in doc["rows"][2:]:
        assert ROW_KEYS <= set(r), (r["system"], ROW_KEYS - set(r))
        assert "error" not in r, (r["system"], r.get("error"), r.get("traceback"))
        if r.get("skipped"):
            continue
        if r["system"] == "case4/prefill":
            assert r["ttft_ms"] > 0
            continue
        assert r["tok_s"] > 0 and r["ms_per_token"] > 0
        assert abs(r["tok_s"] * r["ms_per_token"] - 1000) < 1.0
        assert r["bytes_per_token"] > 0 and 0 < r["bw_fraction"]
        assert r["ttft_ms"] > 0


# ----------------------------------------------------------------------------- byte counts

def test_floors_match_design_reference():
    cfg = floors.shape_config("llama2-7b")
    # every parameter of Llama-2-7B at fp16: the DESIGN's 13.48 GB and 4.48 ms at 3007 GB/s
    assert abs(floors.all_params_bytes(cfg, "float16") / 1e9 - 13.4768) < 1e-3
    assert abs(floors.floor_ms(floors.all_params_bytes(cfg, "float16"), 3007) - 4.48) < 0.01
    # what one step reads: all but 31999 embedding rows
    w = floors.weight_bytes_per_token(cfg, "float16")
    assert floors.all_params_bytes(cfg, "float16") - w == (32000 - 1) * 4096 * 2
    assert floors.kv_bytes_per_position(cfg, "float16") == 32 * 2 * 32 * 128 * 2
    sm = floors.shape_config("smollm2-135m")   # tied: lm_head is the embedding
    assert floors.weight_bytes_per_token(sm, "float16") - floors.all_params_bytes(sm, "float16") == 576 * 2
    assert "| llama2-7b | float16 |" in floors.floors_markdown()


@pytest.mark.parametrize("shape", ["tiny", "smollm2-135m", "llama2-7b"])
def test_hf_config_has_the_same_parameters(shape):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaForCausalLM
    from rows_hf import hf_config_from
    cfg = floors.shape_config(shape)
    with torch.device("meta"):
        m = LlamaForCausalLM(hf_config_from(cfg))
    n = sum(p.numel() for p in m.parameters())
    assert n * 2 == floors.all_params_bytes(cfg, "float16")
    hc = m.config
    assert (hc.num_key_value_heads, hc.head_dim, hc.tie_word_embeddings) == (
        cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings)


def test_plan_filters_and_order():
    import decode
    from common import gpu_slug
    from plan import build_plan
    a = decode.parse_args(["--device", "cuda", "--systems", "case4/*/device,hf/eager", "--shapes", "smollm2-135m",
                           "--quant", "none", "--big-quant", "", "--models", ""])
    plan = build_plan(a)
    assert [p["system"] for p in plan] == ["case4/exact/device", "case4/dynamic/device", "case4/none/device",
                                           "hf/eager"]
    a = decode.parse_args(["--device", "cuda", "--models", ""])
    shapes = [s for s in dict.fromkeys((p["shape"], p["dtype"]) for p in build_plan(a))]
    assert shapes == [("llama2-7b", "float16"), ("llama2-70b", "float16"), ("smollm2-135m", "float16"),
                      ("llama2-7b", "bfloat16")]   # 70B: int4 only (--big-quant), right after the 7B rows
    from plan import builtin_gguf_installed
    a = decode.parse_args(["--device", "cuda"])  # the built-in GGUF's rows where it is installed, before the oracle
    assert a.models == ("smollm2" if builtin_gguf_installed() else "")
    if a.models:
        plan = build_plan(a)
        real = [i for i, p in enumerate(plan) if p.get("model") == "smollm2"]
        assert {(plan[i]["system"], plan[i].get("quant")) for i in real} >= {("case4/dynamic/device", "gguf"),
                                                                             ("case4/dynamic/device", None)}
        assert real[-1] < next(i for i, p in enumerate(plan) if p["system"] == "case4/reference")
    q = decode.parse_args(["--device", "cuda", "--quick"])
    assert q.steps == 64 and q.repeats == 1 and q.ttft_prompt_list == [512]
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


# ----------------------------------------------------------------------------- end to end

def test_bench_cpu_end_to_end(tmp_path):
    """The default CPU run: copy, HF eager and the reference rows measured; CUDA-only rows skipped."""
    p = run_bench(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = load_result(tmp_path)
    check_schema(doc)
    by = {r["system"]: r for r in doc["rows"]}
    assert by["case4/reference"]["tok_s"] > 0 and by["hf/eager"]["tok_s"] > 0
    assert "CUDA" in by["case4/exact/device"]["skipped"]
    assert by["hf/static-compile"]["skipped"]
    assert (tmp_path / (sorted(tmp_path.glob("*.json"))[0].stem + ".png")).exists()
    assert "case4/reference" in p.stdout and "tok/s" in p.stdout   # the compact table


def test_bench_cpu_case4_rows_and_compile(tmp_path):
    """Every case4 decode row's code path (on the reference backend) and the static-cache HF row
    (compiled with the 'eager' dynamo backend, which needs no C++ compiler)."""
    p = run_bench(tmp_path, "--case4-backend", "reference", "--hf-compile-cpu", "--hf-compile-backend", "eager",
                  "--systems", "case4/*,hf/static-compile")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = load_result(tmp_path)
    check_schema(doc)
    systems = [r["system"] for r in doc["rows"]]
    for s in ("case4/exact/device", "case4/exact/client", "case4/dynamic/device", "case4/dynamic/client",
              "case4/none/device", "case4/none/client", "case4/prefill", "hf/static-compile", "case4/reference"):
        assert s in systems
    assert "hf/eager" not in systems
    rows = {r["system"]: r for r in doc["rows"]}
    assert not rows["hf/static-compile"].get("skipped")
    toks = [rows[s]["first_tokens"] for s in systems if s.startswith("case4/") and s != "case4/prefill"]
    assert all(t[:3] == toks[0][:3] for t in toks)   # greedy: the same tokens on every path


def test_bench_budget_and_lost_context(tmp_path):
    """Rows after the budget are recorded as skipped; a lost (CUDA) context moves the rest into
    a child process, and the failed row carries its error."""
    p = run_bench(tmp_path, "--case4-backend", "reference", "--systems", "case4/none/*,case4/reference",
                  env={"CASE4_BENCH_TEST_DEAD": "case4/none/device"})
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["system"]: r for r in load_result(tmp_path)["rows"]}
    assert "fake sticky" in rows["case4/none/device"]["error"]
    assert rows["case4/none/client"]["tok_s"] > 0 and rows["case4/reference"]["tok_s"] > 0

    out2 = tmp_path / "budget"
    p = run_bench(out2, "--budget-s", "0.001")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(sorted(out2.glob("*.json"))[0].read_text())
    assert all(r.get("skipped") for r in doc["rows"]), doc["rows"]


# ----------------------------------------------------------------------------- quantized rows (issue 26)

def _independent_weight_bytes(mode: str, group, prompt: int, steps: int):
    """What a quantized tiny step reads, summed from the built QuantLinear tensors themselves (not
    ModelWeights.quant_bytes()) plus the norms and one embedding row in fp32, and the mean KV bytes."""
    from server.model.quant import QuantLinear
    from server.model.resolve import resolve_model
    m = resolve_model("synthetic:tiny", dtype="float32", device="cpu", seed=0, quant=mode, group=group)
    w, cfg = m.weights, m.cfg
    mats = [getattr(lw, k) for lw in w.layers for k in ("w_qkv", "w_o", "w_gu", "w_down")] + [w.lm_head]
    assert all(isinstance(x, QuantLinear) and x.mode == mode for x in mats)
    qbytes = sum(t.numel() * t.element_size() for x in mats for t in (x.q, x.scale, x.minv) if t is not None)
    H, L = cfg.hidden_size, cfg.num_layers
    weights = qbytes + ((2 * L + 1) * H + H) * 4
    kv_pos = L * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    kv = kv_pos * ((prompt + prompt + steps - 1) / 2 + 2)
    return weights, weights + kv, w.nbytes()


def test_bench_cpu_quant_rows(tmp_path):
    """--quant int8,int4:32 on CPU: quantized reference-backend rows with a quant field whose bytes per token
    are those of the quantized tensors (checked against a sum over the QuantLinear tensors), and the torch
    peers as skipped rows with their reason."""
    p = run_bench(tmp_path, "--quant", "int8,int4:32", "--quant-ttft-prompt", "16", "--case4-backend", "reference",
                  "--systems", "case4/none/*,case4/prefill,case4/reference,torch/*")
    assert p.returncode == 0, p.stderr[-3000:]
    doc = load_result(tmp_path)
    check_schema(doc)
    rows = doc["rows"][2:]
    fp = {r["system"]: r for r in rows if r["quant"] is None}
    for label, mode, group in (("int8", "int8", None), ("int4:g32", "int4", 32)):
        q = {r["system"]: r for r in rows if r["quant"] == label}
        assert {"case4/none/device", "case4/none/client", "case4/prefill", "case4/reference"} <= set(q), q.keys()
        w, b, resident = _independent_weight_bytes(mode, group, 32, 4)
        for s in ("case4/none/device", "case4/none/client"):
            r = q[s]
            assert r["quant_mode"] == mode and r["tok_s"] > 0
            assert r["weight_bytes_per_token"] == w and r["bytes_per_token"] == int(b)
            assert r["bytes_per_token"] < fp[s]["bytes_per_token"]
            want = b / (r["ms_per_token"] / 1e3) / 1e9 / doc["copy_GBps"]
            assert abs(r["bw_fraction"] / want - 1) < 0.02   # copy_GBps and ms_per_token are rounded
            assert r["resident_weight_bytes"] == resident
        assert doc["floors"][f"tiny:float32:{label}"]["weight_bytes_per_token"] == w   # from the shapes alone
        assert q["case4/prefill"]["ttft_ms"] > 0
        peer = q["torch/int8-compile" if mode == "int8" else "torch/int4-tinygemm"]
        assert "GPU only" in peer["skipped"] and peer["tok_s"] is None
    md = sorted(tmp_path.glob("*.md"))[0].read_text()
    assert "| case4/none/device | int4:g32 |" in md and "| case4/none/device | none |" in md


def test_quant_plan_and_bad_input():
    import decode
    from plan import build_plan
    a = decode.parse_args(["--device", "cuda"])
    assert [q["quant"] for q in a.quant_list] == ["int8", "int4:g128"] and a.budget_s == 480
    plan = build_plan(a)
    key = [(p["system"], p["shape"], p["dtype"], p.get("quant"), p["prompt"]) for p in plan]
    assert len(key) == len(set(key))
    assert ("case4/exact/device", "llama2-7b", "float16", "int4:g128", 32) in key
    assert ("case4/prefill", "llama2-7b", "float16", "int4:g128", 512) in key
    assert ("case4/dynamic/client", "smollm2-135m", "float16", "int8", 32) in key
    assert not any(p.get("quant") and p["dtype"] == "bfloat16" for p in plan)   # quantized once per shape
    peers = [(p["system"], p["shape"]) for p in plan if p["system"].startswith("torch/")]
    assert peers == [("torch/int8-compile", "llama2-7b"), ("torch/int4-tinygemm", "llama2-7b")]
    big = [i for i, p in enumerate(plan) if p["shape"] == "llama2-70b"]
    assert [plan[i]["system"] for i in big] == ["case4/exact/device", "case4/dynamic/device"]
    assert big[0] < next(i for i, p in enumerate(plan) if p["shape"] == "smollm2-135m")   # right after 7B
    assert decode.parse_args(["--device", "cpu"]).quant_list == []
    for bad in (["--quant", "int3"], ["--quant", "int4:100"]):
        p = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--device", "cpu", *bad],
                           capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        assert p.returncode == 2 and "--quant" in p.stderr and "Traceback" not in p.stderr


def test_issue26_verdicts():
    """The issue-26 verdicts from rows built by hand (ratios and fractions on both sides of each bar)."""
    import report

    def row(system, tok_s, quant=None, shape="llama2-7b", bw=None, **kw):
        return dict(system=system, shape=shape, dtype="float16", quant=quant, prompt=32, tok_s=tok_s,
                    ms_per_token=1e3 / tok_s if tok_s else None, bw_fraction=bw, **kw)
    rows = [row("case4/exact/device", 200.0, bw=0.97), row("case4/exact/device", 380.0, "int8", bw=0.91),
            row("case4/dynamic/device", 500.0, "int4:g128", bw=0.70), row("torch/int4-tinygemm", 180.0, "int4:g128"),
            row("case4/exact/device", 72.0, "int4:g128", "llama2-70b", 0.85, resident_weight_bytes=36.5e9),
            dict(row("case4/prefill", None), prompt=512, ttft_ms=20.0),
            dict(row("case4/prefill", None, "int4:g128"), prompt=512, ttft_ms=27.0)]
    got = [verdict for _, _, verdict in report.targets26({}, rows)]
    assert got == ["PASS", "PASS", "FAIL", "PASS", "PASS", "FAIL", "n/a"], report.targets26({}, rows)
    # --models smollm2: the GGUF's own blocks against the same weights dequantized (best device row of each)
    for own, deq, want in ((900.0, 800.0, "PASS"), (700.0, 800.0, "FAIL")):
        more = [row("case4/dynamic/device", own, "gguf", "smollm2"), row("case4/exact/device", deq - 50, None, "smollm2"),
                row("case4/dynamic/device", deq, None, "smollm2"), row("case4/dynamic/client", 5000.0, "gguf", "smollm2")]
        (t, measured, verdict), = [x for x in report.targets26({}, rows + more) if x[0].startswith("SmolLM2")]
        assert verdict == want and f"{own:.1f} tok/s vs case4/dynamic/device {deq:.1f}" in measured, measured


def test_bench_cpu_real_gguf_rows(tmp_path):
    """--models FILE.gguf: the case4 rows and a prefill on the file's own blocks (quant 'gguf', the quantized
    matrices' bytes) and on its dequantized weights (the dense bytes), both from the same file; a path that is not
    a GGUF is bad input."""
    pytest.importorskip("gguf")
    from test_gguf import write_llama_gguf
    f = tmp_path / "mini.gguf"
    write_llama_gguf(f, {"token_embd": "Q8_0"}, tokenizer=True)
    out = tmp_path / "out"
    p = run_bench(out, "--case4-backend", "reference", "--models", str(f), "--quant-ttft-prompt", "16",
                  "--systems", "case4/none/*,case4/prefill", env={"CASE4_HOME": str(tmp_path / "home")})
    assert p.returncode == 0, p.stderr[-3000:]
    doc = load_result(out)
    check_schema(doc)
    rows = [r for r in doc["rows"] if r.get("shape") == "mini"]
    assert {(r["system"], r["quant"]) for r in rows} == {(s, q) for s in ("case4/none/device", "case4/none/client",
                                                                          "case4/prefill") for q in ("gguf", None)}
    assert all(r["model"] == str(f) and r["dtype"] == "float32" and "error" not in r for r in rows)
    own = {r["system"]: r for r in rows if r["quant"] == "gguf"}
    deq = {r["system"]: r for r in rows if r["quant"] is None}
    for s in ("case4/none/device", "case4/none/client"):
        assert own[s]["quant_mode"] == "int4" and 0 < own[s]["quant_matrix_bytes"]
        assert own[s]["bytes_per_token"] < deq[s]["bytes_per_token"] / 4  # 4-bit blocks against fp32 matrices
        assert own[s]["tok_s"] > 0 and deq[s]["tok_s"] > 0
    assert own["case4/prefill"]["ttft_ms"] > 0 and deq["case4/prefill"]["ttft_ms"] > 0
    (tmp_path / "not.gguf").write_text("no")
    for bad in (str(tmp_path / "not.gguf"), str(tmp_path)):
        r = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--device", "cpu", "--models", bad, "--skip-copy",
                            "--skip-gemm", "--systems", "case4/none/device", "--steps", "2", "--out", str(out / "bad")],
                           capture_output=True, text=True, timeout=120, cwd=str(ROOT))
        assert r.returncode == 2 and "--models" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_torch_int8_peer_math(monkeypatch):
    """The torch/int8-compile peer's linear against a float64 oracle on fresh random inputs, and its decode
    step run eagerly on CPU (torch.compile left out: the GPU row compiles it) writing the KV cache and the
    greedy token history; the int4 peer's tinygemm exists only on CUDA."""
    import torch
    import rows_torch_quant as tq
    g = torch.Generator().manual_seed(1234)
    lin = tq._Int8(48, 64, g, "cpu")
    x = torch.randn(1, 64, generator=g)
    oracle = x.double() @ (lin.w.double() * lin.s.double()[:, None]).T
    assert torch.allclose(tq._Int8.apply(x, *lin.tensors()).double(), oracle, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    m = tq.TorchQuantModel(floors.shape_config("tiny"), "torch/int8-compile", 64, 0, "cpu")
    assert tq.quant_tensor_bytes(m.mats) == sum(mm.w.numel() + 2 * mm.s.numel() for mm in m.mats)
    m.tok.fill_(7)
    for _ in range(3):
        m._step()
    assert int(m.pos) == 3 and all(0 <= t < 512 for t in m.hist[1:4].tolist())
    assert m.k[0][:, :, :3].abs().sum() > 0 and m.k[0][:, :, 3:].abs().sum() == 0
