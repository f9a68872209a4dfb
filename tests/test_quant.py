"""Weight-only quantization, the Python side (issue 26): round-to-nearest at load as
server/model/quant.py defines it (checked against a float64 nearest-grid-point oracle), the
reference backend on quantized models (= the same model with the dequantized values, and = HF
transformers on those values), the pointers/bytes interface, synthetic quantized shapes with no
float copy, the 70B memory arithmetic, and the CLI's bad inputs (exit 2, one line)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from case4_errors import BadInput
from server.kv import KVArena
from server.model.config import SYNTHETIC_SHAPES, with_max_seq
from server.model.quant import QuantLinear, dequantize, empty_quant, quantize_rtn, random_quant
from server.model.weights import (arena_bytes, hf_state_dict, load_hf_folder, matrix_shapes, quant_schemes,
                                  synthetic_weights)
from server.reference import ReferenceDecoder

ROOT = Path(__file__).resolve().parent.parent


def _grid_oracle(w: torch.Tensor, ql: QuantLinear):
    """float64: every dequantized value is a point of its group's grid (the stored fp16 scale and
    minimum, integers in range), and no other grid point is nearer to w (ties allowed). Nearer by
    more than the definition's own fp32 arithmetic can tell: quantize_rtn rounds (w - m) / s computed
    in fp32, so where w lies within a few fp32 ulps of halfway between two grid points either may be
    chosen (a CI run drew one: 1.5e-8 nearer, the fp32 ulp of w there)."""
    G, n, k = ql.group, ql.n, ql.k
    s = ql.scale.double().repeat_interleave(G, 1)
    m = ql.minv.double().repeat_interleave(G, 1) if ql.minv is not None else torch.zeros_like(s)
    lo, hi = (-127, 127) if ql.mode == "int8" else (0, 15)
    d = dequantize(ql).double()
    ints = torch.where(s > 0, (d - m) / torch.where(s > 0, s, 1), 0)
    assert torch.equal(ints, ints.round()) and ints.min() >= lo and ints.max() <= hi
    best = torch.full_like(d, float("inf"))
    for i in range(lo, hi + 1):  # the nearest grid point, by brute force
        best = torch.minimum(best, (w.double() - (i * s + m)).abs())
    err = (w.double() - d).abs()
    slack = 4 * torch.finfo(torch.float32).eps * (w.double().abs() + m.abs() + max(abs(lo), hi) * s)
    assert torch.all(err <= best + slack), (err - best - slack).max()
    # scale and minimum are the fp16 roundings of the definition's fp32 values
    wg = w.float().reshape(n, k // G, G)
    if ql.mode == "int8":
        assert torch.equal(ql.scale, (wg.abs().amax(-1) / 127).half())
    else:
        assert torch.equal(ql.minv, wg.amin(-1).half())
        assert torch.equal(ql.scale, ((wg.amax(-1) - wg.amin(-1)) / 15).half())


@pytest.mark.parametrize("mode,group", [("int8", 64), ("int8", 96), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("src", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rtn_is_the_nearest_grid_point(mode, group, src):
    g = torch.Generator().manual_seed(hash((mode, group, str(src))) % 2**31)
    w = (torch.randn(24, 384, generator=g) * 0.05).to(src)
    c = 0.25 if mode == "int4" else 0.0
    w[3, :group] = c             # a constant group: scale 0 (int4: minv carries it)
    w[5, 7] = -1.5               # an outlier
    ql = quantize_rtn(w, mode, group)
    assert ql.q.dtype == (torch.int8 if mode == "int8" else torch.uint8)
    assert ql.q.shape == (24, 384 if mode == "int8" else 192) and ql.scale.shape == (24, 384 // group)
    _grid_oracle(w, ql)
    assert torch.equal(dequantize(ql)[3, :group], torch.full((group,), c)) and ql.scale[3, 0] == 0


def test_quantize_rtn_refuses_a_group_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide the input dimension 100"):
        quantize_rtn(torch.randn(4, 100), "int4", 32)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_random_quant_fills_in_place_with_the_asked_spread(mode):
    ql = empty_quant(256, 512, mode, 64)
    ptrs = (ql.q.data_ptr(), ql.scale.data_ptr())
    random_quant(ql, 0.02, torch.Generator().manual_seed(1))
    assert (ql.q.data_ptr(), ql.scale.data_ptr()) == ptrs
    w = dequantize(ql)
    assert abs(w.mean().item()) < 0.002 and 0.017 < w.std().item() < 0.023


# ---------------------------------------------------------------------------------------
# the model: schemes, arenas, pointers

def test_schemes_defaults_and_errors():
    cfg = SYNTHETIC_SHAPES["smollm2-135m"]  # H = 576: 128 does not divide it
    s4 = quant_schemes(cfg, "int4", None, "m")
    assert s4["0.w_down"] == ("int4", 128) and s4["0.w_qkv"] == ("int4", 64) and s4["lm_head"] == ("int4", 64)
    s8 = quant_schemes(cfg, "int8", None, "m")
    assert s8["0.w_down"] == ("int8", 1536) and s8["lm_head"] == ("int8", 576)
    assert quant_schemes(cfg, "none", None, "m") == {}
    assert set(quant_schemes(cfg, "int4", 32, "m")) == set(matrix_shapes(cfg))
    with pytest.raises(BadInput, match=r"^/x/model: --group-size 128 does not divide the input dimension 576 of w_qkv"):
        quant_schemes(cfg, "int4", 128, "/x/model")
    with pytest.raises(BadInput, match="--quant must be one of none, int8, int4, got 'int3'"):
        quant_schemes(cfg, "int3", None, "m")


@pytest.mark.parametrize("quant,group", [("int8", None), ("int4", 32), ("int4", None)])
def test_synthetic_quantized_has_no_float_matrices(quant, group):
    cfg = SYNTHETIC_SHAPES["tiny"]
    sch = quant_schemes(cfg, quant, group, "synthetic:tiny")
    w = synthetic_weights(cfg, "float16", "cpu", 3, sch)
    H, V = cfg.hidden_size, cfg.vocab_size
    dense = V * H + H * (1 + 2 * cfg.num_layers)  # embed + norms: all the dense arena holds
    assert dense <= w.arena.numel() < dense + 64 * (2 + 2 * cfg.num_layers)
    assert w.quant == quant and w.group == (group or (128 if quant == "int4" else 0)) and w.qarena.dtype == torch.uint8
    qls = w.quant_linears()
    assert len(qls) == 4 * cfg.num_layers + 1 and all(q.q.untyped_storage().data_ptr() ==
                                                      w.qarena.untyped_storage().data_ptr() for q in qls)
    assert w.quant_bytes() == sum(q.nbytes() for q in qls) <= w.qarena.numel()
    assert arena_bytes(cfg, "float16", sch) == w.nbytes()
    p = w.pointers()
    d = p["layers"][1]["w_gu"]
    lw = w.layers[1].w_gu
    assert d == {"mode": quant, "group": lw.group, "q": lw.q.data_ptr(), "scale": lw.scale.data_ptr(),
                 "minv": 0 if quant == "int8" else lw.minv.data_ptr()}
    assert isinstance(p["layers"][1]["attn_norm"], int) and isinstance(p["lm_head"], dict)
    # seeded: the same weights again
    w2 = synthetic_weights(cfg, "float16", "cpu", 3, sch)
    assert torch.equal(w.qarena, w2.qarena) and torch.equal(w.arena, w2.arena)
    # greedy decoding has a clear winner, as on the dense synthetic model
    kv = KVArena(cfg, 1, w.dtype, w.device)
    logits = ReferenceDecoder(w, kv).prefill(0, [1, 2, 3])
    top = logits.topk(2).values
    assert torch.isfinite(logits).all() and logits.std() > 1.0 and top[0] > top[1]


def test_synthetic_70b_fits_80gb_only_quantized(monkeypatch):
    """Arithmetic only (nothing allocated): fp16 70B is refused on an 80 GB card, int4 fits."""
    import server.model.memory as mem
    cfg = with_max_seq(SYNTHETIC_SHAPES["llama2-70b"], 4096)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size) == (80, 8192, 64, 8, 28672, 32000)
    monkeypatch.setattr(mem, "available_bytes", lambda device: 80 * 10**9)
    with pytest.raises(mem.ModelTooLarge, match=r"synthetic:llama2-70b in float16 needs 13[0-9.]+ GB .* use --quant int8 or"):
        mem.check_fits("synthetic:llama2-70b", cfg, torch.float16, "cpu")
    s4 = quant_schemes(cfg, "int4", None, "synthetic:llama2-70b")
    mem.check_fits("synthetic:llama2-70b", cfg, torch.float16, "cpu", 1, s4)
    need = mem.need_bytes(cfg, torch.float16, 1, s4)
    # int4 g128: 4.25 bits per weight (nibble + fp16 scale and min per 128) + the fp16 embedding + KV
    n_mat = sum(n * k for n, k in matrix_shapes(cfg).values())
    expect = n_mat * (0.5 + 4 / 128) + cfg.vocab_size * cfg.hidden_size * 2 + mem.kv_bytes(cfg, torch.float16, 1)
    assert abs(need - expect) / expect < 1e-3 and need < 40e9
    s8 = quant_schemes(cfg, "int8", None, "synthetic:llama2-70b")
    assert 65e9 < mem.need_bytes(cfg, torch.float16, 1, s8) < 75e9  # int8 per row: one byte per weight
    monkeypatch.setattr(mem, "available_bytes", lambda device: 60 * 10**9)
    with pytest.raises(mem.ModelTooLarge, match="in float16 with int8 weights needs .* use --quant int4 or"):
        mem.check_fits("synthetic:llama2-70b", cfg, torch.float16, "cpu", 1, s8)


# ---------------------------------------------------------------------------------------
# the reference backend runs the dequantized values

@pytest.mark.parametrize("quant,group", [("int8", None), ("int4", 32), ("int4", 128)])
def test_reference_runs_the_dequantized_model(tiny_hf_folder, quant, group):
    """Load-time RTN from an HF folder: the reference's logits equal (bitwise) those of the dense
    model whose matrices are the dequantized values, and HF transformers on those values (1e-4)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from server.model.config import hf_config_dict
    folder, _ = tiny_hf_folder
    cfg = SYNTHETIC_SHAPES["tiny"]
    sch = quant_schemes(cfg, quant, group, str(folder))
    wq = load_hf_folder(folder, cfg, "float32", "cpu", sch)
    wd = load_hf_folder(folder, cfg, "float32", "cpu")
    src = wd.layers[0].w_gu.clone()
    for l, lw in enumerate(wd.layers):
        for k in ("w_qkv", "w_o", "w_gu", "w_down"):
            getattr(lw, k).copy_(dequantize(getattr(wq.layers[l], k)))
    wd.lm_head = dequantize(wq.lm_head)  # tied: embed stays the dense table, lm_head its own
    assert wq.layers[0].w_gu.group == (group or (128 if quant == "int4" else cfg.hidden_size))
    err = (src - wd.layers[0].w_gu).abs().max().item()
    assert 0 < err < (0.02 if quant == "int8" else 0.2)  # quantized, not copied
    ids = [5, 17, 300, 42, 7, 99]
    outs = []
    for w in (wq, wd):
        dec = ReferenceDecoder(w, KVArena(cfg, 1, w.dtype, w.device))
        outs.append(torch.stack([dec.prefill(0, ids[:3])] + [dec.step(0, t) for t in ids[3:]]))
    assert torch.equal(outs[0], outs[1])
    hf = LlamaForCausalLM(LlamaConfig(**{**hf_config_dict(cfg), "tie_word_embeddings": False})).eval()
    hf.load_state_dict({k: v.float() for k, v in hf_state_dict(wq).items()}, strict=False)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(outs[0][0], ref[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1:], ref[3:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_a_tied_folder_without_lm_head_weight_quantizes_its_table(tiny_hf_folder, quant):
    """A tied HF folder as transformers saves it (no lm_head.weight): `--quant` makes the lm_head its own
    quantized matrix from the embedding table (it failed: "tensor 'lm_head.weight' is missing"), the same
    values as from a folder that stores the copy."""
    from safetensors.torch import load_file, save_file
    folder, _ = tiny_hf_folder
    import dataclasses
    cfg = dataclasses.replace(SYNTHETIC_SHAPES["tiny"], tie_word_embeddings=True)  # the stored copy is ignored
    sch = quant_schemes(cfg, quant, None, str(folder))
    with_copy = load_hf_folder(folder, cfg, "float32", "cpu", sch)
    f = next(folder.glob("*.safetensors"))
    sd = load_file(str(f))
    assert "lm_head.weight" in sd
    sd.pop("lm_head.weight")
    save_file(sd, str(f))
    without = load_hf_folder(folder, cfg, "float32", "cpu", sch)
    assert torch.equal(dequantize(without.lm_head), dequantize(with_copy.lm_head))
    err = (dequantize(without.lm_head) - without.embed.float()).abs().max().item()
    assert 0 < err < (0.05 if quant == "int8" else 0.5)  # the table, quantized


def test_quantized_model_on_a_cpu_machine_runs_on_reference(capsys):
    """The cuda kernels run int8/int4 (gemv_quant.cu; tests/gpu/test_quant_kernels.py), so the quant
    mode does not decide the backend: on a machine without a GPU auto says why it picks reference."""
    from server.backends import cuda_refusal, make_backend
    from server.model.resolve import resolve_model
    assert cuda_refusal(SYNTHETIC_SHAPES["tiny"]) is None
    m = resolve_model("synthetic:tiny", quant="int4", group=32)
    if not torch.cuda.is_available():
        assert make_backend("auto", m).status()["quant"] == "int4"
        assert "backend auto -> reference" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# the CLI: flags, environment, bad input

def run_cli(tmp_path, *flags, env=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--prompt", "hi", "--max-tokens", "3",
                           "--backend", "reference", "--output-dir", str(tmp_path / "out"), *flags],
                          capture_output=True, text=True, timeout=600, env=e, cwd=ROOT)


def error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("case4: error:"), r.stderr
    return lines[0]


def test_cli_parses_flags_and_environment(monkeypatch):
    from conductor.cli import build_parser, check_args, process_options
    monkeypatch.setenv("CASE4_QUANT", "int4")
    monkeypatch.setenv("CASE4_GROUP_SIZE", "64")
    a = build_parser().parse_args([])
    check_args(a)
    assert (process_options(a).quant, process_options(a).group_size) == ("int4", 64)
    a = build_parser().parse_args(["--quant", "int8", "--group-size", "32"])  # flags win
    check_args(a)
    assert (a.quant, a.group_size) == ("int8", 32)
    monkeypatch.delenv("CASE4_QUANT"), monkeypatch.delenv("CASE4_GROUP_SIZE")
    a = build_parser().parse_args([])
    check_args(a)
    assert (a.quant, a.group_size) == (None, None)
    for argv, msg in ((["--quant", "int3"], "--quant must be one of none, int8, int4, got 'int3'"),
                      (["--quant", "int4", "--group-size", "48"], "--group-size must be one of 32, 64, 128, got 48"),
                      (["--quant", "int4", "--group-size", "x"], "--group-size must be one of 32, 64, 128, got 'x'"),
                      (["--group-size", "32"], "--group-size 32 needs --quant int8 or int4")):
        with pytest.raises(BadInput, match=msg):
            check_args(build_parser().parse_args(argv))


def test_cli_bad_quant_inputs_exit_2(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder
    line = error_line(run_cli(tmp_path, "--model", "synthetic:tiny", "--quant", "int5"))
    assert "--quant must be one of none, int8, int4, got 'int5'" in line
    line = error_line(run_cli(tmp_path, "--model", "synthetic:tiny", env={"CASE4_QUANT": "fp8"}))
    assert "got 'fp8'" in line
    # SmolLM2's hidden size 576 is no multiple of 128 (refused before anything is allocated)
    line = error_line(run_cli(tmp_path, "--model", "synthetic:smollm2-135m", "--quant", "int4", "--group-size", "128"))
    assert ("synthetic:smollm2-135m: --group-size 128 does not divide the input dimension 576 of w_qkv" in line), line
    r = run_cli(tmp_path, "--model", str(folder), "--quant", "int4", "--group-size", "64")
    assert r.returncode == 0, r.stderr


def test_prefill_on_quantized_weights_takes_one_row_to_the_gemv():
    """The cuda backend's prefill view of quantized weights (server/cuda_backend.py DequantWeights, the decoder's
    `_lin` hook): more than one row -> the matrix dequantized, then F.linear; one row (the last position's lm_head,
    every matrix of a one-token continuation) -> the quantized gemv. On the CPU with both kernels replaced by
    torch on the same QuantLinear (q/k/v biases included): the same logits and K/V rows as the reference decoder on
    the QuantLinears themselves (float32), and the gemv called for exactly the one-row linears."""
    import dataclasses
    import torch.nn.functional as F
    from server.cuda_backend import DequantWeights

    calls = []

    class CpuDequant(DequantWeights):
        def dequant(self, m):
            calls.append(("dequant", m.n))
            return dequantize(m)

        def gemv(self, m, x, b):
            assert x.shape[0] == 1
            calls.append(("gemv", m.n))
            return F.linear(x, dequantize(m), b)

    cfg = dataclasses.replace(SYNTHETIC_SHAPES["tiny"], qkv_bias=True)
    for quant, group in (("int4", 32), ("int8", None)):
        w = synthetic_weights(cfg, "float32", "cpu", 7, schemes=quant_schemes(cfg, quant, group, "tiny"))
        ids = [(5 * i + 3) % cfg.vocab_size for i in range(23)]
        outs = {}
        for name, pw in (("ref", w), ("hook", CpuDequant(w, None, torch.empty(0)))):
            kv = KVArena(cfg, 1, torch.float32, "cpu")
            dec = ReferenceDecoder(pw, kv, compute_dtype=torch.float32)
            calls.clear()
            full = dec.forward(0, ids, 0)                      # 23 rows: every matrix dequantized
            n_full = list(calls)
            last = dec.forward(0, ids, 0, last_only=True)      # the lm_head of one row: the gemv
            n_last = list(calls[len(n_full):])
            cont = dec.forward(0, [11], len(ids))              # a one-token continuation: every matrix by the gemv
            n_cont = list(calls[len(n_full) + len(n_last):])
            outs[name] = (full, last, cont, kv.k(0, 1)[:, :len(ids) + 1].clone(), kv.v(0, 0)[:, :len(ids) + 1].clone())
        for got, want in zip(outs["hook"], outs["ref"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        L = cfg.num_layers
        assert [c for c, _ in n_full] == ["dequant"] * (4 * L + 1)
        assert [c for c, _ in n_last] == ["dequant"] * 4 * L + ["gemv"] and n_last[-1][1] == cfg.vocab_size
        assert [c for c, _ in n_cont] == ["gemv"] * (4 * L + 1)
