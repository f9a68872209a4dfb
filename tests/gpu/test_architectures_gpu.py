"""Issue 28 item 3 on the GPU: the cuda backend against the reference on the LLaMA-family variants it runs, each
a tiny random HF folder built here with transformers (as tests/test_architectures.py on the CPU), in every graph
mode: Llama-3.x RoPE scaling (llama3, linear, dynamic: the kernels read RoPE from the arena's tables), Mistral with
a sliding window that covers the whole context (cuda_refusal admits it: inside the window the window changes
nothing), plain Llama-2. Qwen2 (q/k/v biases) and Mistral with a window shorter than the context are refused by the
cuda backend (tests/test_architectures.py checks the refusal and auto's choice).

The oracle is the fp32 ReferenceDecoder on the same fp16 weights (tests/gpu/test_step.py's): after a shared
prefill (the oracle's KV rows copied in), 40 teacher-forced steps each within test_step.py's fp16 bound and with
the same argmax except at fp16 near-ties; then greedy through device sampling equal in the three graph modes."""
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
}
MAX_SEQ = 128


@pytest.fixture(scope="module")
def folders(tmp_path_factory, byte_level_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    out = {}
    for i, (name, (kind, extra)) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        cfg = {"llama": LlamaConfig, "mistral": MistralConfig}[kind](**SHAPE, **extra)
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        folder = tmp_path_factory.mktemp(name)
        m.save_pretrained(str(folder))
        byte_level_tokenizer(folder)
        out[name] = folder
    return out


def _greedy():
    from case4_sampling import SamplingParams
    return SamplingParams()


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_reference_in_every_graph_mode(folders, name):
    from server.backends import cuda_refusal
    from server.cuda_backend import CudaBackend
    from server.model.resolve import resolve_model
    model = resolve_model(str(folders[name]), "float16", "cuda", max_seq=MAX_SEQ)
    assert cuda_refusal(model.cfg) is None
    r = random.Random(7)
    prompt = [256] + [r.randrange(3, 256) for _ in range(15)]
    feed = [r.randrange(3, 256) for _ in range(40)]
    greedy = {}
    for gm in ("none", "exact", "dynamic"):
        be = CudaBackend(model, sessions=1, graph_mode=gm)
        try:
            ref = oracle(be.model)
            shared_prefill(be, ref, 0, prompt)
            if gm == "exact":
                be.bg_capture_start(0, 64)
                be.wait_precapture(0, 16, 120.0)
            replay = None if gm == "none" else (lambda t: be.replay(0, be.seq_len(0), t))
            teacher_forced(be, ref, feed, f"{name} {gm}", step=replay)
            tok = int(be.prefill(0, prompt).argmax())
            if gm == "exact":
                be.wait_precapture(0, 16, 120.0)
            greedy[gm] = be.generate(0, tok, 48, _greedy())
            if gm == "exact":
                assert be.status()["graphs"]["failures"] == 0
        finally:
            be.close()
    assert greedy["exact"] == greedy["none"] and greedy["dynamic"] == greedy["none"], greedy
