"""GGUF files beyond plain llama on the cuda backend (tests/test_gguf_arch.py on the CPU): a Qwen2 GGUF (q/k/v
biases, q/k rows as llama.cpp writes them for qwen2, i.e. not permuted) and a Llama-3.1-style GGUF (architecture
llama with a rope_freqs tensor: the per-pair factors reach the kernels through the arena's cos/sin tables), each
as F16 (dequantized into the fp16 arena) and as Q8_0 (the file's blocks repacked into int8 QuantLinears), written
by tests/test_gguf_arch.py's `write_hf_gguf` from a tiny random HF model built by transformers.

The oracle and the checks are tests/gpu/test_architectures_gpu.py's `_compare`: the fp32 ReferenceDecoder on the
same weights (tables included), 40 teacher-forced steps within the fp16 bound in every graph mode, then greedy
through device sampling equal in the three graph modes. That the CPU reference itself equals HF on these files
is tests/test_gguf_arch.py's business."""
import pytest
import torch

from tests.gpu.test_architectures_gpu import LLAMA3, SHAPE, _compare
from tests.test_gguf_arch import hf_model, llama3_rope_factors, write_hf_gguf

pytestmark = pytest.mark.gpu
CASES = {"qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
         "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
         "llama3": ("llama", dict(rope_parameters=LLAMA3, tie_word_embeddings=False))}
MAX_SEQ = 128


@pytest.mark.parametrize("name,qtype", [("qwen2-tied", "F16"), ("qwen2-untied", "Q8_0"), ("llama3", "F16"),
                                        ("llama3", "Q8_0")])
def test_cuda_gguf_matches_reference(tmp_path, monkeypatch, name, qtype):
    from server.backends import cuda_refusal
    from server.model.quant import QuantLinear
    from server.model.resolve import resolve_model
    monkeypatch.setenv("CASE4_HOME", str(tmp_path / "home"))  # the file's tokenizer is converted there
    kind, extra = CASES[name]
    m = hf_model(kind, 200 + len(name), SHAPE, **extra)
    path = tmp_path / f"{name}-{qtype}.gguf"
    write_hf_gguf(path, m, qtype, llama3_rope_factors(m.config) if kind == "llama" else None)
    model = resolve_model(str(path), "float16", "cuda", max_seq=MAX_SEQ)
    w = model.weights
    assert cuda_refusal(model.cfg) is None
    assert bool(w.b_qkv) == (kind == "qwen2") and len(model.cfg.rope_freq_factors) == (32 if kind == "llama" else 0)
    assert isinstance(w.layers[0].w_qkv, QuantLinear) == (qtype == "Q8_0")
    _compare(model, f"{name} {qtype}")


@pytest.mark.parametrize("kind", ["Q4_K", "Q5_K", "Q6_K"])
def test_kquants_on_gpu_equal_package(kind):
    """A cuda load dequantizes llama.cpp's K-quants on the GPU (server/model/kquants.py): the values of random
    blocks (Inf and NaN scales included) equal the gguf package's numpy bit for bit, as on the CPU."""
    from tests.test_gguf import kquant_check
    kquant_check(kind, "cuda", 27)


def test_kquant_gguf_cuda_load_dequantizes_on_gpu(tmp_path, monkeypatch):
    """load_gguf on cuda: the tiny llama GGUF with every ffn_down in Q4_K and Q6_K (test_gguf.py's file) goes
    through kquants on the GPU, not the package (its dequantize is watched), and the fp16 arena holds the package's
    values rounded once to fp16, bit for bit."""
    import gguf.quants
    from server.model.gguf import GGUFFile, load_gguf, schemes_for
    from tests.test_gguf import gguf_values, write_llama_gguf
    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, t: (seen.append(t.name), real(data, t))[1])
    for kind in ("Q4_K", "Q6_K"):
        p = tmp_path / f"{kind}.gguf"
        write_llama_gguf(p, {"ffn_down": kind, "token_embd": "Q8_0"}, tied=True)
        f = GGUFFile(p)
        w = load_gguf(f, f.cfg, torch.float16, "cuda", schemes_for(f, None, None))
        assert kind not in seen
        for layer in (0, 1):
            want = gguf_values(p, f"blk.{layer}.ffn_down.weight").half()
            got = w.layers[layer].w_down
            assert got.device.type == "cuda" and torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("quant,group,kind", [("int4", 32, "Q4_K"), ("int8", None, "Q6_K")])
def test_kquant_gguf_requantized_on_gpu_equals_cpu(tmp_path, monkeypatch, quant, group, kind):
    """--quant int4/int8 on a K-quant GGUF, loaded for cuda: the round-to-nearest source is dequantized and rounded
    on the GPU (kquants, quantize_rtn on the arena's device; the package's dequantize is never called for the
    K-quant), and every QuantLinear equals the CPU load's (the package's values, rounded on the CPU) bit for bit.
    The file: test_gguf.py's tiny llama, every ffn_down (K = 256, the only K-quantizable one) in `kind`."""
    import gguf.quants
    from server.model.gguf import GGUFFile, load_gguf, schemes_for
    from server.model.quant import QuantLinear
    from server.model.weights import MATRICES
    from tests.test_gguf import write_llama_gguf
    p = tmp_path / "kq.gguf"
    write_llama_gguf(p, {"ffn_down": kind, "token_embd": "Q8_0"}, tied=True)
    f = GGUFFile(p)
    schemes = schemes_for(f, quant, group)
    cpu = load_gguf(f, f.cfg, torch.float16, "cpu", schemes)
    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, t: (seen.append(t.name), real(data, t))[1])
    gpu = load_gguf(f, f.cfg, torch.float16, "cuda", schemes)
    assert kind not in seen
    pairs = [(getattr(lc, m), getattr(lg, m)) for lc, lg in zip(cpu.layers, gpu.layers) for m in MATRICES]
    assert len(pairs) == 4 * f.cfg.num_layers
    for a, b in pairs + [(cpu.lm_head, gpu.lm_head)]:
        assert isinstance(a, QuantLinear) and isinstance(b, QuantLinear) and b.q.device.type == "cuda"
        for x, y in ((a.q, b.q), (a.scale, b.scale), (a.minv, b.minv)):
            assert (x is None) == (y is None)
            if x is not None:
                assert torch.equal(x, y.cpu()), "the GPU's rounding differs from the CPU's"
