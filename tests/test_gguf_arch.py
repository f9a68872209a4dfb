"""GGUF files beyond plain llama: Qwen2 / Qwen2.5 (general.architecture "qwen2": q/k/v biases, q/k rows not
permuted) and Llama-3.1 (architecture "llama" with a rope_freqs tensor, llama.cpp's form of the "llama3" RoPE
scaling). Each file is written here from a tiny random HF model built by transformers, laid out as llama.cpp's
convert_hf_to_gguf lays it out (`write_hf_gguf`), in F32, F16 and Q8_0 (gguf.quants.quantize).

Oracles: the HF model itself (F32 files); for F16 / Q8_0 files, the HF model with every weight replaced by the
file's values as the gguf package dequantizes them (q/k rows un-permuted by transformers' own GGUF code for
llama); and, for qwen2, transformers' own GGUF load of the file. transformers' GGUF loader ignores rope_freqs
(it would run Llama-3.1 without its scaling), so for those files the HF model built with rope_type llama3 is
the oracle. Greedy tokens through the whole CLI for one file of each architecture equal HF's. Bad files (a
missing bias, a rope_freqs of the wrong length, a tensor we would ignore) exit 2 with one line."""
import math
import random
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from server.kv import KVArena
from server.reference import ReferenceDecoder
from tests.test_gguf import MERGES, _byte_level_tokens, error_line, run_cli

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=256, eos_token_id=257,
             initializer_range=0.2)  # 0.2: greedy runs of these tiny models vary (0.1 repeats one token)
# original_max_position_embeddings 32 with head_dim 16: pair 0 in the high band (wavelength 2 pi < 32 / 4),
# pair 1 in the medium band (19.9), pairs 2.. in the low one (scaled by 1 / 8)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32, "rope_theta": 10000.0}
CASES = {"qwen2": ("qwen2", dict(tie_word_embeddings=True)),
         "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
         "llama3": ("llama", dict(rope_parameters=LLAMA3, tie_word_embeddings=False))}


def hf_model(kind: str, seed: int, shape: dict = SHAPE, **extra):
    """A tiny random HF model (fp32, eval) of `shape`; Qwen2's biases drawn ~N(0, 0.5) (HF initialises
    them to 0)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind](**{**shape, **extra})
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    return m


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (HF rows -> GGUF rows)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c) -> list[float]:
    """convert_hf_to_gguf's LlamaModel.generate_extra_tensors for rope_type llama3: one factor per pair,
    the frequency of pair i being divided by factor i (ggml's rope freq_factors)."""
    p = c.rope_parameters
    base, dim = p["rope_theta"], c.head_dim
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / lo, old / hi
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return out


def write_hf_gguf(path: Path, model, qtype: str = "F32", rope_freqs: list[float] | None = None,
                  **meta_override) -> None:
    """The HF model as llama.cpp's converter writes it: `llama` or `qwen2` metadata (as the model's type),
    q/k rows permuted for llama only, q/k/v biases (qwen2) and norms F32, every matrix (token_embd and output
    too) in `qtype`, output.weight only when untied, rope_freqs.weight when given; a byte-level BPE
    tokenizer in the metadata (ids 0..255 the bytes) so that the file loads as a whole model.
    meta_override: {'drop': [tensor names], 'rope_freqs_len': n, 'extra': {name: array}} for bad files."""
    import gguf
    c = model.config
    arch = c.model_type
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    V, H = c.vocab_size, c.hidden_size
    w.add_tokenizer_model("gpt2"), w.add_token_list(_byte_level_tokens(V)), w.add_token_merges(MERGES)
    w.add_token_types([1] * 256 + [3] * (V - 256))
    w.add_block_count(c.num_hidden_layers), w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(H), w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads), w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"])), w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "llama":
        w.add_vocab_size(V), w.add_rope_dimension_count(c.head_dim)
    w.add_bos_token_id(c.bos_token_id), w.add_eos_token_id(c.eos_token_id)
    drop = set(meta_override.get("drop", ()))

    def put(name: str, arr: np.ndarray):
        if name in drop:
            return
        if arr.ndim == 1 or qtype == "F32":
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            qt = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qt), raw_dtype=qt)

    if rope_freqs is not None:
        n = meta_override.get("rope_freqs_len", len(rope_freqs))
        put("rope_freqs.weight", np.resize(np.array(rope_freqs, dtype=np.float32), n))
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    heads = {"q": c.num_attention_heads, "k": c.num_key_value_heads}
    for l in range(c.num_hidden_layers):
        p, g = f"model.layers.{l}.", f"blk.{l}."
        put(g + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        put(g + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for x in "qkv":
            t = sd[p + f"self_attn.{x}_proj.weight"]
            put(g + f"attn_{x}.weight", _permute(t, heads[x]) if arch == "llama" and x in heads else t)
            if p + f"self_attn.{x}_proj.bias" in sd:
                put(g + f"attn_{x}.bias", sd[p + f"self_attn.{x}_proj.bias"])
        put(g + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        for a, b in (("gate", "gate"), ("up", "up"), ("down", "down")):
            put(g + f"ffn_{a}.weight", sd[p + f"mlp.{b}_proj.weight"])
    drop.clear()  # an extra tensor may replace a dropped one
    for name, arr in meta_override.get("extra", {}).items():
        put(name, arr)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()


def model_of_file(model, path: Path):
    """A copy of `model` whose weights are the file's values as the gguf package dequantizes them (q/k rows
    un-permuted by transformers' LlamaTensorProcessor for llama): the oracle of a quantized file."""
    import copy

    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    c = model.config
    proc = LlamaTensorProcessor(config={"num_attention_heads": c.num_attention_heads,
                                        "num_key_value_heads": c.num_key_value_heads})
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name == "rope_freqs.weight":
            continue
        v = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if c.model_type == "llama":
            v = proc.process(v, t.name).weights
        parts = t.name.split(".")
        if parts[0] == "blk":
            sd[f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"] = torch.from_numpy(np.array(v))
        else:
            sd[f"{names[parts[0]]}.{parts[1]}"] = torch.from_numpy(np.array(v))
    m = copy.deepcopy(model)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if c.tie_word_embeddings:
        m.tie_weights()
    return m.eval()


def ours(path: Path, ids: list[int], quant=None) -> torch.Tensor:
    """Our reference backend on the file: logits of positions 2.. (a prefill of 3, then one step a token)."""
    from server.model.gguf import GGUFFile, load_gguf, schemes_for
    f = GGUFFile(path)
    w = load_gguf(f, f.cfg, torch.float32, "cpu", schemes_for(f, quant, None))
    dec = ReferenceDecoder(w, KVArena(f.cfg, 1, w.dtype, w.device))
    return torch.stack([dec.prefill(0, ids[:3])] + [dec.step(0, t) for t in ids[3:]])


def hf_logits(m, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0, 2:]


def fresh_ids(seed: int, n: int = 24) -> list[int]:
    r = random.Random(seed)
    return [256] + [r.randrange(0, 320) for _ in range(n - 1)]


@pytest.fixture(scope="module")
def models():
    return {name: hf_model(kind, 10 + i, **extra) for i, (name, (kind, extra)) in enumerate(CASES.items())}


def _write(models, name: str, path: Path, qtype: str) -> None:
    m = models[name]
    write_hf_gguf(path, m, qtype, llama3_rope_factors(m.config) if name == "llama3" else None)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_reference_on_gguf_matches_hf(models, tmp_path, name, qtype):
    """Our logits on the file against the HF model (F32) or the HF model on the file's dequantized values;
    the file's own Q8_0 blocks run as int8 (repacked), biases and RoPE factors included."""
    from server.model.gguf import GGUFFile, schemes_for
    path = tmp_path / f"{name}-{qtype}.gguf"
    _write(models, name, path, qtype)
    f = GGUFFile(path)
    assert f.cfg.arch == ("Qwen2ForCausalLM" if name.startswith("qwen2") else "LlamaForCausalLM")
    assert f.cfg.qkv_bias == name.startswith("qwen2") and f.cfg.tie_word_embeddings == (name == "qwen2")
    assert len(f.cfg.rope_freq_factors) == (8 if name == "llama3" else 0)
    if qtype == "Q8_0":
        assert schemes_for(f, None, None)["1.w_qkv"] == ("int8", 32)
    ids = fresh_ids(zlib.crc32(f"{name}{qtype}".encode()))
    got = ours(path, ids)
    want = hf_logits(models[name] if qtype == "F32" else model_of_file(models[name], path), ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,qtype", [("qwen2", "F32"), ("qwen2-untied", "Q8_0")])
def test_qwen2_gguf_matches_transformers_own_gguf_load(models, tmp_path, name, qtype):
    """transformers reads qwen2 GGUFs itself (biases included, no q/k un-permutation): the same logits."""
    from transformers import AutoModelForCausalLM
    path = tmp_path / "q.gguf"
    _write(models, name, path, qtype)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = fresh_ids(5)
    torch.testing.assert_close(ours(path, ids), hf_logits(hf, ids), atol=1e-4, rtol=1e-4)


def test_rope_freqs_are_llama3_scaling(models, tmp_path):
    """The factors reproduce transformers' llama3 inv_freq (to fp32 rounding: ggml divides, HF interpolates),
    in all three bands, and they matter: without them the logits are far from the HF model's."""
    from dataclasses import replace

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from server.model.gguf import GGUFFile
    from server.model.weights import rope_inv_freq
    m = models["llama3"]
    path = tmp_path / "l3.gguf"
    _write(models, "llama3", path, "F32")
    f = GGUFFile(path)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](m.config, "cpu")
    plain = rope_inv_freq(replace(f.cfg, rope_freq_factors=()))
    got = rope_inv_freq(f.cfg)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    assert got[0] == plain[0] and plain[1] / 8 < got[1] < plain[1] and torch.equal(got[2:], plain[2:] / 8)
    # ignoring the tensor (as transformers' GGUF load does) is another model
    ids = fresh_ids(9)
    from server.model.gguf import load_gguf
    w = load_gguf(f, replace(f.cfg, rope_freq_factors=()), torch.float32, "cpu", {})
    dec = ReferenceDecoder(w, KVArena(w.cfg, 1, w.dtype, w.device))
    assert (dec.prefill(0, ids) - hf_logits(m, ids)[-1]).abs().max() > 0.05


# -- the whole CLI -----------------------------------------------------------------------------------

PROMPT = "Rope and bias!"
N = 10


@pytest.mark.parametrize("name,qtype", [("qwen2-untied", "Q8_0"), ("llama3", "F16")])
def test_cli_greedy_matches_hf(models, tmp_path, name, qtype):
    """python orchestrator.py --model file.gguf --backend reference: the tokens HF generates greedily from the
    prompt as transformers tokenizes it from the same file."""
    from transformers import AutoTokenizer
    path = tmp_path / f"{name}.gguf"
    _write(models, name, path, qtype)
    r = run_cli_gen(tmp_path, path)
    assert r.returncode == 0, r.stderr
    toks = [int(t) for t in (tmp_path / "out" / "r_tokens.txt").read_text().split()]
    ids = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)(PROMPT)["input_ids"]
    hf = model_of_file(models[name], path)
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert toks == want


def run_cli_gen(tmp_path: Path, model: Path):
    import os
    env = dict(os.environ, PYTHONUNBUFFERED="1", CASE4_HOME=str(tmp_path / "home"))
    return subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--model", str(model), "--prompt", PROMPT,
                           "--max-tokens", str(N), "--ignore-eos", "--backend", "reference", "--output-dir",
                           str(tmp_path / "out"), "--run-name", "r"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


# -- bad files ---------------------------------------------------------------------------------------

def test_bad_qwen2_and_llama3_files_exit_2(models, tmp_path):
    """Through the CLI: one line naming the file and the problem, exit 2."""
    nob = tmp_path / "nobias.gguf"
    write_hf_gguf(nob, models["qwen2"], drop=["blk.1.attn_k.bias"])
    line = error_line(run_cli(tmp_path, nob))
    assert f"{nob}: tensor 'blk.1.attn_k.bias' is missing (a qwen2 GGUF has q/k/v biases)" in line, line
    m = models["llama3"]
    short = tmp_path / "short.gguf"
    write_hf_gguf(short, m, rope_freqs=llama3_rope_factors(m.config), rope_freqs_len=6)
    line = error_line(run_cli(tmp_path, short))
    assert f"{short}: tensor 'rope_freqs.weight' has 6 values, expected 8" in line, line


def test_bad_files_unit(models, tmp_path):
    from case4_errors import BadInput
    from server.model.gguf import GGUFFile
    m = models["llama3"]
    zero = tmp_path / "zero.gguf"
    write_hf_gguf(zero, m, rope_freqs=[0.0] + llama3_rope_factors(m.config)[1:])
    with pytest.raises(BadInput, match=f"^{zero}: tensor 'rope_freqs.weight' must hold positive finite factors"):
        GGUFFile(zero)
    # a llama file with attention biases: we would ignore them, so it is refused
    bias = tmp_path / "bias.gguf"
    write_hf_gguf(bias, m, extra={"blk.0.attn_q.bias": np.ones(64, np.float32)})
    with pytest.raises(BadInput, match=rf"^{bias}: tensor 'blk\.0\.attn_q\.bias' is not supported in a GGUF of "
                                       rf"architecture 'llama'"):
        GGUFFile(bias)
    # a qwen2 bias of the wrong length
    wrong = tmp_path / "wrong.gguf"
    write_hf_gguf(wrong, models["qwen2"], drop=["blk.0.attn_v.bias"],
                  extra={"blk.0.attn_v.bias": np.ones(40, np.float32)})
    with pytest.raises(BadInput, match=rf"^{wrong}: tensor 'blk\.0\.attn_v\.bias' has shape \(40,\), expected \(32,\)"):
        GGUFFile(wrong)
