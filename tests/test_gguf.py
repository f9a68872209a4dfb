"""GGUF files as they are (issue 26): small llama GGUFs written here with gguf.GGUFWriter and
gguf.quants.quantize; Q8_0 / Q4_0 / Q4_1 blocks repacked into QuantLinear must dequantize bitwise to
what gguf.quants.dequantize gives (after transformers' own Q/K row un-permutation), the reference
backend on the file must equal transformers' own GGUF load, other tensor types are dequantized with
one line, and bad files exit 2 with one line naming the file. The built-in smollm2 (the real Q4_1
file) against transformers' load of the same file closes it."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from server.kv import KVArena
from server.model.config import SYNTHETIC_SHAPES
from server.model.quant import QuantLinear, dequantize
from server.reference import ReferenceDecoder

ROOT = Path(__file__).resolve().parent.parent
CFG = SYNTHETIC_SHAPES["tiny"]  # V 512, H 128, I 256, 2 layers, 4 heads, 2 KV heads, D 32


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute (HF rows -> GGUF rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_tokens(V: int) -> list[str]:
    """GPT-2's byte-level BPE symbols for bytes 0..255 (token id = byte value), one merge, placeholders up to V."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    sym = dict(zip(bs, map(chr, cs)))
    # two merges (" t", " a"): transformers 5.17's GGUF reader takes a one-element merges array for a string
    return [sym[i] for i in range(256)] + ["Ġt"] + [f"<extra_{i}>" for i in range(V - 258)] + ["Ġa"]


MERGES = ["Ġ t", "Ġ a"]


def write_llama_gguf(path: Path, types: dict[str, str], seed=0, arch="llama", tied=True,
                     tokenizer=False) -> dict[str, np.ndarray]:
    """A tiny llama GGUF: each matrix quantized to types.get(kind, 'Q4_1') (kind: attn_q, ffn_down, ...,
    token_embd, output). Returns the fp32 HF-order matrices written (before quantization). tokenizer: a
    byte-level BPE vocabulary in the metadata (tokenizer.ggml.*), so that the file loads as a whole model."""
    import gguf
    rng = np.random.default_rng(seed)
    H, I, V, L = CFG.hidden_size, CFG.intermediate_size, CFG.vocab_size, CFG.num_layers
    w = gguf.GGUFWriter(str(path), arch)
    if tokenizer:
        toks = _byte_level_tokens(V)
        w.add_tokenizer_model("gpt2"), w.add_token_list(toks), w.add_token_merges(MERGES)
        w.add_token_types([1] * 256 + [3] * (V - 256))
    w.add_block_count(L), w.add_context_length(512), w.add_embedding_length(H), w.add_feed_forward_length(I)
    w.add_head_count(CFG.num_heads), w.add_head_count_kv(CFG.num_kv_heads), w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(V), w.add_rope_dimension_count(CFG.head_dim)
    w.add_bos_token_id(256), w.add_eos_token_id(257)
    hf = {}

    def put(name: str, kind: str, arr: np.ndarray):
        t = types.get(kind, "Q4_1") if arr.ndim == 2 else "F32"
        qt = gguf.GGMLQuantizationType[t]
        if t == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif t == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif t in KQUANT_D:  # the gguf package has no quantize for K-quants: random blocks, moderate scales
            w.add_tensor(name, kquant_blocks(arr.shape, t, float(arr.std()), rng), raw_dtype=qt)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)

    def mat(n, k, std):  # per-row spreads vary so that blocks get different scales
        return (rng.standard_normal((n, k)) * std * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)

    put("token_embd.weight", "token_embd", mat(V, H, 4 / H ** 0.5))
    if not tied:
        put("output.weight", "output", mat(V, H, 4 / H ** 0.5))
    put("output_norm.weight", "", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
    for l in range(L):
        p = f"blk.{l}."
        q, k = mat(CFG.q_dim, H, H ** -0.5), mat(CFG.kv_dim, H, H ** -0.5)
        hf[f"{l}.q"], hf[f"{l}.k"] = q, k
        put(p + "attn_q.weight", "attn_q", _permute(q, CFG.num_heads))
        put(p + "attn_k.weight", "attn_k", _permute(k, CFG.num_kv_heads))
        put(p + "attn_v.weight", "attn_v", mat(CFG.kv_dim, H, H ** -0.5))
        put(p + "attn_output.weight", "attn_output", mat(H, CFG.q_dim, CFG.q_dim ** -0.5))
        put(p + "ffn_gate.weight", "ffn_gate", mat(I, H, H ** -0.5))
        put(p + "ffn_up.weight", "ffn_up", mat(I, H, H ** -0.5))
        put(p + "ffn_down.weight", "ffn_down", mat(H, I, I ** -0.5))
        put(p + "attn_norm.weight", "", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
        put(p + "ffn_norm.weight", "", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return hf


# K-quant blocks (256 values): the byte offsets of their fp16 super-block scales (Q4_K: d, dmin; Q6_K: d) and the
# scale that keeps the values about `std` (a 6-bit sub-block scale times a 4-bit / signed 6-bit integer)
KQUANT_D = {"Q4_K": ((0, 2), 1 / 240), "Q6_K": ((208,), 1 / 1000)}


def kquant_blocks(shape: tuple[int, int], t: str, std: float, rng) -> np.ndarray:
    """Random Q4_K / Q6_K rows of `shape` (k a multiple of 256): random bytes, the super-block scales set to
    std * KQUANT_D's factor (finite, so every value is)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
    n, k = shape
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    offs, f = KQUANT_D[t]
    d = np.frombuffer(np.float16(std * f).tobytes(), dtype=np.uint8)
    for o in offs:
        raw[:, :, o:o + 2] = d
    return raw.reshape(n, k // block * size)


def gguf_values(path: Path, name: str) -> torch.Tensor:
    """The gguf package's dequantization of a tensor, rows un-permuted by transformers' own code."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == name)
    v = gguf.quants.dequantize(t.data, t.tensor_type)
    cfg = {"num_attention_heads": CFG.num_heads, "num_key_value_heads": CFG.num_kv_heads}
    v = LlamaTensorProcessor(config=cfg).process(v, name).weights
    return torch.from_numpy(np.array(v, dtype=np.float32))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_blocks_repack_bitwise(tmp_path, qtype):
    from server.model.gguf import GGUFFile
    path = tmp_path / f"m-{qtype}.gguf"
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd")
    write_llama_gguf(path, {k: qtype for k in kinds}, seed=len(qtype) + ord(qtype[1]))
    f = GGUFFile(path)
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
        ql = f.quant(name)
        assert isinstance(ql, QuantLinear) and ql.group == 32 and ql.mode == ("int8" if qtype == "Q8_0" else "int4")
        want = gguf_values(path, name)
        got = dequantize(ql)
        assert got.shape == want.shape and torch.equal(got, want), name
        assert torch.equal(f.dense(name), want), name  # the dense path (an fp16 embedding) takes the same values
        # bitwise too, but for the sign of zero: Q4_0's (8 - 8) * d is -0.0 when d < 0, where
        # our nib * d + (-8 d) = 8 d - 8 d gives +0.0 (the same value; no product can differ)
        diff = got.view(torch.int32) != want.view(torch.int32)
        assert torch.all(want[diff] == 0) and (qtype == "Q4_0" or not diff.any()), name


@pytest.mark.parametrize("qtype,tied", [("Q4_1", True), ("Q4_0", False), ("Q8_0", True)])
def test_reference_on_gguf_equals_transformers_gguf_load(tmp_path, qtype, tied, capsys):
    """The whole tiny model: our load (repacked blocks, the reference's dequantized math) against
    transformers' own GGUF load of the same file (dequantized by gguf, its Q/K un-permutation). One
    matrix kind is F16 and the lm_head Q8_0: they take the dequantized path, saying so."""
    from transformers import AutoModelForCausalLM
    from server.model.gguf import GGUFFile, load_gguf, schemes_for
    path = tmp_path / "m.gguf"
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")
    write_llama_gguf(path, {**{k: qtype for k in kinds}, "ffn_down": "F16", "token_embd": "Q8_0",
                            "output": "Q4_1"}, tied=tied)
    f = GGUFFile(path)
    sch = schemes_for(f, None, None)
    assert "0.w_down" not in sch and sch["0.w_qkv"] == ("int8" if qtype == "Q8_0" else "int4", 32)
    assert sch["lm_head"] == ("int8" if tied else "int4", 32)
    err = capsys.readouterr().err
    assert "2 matrices of type F16 (0.w_down, 1.w_down) dequantized at load" in err
    assert "--quant int8|int4 re-quantizes the rest" in err  # the way to quantized speed, named
    w = load_gguf(f, f.cfg, torch.float32, "cpu", sch)
    assert isinstance(w.layers[1].w_qkv, QuantLinear) and not isinstance(w.layers[1].w_down, QuantLinear)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = [256, 5, 17, 300, 42, 7, 99, 12]
    dec = ReferenceDecoder(w, KVArena(f.cfg, 1, w.dtype, w.device))
    ours = torch.stack([dec.prefill(0, ids[:3])] + [dec.step(0, t) for t in ids[3:]])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, 2:]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # --quant none: everything dequantized, the same logits; int4 re-quantizes (different, close)
    wd = load_gguf(f, f.cfg, torch.float32, "cpu", schemes_for(f, "none", None))
    assert wd.qarena is None
    dd = ReferenceDecoder(wd, KVArena(f.cfg, 1, wd.dtype, wd.device))
    torch.testing.assert_close(dd.prefill(0, ids), ref[-1], atol=1e-4, rtol=1e-4)


def test_q4_0_scale_that_overflows_fp16_is_refused(tmp_path):
    """Q4_0's minimum -8 d does not fit fp16 when d > 8188 (nor do the weights): one line."""
    import gguf
    from case4_errors import BadInput
    from server.model.gguf import GGUFFile, load_gguf, schemes_for
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, {"attn_output": "Q4_0"})
    data = bytearray(path.read_bytes())
    t = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == "blk.0.attn_output.weight")
    off = int(t.data_offset)
    data[off:off + 2] = np.array([9000.0], dtype=np.float16).tobytes()  # block 0's d
    path.write_bytes(bytes(data))
    f = GGUFFile(path)
    with pytest.raises(BadInput, match="tensor 'blk.0.attn_output.weight' has a Q4_0 scale beyond 8188"):
        load_gguf(f, f.cfg, torch.float32, "cpu", schemes_for(f, None, None))


# ---------------------------------------------------------------------------------------
# bad files through the CLI: exit 2, one line naming the file

def run_cli(tmp_path, model, *flags):
    env = dict(os.environ, PYTHONUNBUFFERED="1", CASE4_HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--model", str(model), "--prompt", "hi",
                           "--max-tokens", "3", "--backend", "reference", "--output-dir", str(tmp_path / "out"),
                           *flags], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def error_line(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("case4: error:"), r.stderr
    return lines[0]


def test_bad_gguf_files_exit_2(tmp_path):
    arch = tmp_path / "gpt2.gguf"
    write_llama_gguf(arch, {}, arch="gpt2")
    line = error_line(run_cli(tmp_path, arch))
    assert f"{arch}: GGUF architecture 'gpt2' is not supported" in line, line
    good = tmp_path / "good.gguf"
    write_llama_gguf(good, {})
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    line = error_line(run_cli(tmp_path, cut))
    assert f"{cut}: " in line and ("truncated" in line or "not a readable GGUF" in line), line
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + os.urandom(64))
    line = error_line(run_cli(tmp_path, junk))
    assert f"{junk}: not a readable GGUF file" in line, line


@pytest.mark.parametrize("key", ["head_count", "embedding_length"])
def test_metadata_of_zero_is_refused(tmp_path, monkeypatch, key):
    """head_count 0 or embedding_length 0 was a ZeroDivisionError traceback (head_dim = H // heads)."""
    import gguf

    from case4_errors import BadInput
    from server.model.gguf import GGUFFile
    orig = getattr(gguf.GGUFWriter, "add_" + key)
    monkeypatch.setattr(gguf.GGUFWriter, "add_" + key, lambda self, v: orig(self, 0))
    path = tmp_path / "zero.gguf"
    write_llama_gguf(path, {})
    with pytest.raises(BadInput, match=rf"^{path}: metadata 'llama\.(attention\.)?{key}' must be a positive integer, got 0"):
        GGUFFile(path)


def test_case4_home_that_cannot_be_made_exits_2(tmp_path):
    """The GGUF's tokenizer is converted into $CASE4_HOME/tokenizers: a CASE4_HOME under a file was an
    OSError traceback from the server process (exit 1)."""
    good = tmp_path / "good.gguf"
    write_llama_gguf(good, {})
    (tmp_path / "home").write_text("a file, not a folder")
    line = error_line(run_cli(tmp_path, good))
    assert f"cannot make the model cache folder {tmp_path / 'home' / 'tokenizers'} (Not a directory)" in line, line
    assert "set CASE4_HOME to a writable folder" in line, line


def test_unit_errors(tmp_path):
    from case4_errors import BadInput
    from server.model.gguf import GGUFFile, schemes_for
    good = tmp_path / "good.gguf"
    write_llama_gguf(good, {})
    f = GGUFFile(good)
    with pytest.raises(BadInput, match=f"^{good}: --group-size applies to --quant int8/int4"):
        schemes_for(f, None, 64)
    nan = tmp_path / "nan.gguf"
    write_llama_gguf(nan, {})
    import gguf
    t = next(t for t in gguf.GGUFReader(str(nan)).tensors if t.name == "blk.1.ffn_up.weight")
    data = bytearray(nan.read_bytes())
    data[int(t.data_offset):int(t.data_offset) + 2] = np.array([np.nan], dtype=np.float16).tobytes()
    nan.write_bytes(bytes(data))
    from server.model.gguf import load_gguf
    f = GGUFFile(nan)
    with pytest.raises(BadInput, match=f"^{nan}: tensor 'blk.1.ffn_up.weight' holds NaN or Inf"):
        load_gguf(f, f.cfg, torch.float32, "cpu", schemes_for(f, None, None))


# ---------------------------------------------------------------------------------------
# the built-in model: the real Q4_1 file

def test_builtin_smollm2_runs_its_own_blocks(smollm2_hf):
    """The real file: layers int4 g32 (Q4_1 as it is), lm_head int8 g32 (the tied Q8_0 token_embd),
    a Q4_1 tensor bitwise = gguf's dequantization, and the reference's logits and greedy tokens =
    transformers' own GGUF load (smollm2_hf: prepare_smollm2's folder)."""
    from server.model.gguf import GGUFFile
    from server.model.resolve import resolve_model, smollm2_gguf
    m = resolve_model("smollm2", "float32", "cpu", max_seq=64)
    w = m.weights
    assert (w.quant, w.group, w.lm_head.mode, w.lm_head.group) == ("int4", 32, "int8", 32) and m.gguf == smollm2_gguf()
    assert not isinstance(w.embed, QuantLinear) and w.quant_bytes() < 100e6
    f = GGUFFile(smollm2_gguf())
    import gguf
    t = f.tensors["blk.3.attn_k.weight"]
    want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    want = torch.from_numpy(np.array(LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
                                     .process(want.numpy(), "blk.3.attn_k.weight").weights))
    got = dequantize(w.layers[3].w_qkv)[576:576 + 192]
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    ids = [1, 504, 3458, 282, 4649, 314, 253]
    dec = ReferenceDecoder(w, KVArena(m.cfg, 1, w.dtype, w.device))
    ours = [dec.prefill(0, ids)]
    toks = list(ids)
    for _ in range(6):
        toks.append(int(ours[-1].argmax()))
        ours.append(dec.step(0, toks[-1]))
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([toks])).logits[0, len(ids) - 1:]
    torch.testing.assert_close(torch.stack(ours), ref, atol=2e-4, rtol=1e-4)
    assert toks[len(ids):] == ref[:-1].argmax(-1).tolist()


def test_backend_auto_parses_a_gguf_once(tmp_path, monkeypatch):
    """`--backend auto` checks the config (server/backends.py load_config) before the load (resolve_model): with a
    GGUF both read the same parse (server/model/gguf.py open_gguf; the gguf package parses every metadata field
    at each GGUFReader, ~1.6 s for the built-in file). Counted on a tiny file through the server's own entry,
    load_backend; the loaded model equals a fresh load's; a file changed on disk is parsed again; the load drops
    the kept parse."""
    import os
    import gguf
    from server.backends import load_backend
    from server.model import gguf as g
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, {}, tokenizer=True)
    monkeypatch.setenv("CASE4_HOME", str(tmp_path / "home"))
    parses = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *a, **k):
            parses.append(a[0])
            super().__init__(*a, **k)
    load_backend({"model": str(path), "backend": "auto"}, "cpu", "float32")  # converts the tokenizer once (cached)
    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    model, backend = load_backend({"model": str(path), "backend": "auto"}, "cpu", "float32")
    assert backend.name == "reference" and len(parses) == 1, parses
    assert not g._opened  # the load dropped it
    fresh = g.load_gguf(g.GGUFFile(path), model.cfg, torch.float32, "cpu", g.schemes_for(g.GGUFFile(path), None, None))
    ids = [256, 5, 17]
    a = ReferenceDecoder(model.weights, KVArena(model.cfg, 1, torch.float32, "cpu")).prefill(0, ids)
    b = ReferenceDecoder(fresh, KVArena(model.cfg, 1, torch.float32, "cpu")).prefill(0, ids)
    assert torch.equal(a, b)
    parses.clear()
    first = g.open_gguf(path)
    assert g.open_gguf(path) is first and len(parses) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file changed on disk
    assert g.open_gguf(path) is not first and len(parses) == 2
    g.forget_gguf()


def _same_reader(a, b) -> None:
    assert list(a.fields) == list(b.fields)
    for k in a.fields:
        fa, fb = a.fields[k], b.fields[k]
        assert fa.types == fb.types and fa.contents() == fb.contents(), k
    assert [(t.name, t.tensor_type, list(t.shape), t.n_elements, t.data_offset) for t in a.tensors] == \
        [(t.name, t.tensor_type, list(t.shape), t.n_elements, t.data_offset) for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.data.dtype == tb.data.dtype and np.array_equal(ta.data, tb.data), ta.name


def test_read_gguf_equals_the_package_reader(tmp_path):
    """server/model/gguf.py read_gguf (the gguf package's GGUFReader over a plain array of the file's map instead
    of an np.memmap: 3x faster on the built-in file's vocabulary) against the unchanged GGUFReader: the same fields
    (types and contents), tensors (name, type, shape, offset, every byte), on the built-in SmolLM2 file and on a
    tiny file with a tokenizer; the reader module's numpy restored after each call; a truncated and a junk file
    fail as the package's reader fails, and exit 2 through the CLI (test_bad_gguf_files_exit_2)."""
    import gguf
    from gguf import gguf_reader
    from server.model.gguf import read_gguf
    from server.model.resolve import smollm2_gguf
    tiny = tmp_path / "t.gguf"
    write_llama_gguf(tiny, {"ffn_down": "F16"}, tokenizer=True)
    for path in (smollm2_gguf(), tiny):
        fast = read_gguf(path)
        assert gguf_reader.np is np and not isinstance(fast.data, np.memmap)
        _same_reader(fast, gguf.GGUFReader(str(path)))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:5000])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(64)))
    for bad in (cut, junk, tmp_path / "empty.gguf"):
        bad.touch()
        errs = []
        for read in (read_gguf, lambda p: gguf.GGUFReader(str(p))):
            try:
                read(bad)
                errs.append(None)
            except Exception as e:  # noqa: BLE001
                errs.append((type(e), str(e)))
        assert errs[0] == errs[1] and errs[0] is not None, (bad.name, errs)
        assert gguf_reader.np is np


def test_tokenizer_conversion_reads_the_open_file(tmp_path, monkeypatch):
    """tokenizer_dir hands transformers the reader the GGUFFile already holds (_SharedReader) instead of letting it
    parse the file again (10 of the built-in file's 15 s on the CPU): the folder's files equal those of transformers'
    own conversion byte for byte, the package's GGUFReader is not constructed during it, and gguf.GGUFReader is what
    it was after it, a failed conversion included (one line, WeightLoadError)."""
    import gguf
    from transformers import AutoTokenizer
    from server.model.gguf import GGUFFile, tokenizer_dir
    from server.model.weights import WeightLoadError
    path = tmp_path / "m.gguf"
    write_llama_gguf(path, {}, tokenizer=True)
    f = GGUFFile(path)
    made = []

    class Counting(gguf.GGUFReader):
        def __init__(self, *a, **k):
            made.append(a[0])
            super().__init__(*a, **k)
    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    ours = tokenizer_dir(f, tmp_path / "cache")
    assert made == [] and gguf.GGUFReader is Counting
    AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name).save_pretrained(str(tmp_path / "own"))
    assert made == [str(path)]
    names = sorted(q.name for q in ours.iterdir())
    assert "tokenizer.json" in names and names == sorted(q.name for q in (tmp_path / "own").iterdir())
    for n in names:
        assert (ours / n).read_bytes() == (tmp_path / "own" / n).read_bytes(), n

    def broken(*a, **k):
        raise RuntimeError("no tokenizer here")
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(WeightLoadError, match="its tokenizer could not be read"):
        tokenizer_dir(f, tmp_path / "cache2")
    assert gguf.GGUFReader is Counting and list((tmp_path / "cache2").iterdir()) == []  # its temporary removed


def kquant_check(kind: str, device: str, seed: int) -> None:
    """server/model/kquants.py (the K-quant dequantization of a cuda load) against the gguf package's numpy on
    random rows of `kind`: every byte random, so the fp16 super-block scales include subnormals, Inf and NaN.
    Equal bit for bit wherever the package's value is not NaN, NaN where it is (a NaN's payload is the
    hardware's); the same with the work cut into chunks of 7 blocks."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES
    from server.model import kquants
    size = GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
    raw = np.random.default_rng(seed).integers(0, 256, (37, 5 * size), dtype=np.uint8)
    want = torch.from_numpy(np.array(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]), np.float32))
    assert want.shape == (37, 5 * 256) and bool(torch.isfinite(want).any()) and bool(torch.isnan(want).any())
    for chunk in (1 << 16, 7):
        got = kquants.dequantize(raw, kind, device, chunk_blocks=chunk)
        assert got.device.type == torch.device(device).type and got.dtype == torch.float32
        got = got.cpu()
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan), kind
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32)), kind


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquants_equal_package(kind):
    kquant_check(kind, "cpu", 26)


def test_k_quant_matrices_load_dequantized(tmp_path, capsys):
    """The files most users hold (llama.cpp's Q4_K_M) are K-quants: Q4_K and Q6_K blocks of 256. They are
    dequantized at load by the gguf package (one line naming the type and the matrices), the rest of the file as
    it is: the tiny model with every ffn_down (K = 256, the only rows long enough) in Q4_K, then in Q6_K, against
    transformers' own GGUF load of the same file, and the matrix values against the package's dequantization."""
    from transformers import AutoModelForCausalLM
    from server.model.gguf import GGUFFile, load_gguf, schemes_for
    for kind in ("Q4_K", "Q6_K"):
        p = tmp_path / f"{kind}.gguf"
        write_llama_gguf(p, {"ffn_down": kind, "token_embd": "Q8_0"}, tied=True)
        f = GGUFFile(p)
        sch = schemes_for(f, None, None)
        assert "0.w_down" not in sch and sch["0.w_qkv"] == ("int4", 32)
        assert f"2 matrices of type {kind} (0.w_down, 1.w_down) dequantized at load" in capsys.readouterr().err
        w = load_gguf(f, f.cfg, torch.float32, "cpu", sch)
        want = gguf_values(p, "blk.1.ffn_down.weight")
        assert torch.isfinite(want).all() and 0.2 < float(want.std()) / (CFG.intermediate_size ** -0.5) < 5
        assert torch.equal(w.layers[1].w_down, want)
        hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=p.name, dtype=torch.float32).eval()
        ids = [256, 5, 17, 300, 42, 7]
        dec = ReferenceDecoder(w, KVArena(f.cfg, 1, w.dtype, w.device))
        ours = torch.stack([dec.prefill(0, ids[:3])] + [dec.step(0, t) for t in ids[3:]])
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, 2:]
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
