"""The quantized kernels (custom_kernels/csrc/gemv_quant.cu) against float64 on fresh random quantized weights.

The oracle is server.model.quant.dequantize (the layout's definition) in float64, times the input in float64
(normed in float64 where the kernel norms). Outputs are poisoned (NaN) first. Bounds as the fp16 gemv's
(tests/gpu/test_kernels.py): fp16 2e-3, bf16 1.5e-2 relative (the output is rounded once to the model dtype, the
normed input twice). Each failure names the matrix, the mode and the first wrong rows, so a wrong tile, chunk
or group shows as a row pattern.

The dequantization kernel (prefill's scratch) must equal dequantize(ql).to(dtype) bit for bit: both compute
q * scale (+ minv) exactly in fp32 and round once. It shares the unpacking code with the gemv, so a wrong nibble
order shows there first, element by element.
"""
import math
from pathlib import Path

import pytest
import torch

from custom_kernels.ext import load_extension
from server.model.quant import QuantLinear, dequantize, pack_int4
from tests.gpu.test_kernels import gemv_case

pytestmark = pytest.mark.gpu
DT = {"float16": torch.float16, "bfloat16": torch.bfloat16}
DTI = {"float16": 0, "bfloat16": 1}
TOL = {"float16": 2e-3, "bfloat16": 1.5e-2}
STORE, RESID, SWIGLU, F32 = 0, 1, 2, 3
QMODE = {"int8": 8, "int4": 4}
MAX_BLOCKS = 132 * 4


def stream():
    return torch.cuda.current_stream().cuda_stream


def random_quant(mode: str, n: int, k: int, group: int, gen: torch.Generator, gain: float = 1.0) -> QuantLinear:
    """A random QuantLinear on the GPU whose values are ~N(0, gain^2/k)-sized (so outputs are O(gain))."""
    ng = k // group
    if mode == "int8":
        q = torch.randint(-127, 128, (n, k), device="cuda", generator=gen, dtype=torch.int8)
        scale = (gain * (0.5 + torch.rand(n, ng, device="cuda", generator=gen)) / (73.0 * math.sqrt(k))).half()
        return QuantLinear("int8", n, k, group, q, scale, None)
    nib = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.uint8)
    scale = (gain * (0.5 + torch.rand(n, ng, device="cuda", generator=gen)) / (4.6 * math.sqrt(k))).half()
    minv = (-7.5 * scale.float() * (1 + 0.2 * torch.randn(n, ng, device="cuda", generator=gen))).half()
    return QuantLinear("int4", n, k, group, pack_int4(nib).contiguous(), scale, minv)


def ptrs(ql: QuantLinear):
    return ql.q.data_ptr(), ql.scale.data_ptr(), ql.minv.data_ptr() if ql.minv is not None else 0


def check(out, ref, tol, what):
    """‖out − ref‖ / max(‖ref‖, ½√N) < tol, every element written; else name the first wrong rows. The
    inputs make outputs O(1) (random_quant), so ½√N is the norm of a typical output vector: a single row
    that cancels to near 0 (the [1x64] bf16 case measured 2.9e-2 relative to its own tiny norm on an H100)
    is judged on that scale, while a wrong row still errs by O(1)."""
    out, ref = out.double().cpu(), ref.double().cpu()
    bad_nan = (~torch.isfinite(out)).nonzero().flatten()
    assert bad_nan.numel() == 0, f"{what}: {bad_nan.numel()} unwritten/non-finite rows, first {bad_nan[:8].tolist()}"
    e = float((out - ref).norm() / max(float(ref.norm()), 0.5 * math.sqrt(ref.numel())))
    if e >= tol:
        err = (out - ref).abs() / ref.abs().mean()
        rows = (err > 8 * tol).nonzero().flatten()
        raise AssertionError(f"{what}: rel err {e:.2e} >= {tol:g}; {rows.numel()} rows off by > {8 * tol:g} of the "
                             f"mean |ref|, first {rows[:12].tolist()} (of {out.numel()})")


# (N, K): SmolLM2 qkv / o / gate|up (N = I) / down / lm_head, Llama-2-7B qkv / o / gate|up / down / lm_head, and rows
# that are not a multiple of the 8-warp block's 16 rows (odd: a warp's pair with one row)
SHAPES = [(960, 576), (576, 576), (1536, 576), (576, 1536), (49152, 576),
          (12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096),
          (1001, 512), (37, 256), (1, 64)]
# (mode, group): int8 per row (group = K) and in groups of 32 (GGUF Q8_0); int4 in 32 (Q4_0 / Q4_1), 64, 128
QUANTS = [("int8", 0), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]


def _cases():
    for N, K in SHAPES:
        for mode, G in QUANTS:
            G = G or K
            if K % G == 0:
                yield N, K, mode, G


def _dtype_cases():
    """fp16 at every shape; bf16 at the shapes up to 7B's gate|up and down (the same kernels, another input
    type): generated, not skipped, so a GPU run that skips anything is a real problem."""
    for c in _cases():
        yield ("float16", *c)
        if c[0] * c[1] <= 4096 * 11008:
            yield ("bfloat16", *c)


@pytest.mark.parametrize("dtype,N,K,mode,G", list(_dtype_cases()), ids=lambda v: str(v))
def test_qgemv_modes(dtype, N, K, mode, G):
    ext = load_extension()
    dt = DT[dtype]
    g = torch.Generator(device="cuda").manual_seed(N * 31 + K * 7 + G + QMODE[mode])
    ql = random_quant(mode, 2 * N, K, G, g)  # rows [0, N) for the one-matrix modes, all 2N for SwiGLU
    Wd = dequantize(ql).double()
    x = torch.randn(K, device="cuda", generator=g).to(dt)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dt)
    xd = x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * nw.double()
    q, s, m = ptrs(ql)
    for om in (STORE, RESID, SWIGLU, F32):
        for norm in (False, True):
            out, ref = gemv_case(Wd, xn if norm else xd, N, om, dt, g)
            ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr() if norm else 0, 1e-5,
                      out.data_ptr(), om, DTI[dtype], stream(), 0, MAX_BLOCKS)
            torch.cuda.synchronize()
            check(out, ref, TOL[dtype], f"{mode} G={G} [{N}x{K}] {dtype} mode {om} norm {norm}")


# (N, K, mode, G) of a quantized QKV with a bias (QGemvArgs::bias): Qwen2.5-0.5B's (K 896: int8 per row, int4 in
# groups of 128 and 32), Qwen2-7B's (4608 x 3584), and odd rows (a warp's pair with one row: N = 1001, 37)
QBIAS = [(1152, 896, "int8", 896), (1152, 896, "int4", 128), (1152, 896, "int4", 32), (4608, 3584, "int8", 3584),
         (4608, 3584, "int4", 128), (1001, 512, "int8", 32), (1001, 512, "int4", 64), (37, 256, "int4", 32)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("N,K,mode,G", QBIAS, ids=lambda v: str(v))
def test_qgemv_bias(dtype, N, K, mode, G):
    """The quantized store with a bias: out = round(W x + b), b added in fp32 to the fp32 sum before the one rounding
    (as the fp16 bias gemv and server/reference.py _lin). Against float64 (gemv_case on the dequantized matrix) within
    the quantized gemv's bound, normed and not, with a bias (~N(0, 2)) that puts the output without it far outside
    that bound; and bit for bit round(acc + b) from the same kernel's unrounded fp32 acc (mode F32, round_logits 0:
    the same pairs, chunks and summation order). A bias in another mode is refused."""
    ext = load_extension()
    dt = DT[dtype]
    g = torch.Generator(device="cuda").manual_seed(N * 13 + K * 3 + G + QMODE[mode])
    ql = random_quant(mode, N, K, G, g)
    Wd = dequantize(ql).double()
    x = torch.randn(K, device="cuda", generator=g).to(dt)
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dt)
    b = (2 * torch.randn(N, device="cuda", generator=g)).to(dt)
    xd = x.double()
    xn = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * nw.double()
    q, s, m = ptrs(ql)
    for norm in (True, False):
        what = f"{mode} G={G} [{N}x{K}] {dtype} bias norm {norm}"
        out, y = gemv_case(Wd, xn if norm else xd, N, STORE, dt, g)
        ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr() if norm else 0, 1e-5, out.data_ptr(),
                  STORE, DTI[dtype], stream(), 0, MAX_BLOCKS, pdl=3, bias=b.data_ptr())
        torch.cuda.synchronize()
        check(out, y + b.double(), TOL[dtype], what)
        e0 = float((out.double().cpu() - y.cpu()).norm() / y.cpu().norm())
        assert e0 > 20 * TOL[dtype], f"{what}: the bias changes the output by only {e0:.2e}"
        acc = torch.full((N,), float("nan"), device="cuda", dtype=torch.float32)
        ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr() if norm else 0, 1e-5, acc.data_ptr(), F32,
                  DTI[dtype], stream(), 0, MAX_BLOCKS, pdl=3)
        torch.cuda.synchronize()
        want = (acc + b.float()).to(dt)  # fp32 add, one round-to-nearest-even to the dtype
        diff = (out.view(torch.int16) != want.view(torch.int16)).nonzero().flatten()
        assert diff.numel() == 0, (f"{what}: {diff.numel()} rows not round(acc + b), first {diff[:8].tolist()}: got "
                                   f"{out[diff[0]].item()} want {want[diff[0]].item()}")
    with pytest.raises(ValueError, match="a bias is for the store mode"):
        ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr(), 1e-5, out.data_ptr(), RESID, DTI[dtype],
                  stream(), 0, MAX_BLOCKS, bias=b.data_ptr())


@pytest.mark.parametrize("mode,G", [("int8", 4096), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_qgemv_deterministic_and_pdl_levels(mode, G):
    """Bitwise the same result on every run and at every PDL level (the preload before the wait included), with
    a grid that loops (max_blocks small: each warp takes several pairs)."""
    ext = load_extension()
    N, K = 11008, 4096
    g = torch.Generator(device="cuda").manual_seed(G + QMODE[mode])
    ql = random_quant(mode, 2 * N, K, G, g)
    x = torch.randn(K, device="cuda", generator=g).half()
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).half()
    q, s, m = ptrs(ql)
    outs = []
    for pdl, mb in ((0, MAX_BLOCKS), (1, MAX_BLOCKS), (3, MAX_BLOCKS), (3, MAX_BLOCKS), (3, 7), (1, 0)):
        out = torch.full((N,), float("nan"), device="cuda", dtype=torch.float16)
        ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr(), 1e-5, out.data_ptr(), SWIGLU, 0,
                  stream(), 0, mb, pdl=pdl)
        torch.cuda.synchronize()
        outs.append(out.cpu())
    for i, o in enumerate(outs[1:], 1):
        assert torch.equal(o.view(torch.int16), outs[0].view(torch.int16)), f"run {i} differs from run 0"


ROOT = Path(__file__).resolve().parents[2]  # the repository: the subprocesses' working directory


def _clean_env(env):
    import os
    return {k: v for k, v in os.environ.items() if not k.startswith("CASE4_QGEMV")} | env | {"CASE4_BUILD_EXT": "0"}


# The kernels of fp16 models that the default (CASE4_QGEMV=auto: int4 and int8 on the tensor-core kernel since
# session 34; its blocks of 8 or 16 warps by launch_tc's rule) leaves out, each through this file's float64 tests in
# a pytest process of its own (CASE4_QGEMV* are read once a process): f32 (the fp32 kernel, both modes) runs every
# test of the file, the step, graph and real-GGUF tests included;
# tc16 (16-warp blocks at every shape, int4 and int8: the rule picks them for 7B-class matrices only) the kernel
# tests; h2 (opt-in since session 25, which found it failing the real-GGUF test's argmax bound) the
# epilogue/shape/group tests. name -> (environment, -k selection; "" for the whole file)
OPT_IN = {"h2": ({"CASE4_QGEMV": "h2"}, "qgemv_modes"),
          "f32": ({"CASE4_QGEMV": "f32"}, ""),
          "tc16": ({"CASE4_QGEMV": "tc", "CASE4_QGEMV_TCW": "16"},
                   "qgemv_modes or qgemv_bias or qgemv_argmax or qgemv_deterministic or qgemv_embedding")}


@pytest.mark.parametrize("kernel", sorted(OPT_IN))
def test_opt_in_kernel_against_float64(kernel):
    import subprocess
    import sys
    env, sel = OPT_IN[kernel]
    k = "not opt_in_kernel and not variants_bitwise" + (f" and ({sel})" if sel else "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs",
                        "-k", k, "tests/gpu/test_quant_kernels.py"], cwd=ROOT,
                       env=_clean_env(env), capture_output=True, text=True, timeout=900)
    lines = (r.stdout + r.stderr).strip().splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR", "SKIPPED"))]
    assert r.returncode == 0 and " passed" in lines[-1] and "skipped" not in lines[-1], \
        f"{env}: {failed[:6]} {lines[-1:]}"


@pytest.fixture(scope="module")
def h2_outputs(tmp_path_factory):
    """tests/gpu/qgemv_outputs.py's outputs (fp16, every epilogue, 7B, SmolLM2 and odd shapes) with the half2
    kernel as configured by default, in a process of its own (CASE4_QGEMV* are read once a process)."""
    path = tmp_path_factory.mktemp("qgemv") / "h2.pt"
    _save_outputs(path, {"CASE4_QGEMV": "h2"})
    return path


def _save_outputs(path, env):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "tests/gpu/qgemv_outputs.py", "save", str(path), "--quick"], cwd=ROOT,
                       env=_clean_env(env), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"qgemv_outputs save {env}: {r.stderr.strip().splitlines()[-1:]}"


@pytest.mark.parametrize("env", [{"CASE4_QGEMV": "h2", "CASE4_QGEMV_GRID": "x4"}], ids=["h2-x4"])
def test_qgemv_variants_bitwise_equal_h2(env, h2_outputs, tmp_path):
    """The half2 kernel on the plan's grid (4 blocks a SM, two waves) computes each row as on the default resident
    grid (one warp, the same chunk order and arithmetic): every output bit for bit the same, at both PDL levels,
    the float64 tests above holding for the default. (Session 25 ran the shared-memory ring kernel of
    docs/experiments/qgemv-ring2.patch through this test too: equal.)"""
    import subprocess
    import sys
    path = tmp_path / "v.pt"
    _save_outputs(path, env)
    assert len(torch.load(path)) > 100
    r = subprocess.run([sys.executable, "tests/gpu/qgemv_outputs.py", "compare", str(h2_outputs), str(path)],
                       cwd=ROOT, env=_clean_env({}), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{env}: outputs differ from the half2 kernel's: {r.stdout.strip().splitlines()[-4:]}"


@pytest.mark.parametrize("mode,G", [("int8", 576), ("int4", 64)])
def test_qgemv_embedding_gather(mode, G):
    """tok: the input is the embedding row tok[0] (block 0 copies it to x_out), normed, as layer 0's QKV."""
    ext = load_extension()
    V, N, K = 1000, 960, 576
    g = torch.Generator(device="cuda").manual_seed(5)
    ql = random_quant(mode, N, K, G, g)
    emb = torch.randn(V, K, device="cuda", generator=g).half()
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).half()
    tok = torch.tensor([777], dtype=torch.int32, device="cuda")
    x_out = torch.full((K,), float("nan"), device="cuda", dtype=torch.float16)
    out = torch.full((N,), float("nan"), device="cuda", dtype=torch.float16)
    q, s, m = ptrs(ql)
    ext.qgemv(q, s, m, QMODE[mode], G, N, K, emb.data_ptr(), nw.data_ptr(), 1e-5, out.data_ptr(), STORE, 0, stream(),
              0, MAX_BLOCKS, tok=tok.data_ptr(), x_out=x_out.data_ptr())
    torch.cuda.synchronize()
    assert torch.equal(x_out, emb[777]), "x_out must be the gathered embedding row"
    xd = emb[777].double()
    xn = xd * torch.rsqrt(xd.pow(2).mean() + 1e-5) * nw.double()
    check(out, dequantize(ql).double() @ xn, TOL["float16"], f"{mode} gather")


@pytest.mark.parametrize("mode,G,N,K", [(m, G, N, K) for m, G in (("int8", 4096), ("int4", 128), ("int4", 32))
                                         for N, K in ((32000, 4096), (49152, 576), (1001, 512)) if K % G == 0])
def test_qgemv_argmax_partials(mode, G, N, K):
    """lm_head's per-block argmax partials: their best is the largest stored logit, its lowest row on ties."""
    ext = load_extension()
    g = torch.Generator(device="cuda").manual_seed(N + G)
    ql = random_quant(mode, N, K, G, g)
    best0 = int(torch.randint(0, N, (1,), generator=torch.Generator().manual_seed(N)))
    for r in (best0, 0 if best0 else N - 1):  # two identical rows: the lowest must win if they hold the max
        ql.q[r] = ql.q[N // 2]
        ql.scale[r] = ql.scale[N // 2]
        if ql.minv is not None:
            ql.minv[r] = ql.minv[N // 2]
    x = torch.randn(K, device="cuda", generator=g).half()
    nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).half()
    logits = torch.full((N,), float("nan"), device="cuda")
    part = torch.full((MAX_BLOCKS, 2), -7, dtype=torch.int32, device="cuda")
    q, s, m = ptrs(ql)
    n = ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr(), 1e-5, logits.data_ptr(), F32, 0,
                  stream(), 1, MAX_BLOCKS, part=part.data_ptr())
    torch.cuda.synchronize()
    assert 0 < n <= MAX_BLOCKS
    p = part[:n].cpu()
    vals = p[:, 0].clone().view(torch.float32)
    assert torch.isfinite(logits).all()
    mx = float(logits.max())
    assert float(vals.max()) == mx
    winners = p[:, 1][vals == mx]
    assert int(winners.min()) == int(torch.nonzero(logits == mx)[0]), "the lowest row of the maximum"


@pytest.mark.parametrize("mode,G", QUANTS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequant_bitwise(mode, G, dtype):
    ext = load_extension()
    N, K = 999, 4096
    G = G or K
    g = torch.Generator(device="cuda").manual_seed(G + QMODE[mode])
    ql = random_quant(mode, N, K, G, g)
    out = torch.full((N, K), float("nan"), device="cuda", dtype=DT[dtype])
    q, s, m = ptrs(ql)
    ext.dequant(q, s, m, QMODE[mode], G, N, K, out.data_ptr(), DTI[dtype], stream())
    torch.cuda.synchronize()
    ref = dequantize(ql).to(DT[dtype])
    diff = (out != ref).nonzero()
    assert diff.shape[0] == 0, (f"{mode} G={G}: {diff.shape[0]} elements differ, first (row, col) "
                                f"{diff[:8].tolist()}: got {out[tuple(diff[0])].item()} want {ref[tuple(diff[0])].item()}")


def test_bad_layouts_are_refused():
    """A group that does not divide K, or a K the 16-byte chunks cannot cover: BadArgument (ValueError), one line."""
    ext = load_extension()
    g = torch.Generator(device="cuda").manual_seed(1)
    ql = random_quant("int4", 64, 256, 64, g)
    x = torch.randn(256, device="cuda").half()
    out = torch.empty(64, device="cuda").half()
    q, s, m = ptrs(ql)
    with pytest.raises(ValueError, match="group size 96 must divide K"):
        ext.qgemv(q, s, m, 4, 96, 64, 256, x.data_ptr(), 0, 1e-5, out.data_ptr(), STORE, 0, stream(), 0, MAX_BLOCKS)
    with pytest.raises(ValueError, match="K must be a multiple of 32"):
        ext.qgemv(q, s, m, 4, 16, 64, 240, x.data_ptr(), 0, 1e-5, out.data_ptr(), STORE, 0, stream(), 0, MAX_BLOCKS)


# ---------------------------------------------------------------------------------------------------------------
# End to end: the cuda backend's decode step on quantized weights. Until the reference backend runs QuantLinear
# itself (the Python side of issue 26), the oracle is the fp32 ReferenceDecoder (tests/gpu/test_step.py's oracle)
# on the same weights with each QuantLinear replaced by its exact fp32 values (dequantize): the kernels' math, in
# fp32 with the model dtype's rounding points.

def quant_model(shape: str, mode: str, group: int, seed: int = 0, max_seq: int = 1024, lm: tuple | None = None):
    """A LoadedModel: synthetic fp16 weights with every projection and the lm_head replaced by random QuantLinear
    (lm_head with a 4x gain, as synthetic_weights' lm_head: clear greedy winners). lm: the lm_head's own (mode,
    group) (the built-in GGUF's layout: int4 G32 layers, int8 G32 lm_head)."""
    from server.model.config import SYNTHETIC_SHAPES, with_max_seq
    from server.model.resolve import LoadedModel
    from server.model.weights import synthetic_weights
    cfg = with_max_seq(SYNTHETIC_SHAPES[shape], max_seq)
    w = synthetic_weights(cfg, "float16", "cuda", seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1000)
    for lw in w.layers:
        for k in ("w_qkv", "w_o", "w_gu", "w_down"):
            n, kk = getattr(lw, k).shape
            setattr(lw, k, random_quant(mode, n, kk, group if kk % group == 0 else kk, g))
    lm_mode, lm_group = lm or (mode, group)
    w.lm_head = random_quant(lm_mode, cfg.vocab_size, cfg.hidden_size, lm_group, g, gain=4.0)
    return LoadedModel(name=f"synthetic:{shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())


def dequant_oracle(model):
    """The fp32 ReferenceDecoder on the model's weights with every QuantLinear as its exact fp32 values."""
    import dataclasses
    from server.kv import KVArena
    from server.model.weights import LayerWeights
    from server.reference import ReferenceDecoder
    w = model.weights

    def d(m):
        return dequantize(m) if isinstance(m, QuantLinear) else m
    layers = [LayerWeights(**{k: d(getattr(lw, k)) for k in LayerWeights.__dataclass_fields__}) for lw in w.layers]
    wr = dataclasses.replace(w, layers=layers, lm_head=d(w.lm_head))
    return ReferenceDecoder(wr, KVArena(model.cfg, 1, w.dtype, "cuda"), compute_dtype=torch.float32)


def _ids(V, n, seed):
    import random
    r = random.Random(seed)
    return [r.randrange(V) for _ in range(n)]


def _greedy():
    from case4_sampling import SamplingParams
    return SamplingParams()


E2E = [("tiny", "int8", 128), ("tiny", "int4", 32), ("tiny", "int4", 128),
       ("smollm2-135m", "int8", 576), ("smollm2-135m", "int4", 64), ("smollm2-135m", "int8", 32)]


@pytest.mark.parametrize("shape,mode,G", E2E)
def test_quant_step_matches_dequant_oracle(shape, mode, G):
    """Teacher-forced 64 steps after a shared prefill (the oracle's KV rows copied in, so each step is compared on
    its own): logits within test_step.py's fp16 bound of the oracle's, the same argmax except at fp16 near-ties;
    then greedy through device sampling == greedy through the host argmax of our own steps."""
    from server.cuda_backend import CudaBackend
    from tests.gpu.test_step import shared_prefill, teacher_forced
    model = quant_model(shape, mode, G)
    be = CudaBackend(model, sessions=1, graph_mode="none")
    try:
        assert be.status()["quant"] == mode
        ref = dequant_oracle(model)
        V = model.cfg.vocab_size
        ids = _ids(V, 8, 1)
        shared_prefill(be, ref, 0, ids)
        teacher_forced(be, ref, _ids(V, 64, 2), f"{shape} {mode} G={G}")
        # device sampling (lm_head's argmax partials + finish) == host argmax of the eager steps
        tok = int(be.prefill(0, ids).argmax())
        host, t = [], tok
        for _ in range(48):
            t = int(be.step(0, t).argmax())
            host.append(t)
        be.prefill(0, ids)
        assert be.generate(0, tok, 48, _greedy()) == host
    finally:
        be.close()


@pytest.mark.parametrize("shape,mode,G,n,lm", [("smollm2-135m", "int4", 64, 1000, None),
                                               ("smollm2-135m", "int8", 576, 1000, None),
                                               ("mha-1b", "int4", 128, 1000, None),
                                               ("smollm2-135m", "int4", 32, 1000, ("int8", 32))],
                         ids=["smollm2-int4-g64", "smollm2-int8", "mha1b-int4-g128", "smollm2-gguf-layout"])
def test_quant_graph_modes_bitwise_equal_eager(shape, mode, G, n, lm):
    """exact and dynamic graphs == eager (mode none), issue 26's 1,000 greedy tokens: n tokens through device
    sampling, and n steps of client sampling whose logits must be bitwise equal at every step (the same kernels in
    the same order; nothing is allocated at capture: a capture that allocated would fail and count in failures).
    The int4 G128 case is mha-1b's shape (K 2048 and 5632; tiny's context, 512 positions, is too short), the last
    the built-in GGUF's layout (int4 G32 layers, int8 G32 lm_head) on random weights."""
    from server.cuda_backend import CudaBackend
    model = quant_model(shape, mode, G, max_seq=2048, lm=lm)
    runs, eager_logits, first_diff = {}, [], {}
    for gm in ("none", "exact", "dynamic"):
        be = CudaBackend(model, sessions=1, graph_mode=gm)
        try:
            ids = _ids(model.cfg.vocab_size, 8, 0)
            tok = int(be.prefill(0, ids).argmax())
            if gm == "exact":
                be.bg_capture_start(0, 64)
                be.wait_precapture(0, 32, 120.0)
            runs[gm] = be.generate(0, tok, n, _greedy())
            be.prefill(0, ids)
            if gm == "exact":
                be.wait_precapture(0, 32, 120.0)
            t = tok
            for i in range(n):
                lg = be.replay(0, be.seq_len(0), t)  # the pinned host buffer: compared or cloned before the next
                if gm == "none":
                    eager_logits.append(lg.clone())
                elif gm not in first_diff and not torch.equal(lg, eager_logits[i]):
                    first_diff[gm] = i
                t = int(lg.argmax())
            st = be.status()["graphs"]
            if gm == "exact":
                assert st["failures"] == 0, st
                assert st["captured"] > 0, st
        finally:
            be.close()
    assert len(runs["none"]) == n
    for gm in ("exact", "dynamic"):
        assert runs[gm] == runs["none"], f"{gm}: first differing token {next(i for i, (a, b) in enumerate(zip(runs[gm], runs['none'])) if a != b)}"
        assert gm not in first_diff, f"{gm}: logits not bitwise equal to eager from step {first_diff[gm]}"


@pytest.mark.parametrize("mode,G", [("int4", 32), ("int8", 64)])
def test_quant_prefill_dequant_scratch(mode, G):
    """Prefill on quantized weights (each matrix dequantized into the scratch when the forward reaches it; the last
    position's lm_head row, and every matrix of a one-token prompt run eagerly, by the quantized gemv) against
    the fp16 reference decoder on a copy of the weights dequantized up front. Both use the same exact values
    (rounded once to fp16 where dequantized), but sum in other orders (cuBLAS + our attention against torch's
    matmul + SDPA): the fp16 prefill tests' bound (tests/gpu/test_step.py, 1e-2; an H100 run measured 2.2e-3
    here), and the same argmax unless the top two are within that bound."""
    import dataclasses
    from server.cuda_backend import CudaBackend
    from server.kv import KVArena
    from server.model.weights import LayerWeights
    from server.reference import ReferenceDecoder
    model = quant_model("smollm2-135m", mode, G)
    w = model.weights

    def d(m):
        return dequantize(m).half() if isinstance(m, QuantLinear) else m
    layers = [LayerWeights(**{k: d(getattr(lw, k)) for k in LayerWeights.__dataclass_fields__}) for lw in w.layers]
    wr = dataclasses.replace(w, layers=layers, lm_head=d(w.lm_head))
    ref = ReferenceDecoder(wr, KVArena(model.cfg, 1, w.dtype, "cuda"), compute_dtype=torch.float16)
    be = CudaBackend(model, sessions=1, graph_mode="none")
    pg = be.prefill_graphs
    try:
        for n, graphs in ((1, False), (1, True), (5, True), (37, True), (200, True), (37, False)):
            ids = _ids(model.cfg.vocab_size, n, n)
            be.prefill_graphs = pg if graphs else None
            got = be.prefill(0, ids)
            want = ref.prefill(0, ids).float().cpu()
            e = float((got.double() - want.double()).norm() / want.double().norm())
            assert e < 1e-2, f"prefill of {n} tokens (graphs {graphs}): rel err {e:.2e} against the up-front dequantized weights"
            a, b = int(got.argmax()), int(want.argmax())
            assert a == b or abs(float(want[a] - want[b])) < 1e-2 * float(want.abs().max()), (n, a, b)
    finally:
        be.close()


def test_builtin_gguf_on_cuda_matches_dequant_oracle():
    """The built-in model as the README's first command runs it on a GPU: the real SmolLM2 GGUF with its own Q4_1
    layers (int4 G32) and Q8_0 lm_head (int8 G32), every matrix read by the quantized kernels. Teacher-forced over
    the committed text (tests/data/quant_text.txt) against the fp32 reference on the file's exact dequantized
    values: test_step.py's fp16 bound per step and the same argmax except at fp16 near-ties; then greedy through
    device sampling == the host argmax of our own steps, and exact graphs == eager bitwise."""
    from transformers import AutoTokenizer
    from server.cuda_backend import CudaBackend
    from server.model.resolve import resolve_model
    from tests.gpu.test_step import shared_prefill, teacher_forced
    model = resolve_model("smollm2", "float16", "cuda", max_seq=1024)
    assert isinstance(model.weights.layers[0].w_qkv, QuantLinear) and model.weights.layers[0].w_qkv.mode == "int4"
    assert isinstance(model.weights.lm_head, QuantLinear) and model.weights.lm_head.mode == "int8"
    text = (Path(__file__).resolve().parents[1] / "data" / "quant_text.txt").read_text()
    ids = AutoTokenizer.from_pretrained(str(model.tokenizer_dir))(text)["input_ids"][:264]
    prompt, feed = ids[:8], ids[8:]
    be = CudaBackend(model, sessions=1, graph_mode="none")
    try:
        assert be.status()["quant"] == "int4+int8"
        ref = dequant_oracle(model)
        shared_prefill(be, ref, 0, prompt)
        teacher_forced(be, ref, feed, "built-in GGUF")
        tok = int(be.prefill(0, prompt).argmax())
        host, t = [], tok
        for _ in range(48):
            t = int(be.step(0, t).argmax())
            host.append(t)
        be.prefill(0, prompt)
        assert be.generate(0, tok, 48, _greedy()) == host
    finally:
        be.close()
    be = CudaBackend(model, sessions=1, graph_mode="exact")
    try:
        tok = int(be.prefill(0, prompt).argmax())
        be.bg_capture_start(0, 64)
        be.wait_precapture(0, 32, 120.0)
        assert be.generate(0, tok, 48, _greedy()) == host
        assert be.status()["graphs"]["failures"] == 0
    finally:
        be.close()
