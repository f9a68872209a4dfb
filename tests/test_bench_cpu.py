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
    a = decode.parse_args(["--device", "cuda", "--systems", "case4/*/device,hf/eager", "--shapes", "smollm2-135m"])
    plan = build_plan(a)
    assert [p["system"] for p in plan] == ["case4/exact/device", "case4/dynamic/device", "case4/none/device",
                                           "hf/eager"]
    a = decode.parse_args(["--device", "cuda"])
    shapes = [s for s in dict.fromkeys((p["shape"], p["dtype"]) for p in build_plan(a))]
    assert shapes == [("llama2-7b", "float16"), ("smollm2-135m", "float16"), ("llama2-7b", "bfloat16")]
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
