"""Issue 28 item 3 on the GPU: the cuda backend against the reference on the LLaMA-family variants it runs, each
a tiny random HF folder built here with transformers (as tests/test_architectures.py on the CPU), in every graph
mode: Llama-3.x RoPE scaling (llama3, linear, dynamic: the kernels read RoPE from the arena's tables), Mistral with
a sliding window that covers the whole context (cuda_refusal admits it: inside the window the window changes
nothing), plain Llama-2, and Qwen2 with its q/k/v biases (tied and untied embeddings; the QKV gemv adds the bias
before its one rounding and RoPE runs in attention), also quantized (int8, int4: the quantized QKV's bias) and on
the cuBLAS path. Mistral and Qwen2 with a window shorter than the context are refused by the cuda backend
(tests/test_architectures.py checks the refusal and auto's choice).

The oracle is the fp32 ReferenceDecoder on the same fp16 weights (tests/gpu/test_step.py's; on a quantized model
each QuantLinear enters as its exact fp32 values): after a shared prefill (the oracle's KV rows copied in), 40
teacher-forced steps each within test_step.py's fp16 bound and with the same argmax except at fp16 near-ties;
then greedy through device sampling equal in the three graph modes. The Qwen2 biases are drawn ~N(0, 0.5) (HF
initialises them to 0), as large as the projections' outputs, so a step that dropped them would be far off the
oracle."""
import random

import pytest
import torch

from tests.gpu.test_step import oracle, shared_prefill, teacher_forced

pytestmark = pytest.mark.gpu
SHAPE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
             initializer_range=0.05)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 10000.0}
CASES = {
    "llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=500000.0)),
    "dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral-window-covers": ("mistral", dict(sliding_window=256)),
    "llama2": ("llama", dict()),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
}
MAX_SEQ = 128


@pytest.fixture(scope="module")
def folders(tmp_path_factory, byte_level_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    out = {}
    for i, (name, (kind, extra)) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        cfg = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**SHAPE, **extra)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if pname.endswith(".bias"):  # HF initialises biases to 0: make them count
                    p.normal_(0.0, 0.5)
        folder = tmp_path_factory.mktemp(name)
        m.save_pretrained(str(folder))
        byte_level_tokenizer(folder)
        out[name] = folder
    return out


def _greedy():
    from case4_sampling import SamplingParams
    return SamplingParams()


def _compare(model, what: str, graph_modes=("none", "exact", "dynamic"), gemm: str = "custom"):
    """Teacher-forced against the fp32 oracle in each graph mode, then greedy through device sampling equal in all
    of them."""
    from server.cuda_backend import CudaBackend
    r = random.Random(7)
    prompt = [256] + [r.randrange(3, 256) for _ in range(15)]
    feed = [r.randrange(3, 256) for _ in range(40)]
    greedy = {}
    for gm in graph_modes:
        be = CudaBackend(model, sessions=1, graph_mode=gm, gemm=gemm)
        try:
            ref = oracle(be.model)
            shared_prefill(be, ref, 0, prompt)
            if gm == "exact":
                be.bg_capture_start(0, 64)
                be.wait_precapture(0, 16, 120.0)
            replay = None if gm == "none" else (lambda t: be.replay(0, be.seq_len(0), t))
            teacher_forced(be, ref, feed, f"{what} {gm}", step=replay)
            tok = int(be.prefill(0, prompt).argmax())
            if gm == "exact":
                be.wait_precapture(0, 16, 120.0)
            greedy[gm] = be.generate(0, tok, 48, _greedy())
            if gm == "exact":
                assert be.status()["graphs"]["failures"] == 0
        finally:
            be.close()
    assert all(g == greedy[graph_modes[0]] for g in greedy.values()), greedy


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference_in_every_graph_mode(folders, name):
    from server.backends import cuda_refusal
    from server.model.resolve import resolve_model
    model = resolve_model(str(folders[name]), "float16", "cuda", max_seq=MAX_SEQ)
    assert cuda_refusal(model.cfg) is None
    assert bool(model.weights.b_qkv) == name.startswith("qwen2")
    _compare(model, name)


@pytest.mark.parametrize("name,quant", [("qwen2-untied", "int8"), ("qwen2-untied", "int4")])
def test_cuda_quantized_qwen2_matches_reference(folders, name, quant):
    """The quantized decode path (quant_layer: the QKV's bias in the quantized gemv's store epilogue) against the
    oracle on the same quantized weights, in every graph mode. (Untied only: --quant on a tied HF folder looks for
    an lm_head.weight the folder does not store, for any architecture.)"""
    from server.model.resolve import resolve_model
    from server.model.quant import QuantLinear
    model = resolve_model(str(folders[name]), "float16", "cuda", max_seq=MAX_SEQ, quant=quant)
    w = model.weights
    assert w.b_qkv and isinstance(w.layers[0].w_qkv, QuantLinear) and w.layers[0].w_qkv.mode == quant
    _compare(model, f"{name} {quant}")


def test_cuda_qwen2_cublas_path_matches_reference(folders):
    """gemm="cublas" (the A/B path): the bias copied into qkv, then cublasGemmEx with beta = 1."""
    from server.model.resolve import resolve_model
    model = resolve_model(str(folders["qwen2-untied"]), "float16", "cuda", max_seq=MAX_SEQ)
    _compare(model, "qwen2-untied cublas", graph_modes=("none", "exact"), gemm="cublas")


def test_cuda_qwen2_bias_counts(folders):
    """After a shared prefill, each of 8 decode steps is within the fp16 bound of the oracle with the q/k/v biases
    and far outside it of the oracle without them (fed the same KV rows): so the tests above would catch a step that
    dropped the bias. (These steps on a CPU: the fp16 torch path is 0.14-0.22 relative off the oracle without the
    biases and within 9e-4 of the one with them.)"""
    import dataclasses
    from server.cuda_backend import CudaBackend
    from server.kv import KVArena
    from server.model.resolve import resolve_model
    from server.reference import ReferenceDecoder
    from tests.gpu.test_step import TOL, rel
    model = resolve_model(str(folders["qwen2-untied"]), "float16", "cuda", max_seq=MAX_SEQ)
    w = model.weights
    nob = ReferenceDecoder(dataclasses.replace(w, b_qkv=[torch.zeros_like(b) for b in w.b_qkv]),
                           KVArena(model.cfg, 1, w.dtype, "cuda"), compute_dtype=torch.float32)
    be = CudaBackend(model, sessions=1, graph_mode="none")
    try:
        ref = oracle(model)
        prompt = [256, 40, 41, 42, 43, 44, 45, 46]
        shared_prefill(be, ref, 0, prompt)
        nob.prefill(0, prompt)
        for t in range(50, 58):
            nob.kv.kv.copy_(ref.kv.kv)  # the oracle's rows, as the backend's (rows < T; the step writes row T)
            out, want, wrong = be.step(0, t).clone(), ref.step(0, t), nob.step(0, t)
            assert rel(out, want) < TOL["float16"], f"token {t}: off the oracle by {rel(out, want):.2e}"
            assert rel(out, wrong) > 2.5 * TOL["float16"], f"token {t}: the biases change only {rel(out, wrong):.2e}"
    finally:
        be.close()
