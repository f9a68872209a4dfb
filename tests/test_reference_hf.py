"""The reference decoder against HF transformers: real SmolLM2 weights (fp32) and synthetic
shapes built from the same random weights (MHA/GQA, tied/untied, partial rotary, fp32/bf16)."""
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.model.config import SYNTHETIC_SHAPES
from server.model.weights import synthetic_weights
from server.kv import KVArena
from server.model.resolve import LoadedModel
from server.reference import ReferenceDecoder

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from parity import BOUNDS, TIE_REL, compare, hf_model_for, hf_stages, run_parity  # noqa: E402  (a debugging tool)


@pytest.mark.parametrize("steps", [1, 8])
def test_smollm2_stage_parity(smollm2_dir, steps):
    rows, ok = run_parity("smollm2", steps)
    assert ok, rows
    names = [r[0].split(" ")[0] for r in rows]
    for stage in ("q", "k", "v", "ctx", "attn_out", "mlp", "final_hidden", "logits"):
        assert stage in names


def _greedy_reference(model, ids, n):
    kv = KVArena(model.cfg, 1, model.weights.dtype)
    dec = ReferenceDecoder(model.weights, kv)
    logits = dec.prefill(0, ids)
    out = []
    for _ in range(n):
        tok = int(logits.argmax())
        out.append(tok)
        logits = dec.step(0, tok)
    return out


def _greedy_hf(hf, ids, n):
    """HF greedy decoding with its own KV cache, EOS not special (64 tokens whatever comes)."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = hf(x, past_key_values=past, use_cache=True)
            past = r.past_key_values
            out.append(int(r.logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.mark.parametrize("which", ["plain0", "plain1", "chat"])
def test_smollm2_greedy_64_tokens(smollm2_fp32, smollm2_hf, which):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(smollm2_fp32.tokenizer_dir))
    if which == "chat":
        ids = tok.apply_chat_template([{"role": "user", "content": "What is the tallest mountain on Earth?"}],
                                      add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    else:
        ids = tok(PROMPTS[int(which[-1])])["input_ids"]
    hf_out = _greedy_hf(smollm2_hf, ids, 64)
    assert _greedy_reference(smollm2_fp32, ids, 64) == hf_out


def _variant(name):
    base = SYNTHETIC_SHAPES["tiny"]
    return {
        "gqa-untied": base,
        "mha-untied": SYNTHETIC_SHAPES["tiny-mha"],
        "gqa-tied": replace(base, tie_word_embeddings=True),
        "mha-tied": replace(SYNTHETIC_SHAPES["tiny-mha"], tie_word_embeddings=True),
        "partial-rotary": SYNTHETIC_SHAPES["tiny-partial"],
    }[name]


@pytest.fixture
def partial_rotary_hf(monkeypatch):
    """HF Llama rotates the whole head; for partial rotary use the StableLM/NeoX scheme
    (rotate the first R dims with HF's own rotate_half, pass the rest through)."""
    import transformers.models.llama.modeling_llama as ml
    orig = ml.apply_rotary_pos_emb

    def partial(q, k, cos, sin, unsqueeze_dim=1):
        R = cos.shape[-1]
        qr, kr = orig(q[..., :R], k[..., :R], cos, sin, unsqueeze_dim)
        return torch.cat([qr, q[..., R:]], -1), torch.cat([kr, k[..., R:]], -1)

    monkeypatch.setattr(ml, "apply_rotary_pos_emb", partial)

    def fix(hf, cfg):  # HF Llama's RoPE init ignores partial_rotary_factor: give it R/2 frequencies
        R = cfg.rotary_dim
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.int64).float() / R))
        hf.model.rotary_emb.inv_freq = inv
        hf.model.rotary_emb.original_inv_freq = inv
    return fix


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["gqa-untied", "mha-untied", "gqa-tied", "mha-tied", "partial-rotary"])
def test_synthetic_vs_hf(variant, dtype, partial_rotary_hf):
    cfg = _variant(variant)
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh weights every run
    w = synthetic_weights(cfg, dtype, "cpu", seed)
    model = LoadedModel(f"synthetic:{variant}", cfg, w, None, cfg.eos_token_ids)
    hf = hf_model_for(model, dtype, "cpu")
    if cfg.rotary_dim != cfg.head_dim:
        partial_rotary_hf(hf, cfg)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (12,), generator=gen).tolist()
    kv = KVArena(cfg, 2, dtype)
    dec = ReferenceDecoder(w, kv)
    # prefill 4 tokens into session 1 (so sessions are independent), then 8 single steps
    dec.prefill(1, ids[:4])
    dec.prefill(0, ids[:1])
    bound = BOUNDS[dtype]
    for t in range(1, 9):
        logits, ours = dec.step_stages(0, ids[t])
        ours = {k: v[0] for k, v in ours.items()}
        theirs = hf_stages(hf, ids[:t + 1])
        rows = compare(ours, theirs, cfg.num_layers, bound, TIE_REL[dtype])
        assert all(r[3] for r in rows), (t, rows)
    assert kv.seq_len == [9, 4]
