"""The LLaMA-family variants users run (issue 28 item 3), each on a tiny random HF model built
here with transformers: Llama-3.x RoPE scaling (llama3, linear, dynamic), Qwen2 (q/k/v bias,
tied and untied), Mistral and Qwen2 with a sliding window shorter than the sequence, and plain
Llama-2 (default RoPE).

For each: the RoPE inv_freq equals transformers' own bit for bit, the ReferenceDecoder's
per-position logits (one prefill, and prefill + decode steps through the KV cache) match HF's
forward in fp32, and `bash run_ipc.sh` reproduces HF greedy generation token for token on the
reference backend and on the hf backend (transformers inside the server, its own KV cache). The cuda backend's coverage (server/backends.py `cuda_refusal`) and
`--backend auto`'s choice are checked without a GPU."""
import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from case4_errors import BadInput
from server.backends import cuda_refusal, make_backend, pick_backend
from server.kv import KVArena
from server.model.config import ConfigError, config_from_hf, with_max_seq
from server.model.resolve import resolve_model
from server.model.weights import load_hf_folder, rope_inv_freq
from server.reference import ReferenceDecoder

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, bos_token_id=256, eos_token_id=257,
             initializer_range=0.1)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 10000.0}  # 16: low, medium and high bands
CASES = {
    "llama3": ("llama", dict(rope_parameters=LLAMA3)),
    "linear": ("llama", dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=500000.0)),
    "dynamic": ("llama", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    "mistral-window": ("mistral", dict(sliding_window=8)),
    "llama2": ("llama", dict()),
}
PROMPT = "Sliding windows!"  # 16 bytes + BOS: with 12 generated tokens, far past a window of 8
N = 12


def _hf_config(kind: str, extra: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    return cls(**SHAPE, **extra)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, byte_level_tokenizer):
    """name -> (folder, HF model in fp32, eval): saved with save_pretrained + a byte-level tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    out = {}
    for i, (name, (kind, extra)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        m = AutoModelForCausalLM.from_config(_hf_config(kind, extra), dtype=torch.float32).eval()
        with torch.no_grad():
            for pname, p in m.named_parameters():
                if pname.endswith(".bias"):  # HF initialises biases to 0: make them count
                    p.normal_(0.0, 0.5)
        folder = tmp_path_factory.mktemp(name)
        m.save_pretrained(str(folder))
        byte_level_tokenizer(folder)
        out[name] = (folder, m)
    return out


def _prompt_ids(folder: Path) -> list[int]:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))(PROMPT)["input_ids"]


def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(hf(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


def _decoder(folder: Path) -> ReferenceDecoder:
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    w = load_hf_folder(folder, cfg, "float32", "cpu")
    return ReferenceDecoder(w, KVArena(cfg, 1, torch.float32))


@pytest.mark.parametrize("kind,extra", [CASES[k] for k in ("llama3", "linear", "dynamic")],
                         ids=["llama3", "linear", "dynamic"])
def test_rope_inv_freq_is_transformers_bit_for_bit(kind, extra):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hc = _hf_config(kind, extra)
    want, attention_factor = ROPE_INIT_FUNCTIONS[hc.rope_parameters["rope_type"]](hc, "cpu")
    assert attention_factor == 1.0  # so cos/sin are all the type changes
    cfg = config_from_hf(hc.to_dict())
    assert cfg.rope_type == hc.rope_parameters["rope_type"]
    assert torch.equal(rope_inv_freq(cfg), want)


def test_dynamic_rope_is_not_stretched_past_its_length():
    cfg = config_from_hf(_hf_config(*CASES["dynamic"]).to_dict())
    with pytest.raises(ConfigError, match=r"dynamic RoPE past max_position_embeddings=64.*served context 65"):
        rope_inv_freq(replace(cfg, max_seq_len=65))
    assert with_max_seq(cfg, 10_000).max_seq_len == 64  # the server never asks for more


@pytest.mark.parametrize("name", list(CASES))
def test_reference_logits_match_hf(hf_models, name):
    folder, hf = hf_models[name]
    ids = _prompt_ids(folder) + list(range(60, 60 + N))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]                         # [T, V]
    dec = _decoder(folder)
    full = dec.forward(0, ids, 0)                                        # one prefill
    assert (full - want).abs().max().item() < 1e-4
    p = len(ids) - N                                                     # prefill, then decode steps
    stepped = [dec.prefill(0, ids[:p])] + [dec.step(0, t) for t in ids[p:]]
    assert (torch.stack(stepped) - want[p - 1:]).abs().max().item() < 1e-4


def test_configs_parse_as_hf_builds_them(hf_models):
    cfg = lambda n: config_from_hf(json.loads((hf_models[n][0] / "config.json").read_text()))  # noqa: E731
    assert cfg("qwen2-tied").qkv_bias and cfg("qwen2-tied").tie_word_embeddings
    assert not cfg("qwen2-untied").tie_word_embeddings and cfg("qwen2-untied").sliding_window is None
    assert (cfg("qwen2-window").sliding_window, cfg("qwen2-window").sliding_layers) == (8, (1,))
    assert (cfg("mistral-window").sliding_window, cfg("mistral-window").sliding_layers) == (8, (0, 1))
    assert cfg("llama3").rope_params["original_max_position_embeddings"] == 16


@pytest.mark.parametrize("field,value,culprit", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "'rope_parameters.rope_type'.*yarn"),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1e4}, "'rope_parameters.factor'"),
    ("rope_scaling", {"type": "linear"}, "'rope_scaling.factor'"),
    ("layer_types", ["full_attention", "chunked_attention"], "'layer_types'"),
    ("sliding_window", -3, "'sliding_window'"),
])
def test_field_refusals_name_the_field(field, value, culprit):
    d = _hf_config("qwen2", dict(use_sliding_window=True)).to_dict()
    d[field] = value
    d.pop("rope_parameters") if field == "rope_scaling" else None
    with pytest.raises(ConfigError, match=culprit):
        config_from_hf(d)


def test_legacy_rope_scaling_field():
    d = _hf_config("llama", {}).to_dict()
    d.pop("rope_parameters")
    d.update(rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=5e5)
    c = config_from_hf(d)
    assert (c.rope_type, c.rope_params, c.rope_theta) == ("linear", {"factor": 2.0}, 5e5)


# -- which backend runs what ----------------------------------------------------------------

def _cfg(name: str, max_seq=None):
    return with_max_seq(config_from_hf(_hf_config(*CASES[name]).to_dict()), max_seq)


def test_cuda_coverage():
    for name in ("llama3", "linear", "dynamic"):  # RoPE lives in the tables the kernels read
        assert cuda_refusal(_cfg(name)) is None
    for name in ("qwen2-tied", "qwen2-untied"):  # the QKV gemv adds the q/k/v biases
        assert _cfg(name).qkv_bias and cuda_refusal(_cfg(name)) is None
    why = cuda_refusal(_cfg("qwen2-window"))  # a Qwen2 window shorter than the context: the window, not the bias
    assert "'sliding_window'" in why and "sliding_window 8" in why and "bias" not in why
    assert cuda_refusal(_cfg("qwen2-window", max_seq=8)) is None
    why = cuda_refusal(_cfg("mistral-window"))
    assert "'sliding_window'" in why and "--max-seq 64" in why and "sliding_window 8" in why
    assert cuda_refusal(_cfg("mistral-window", max_seq=8)) is None  # the window changes nothing
    assert "sliding_window" in cuda_refusal(_cfg("mistral-window", max_seq=9))


@pytest.mark.parametrize("name,words", [("qwen2-window", "sliding_window 8"), ("mistral-window", "sliding_window 8")])
def test_auto_picks_reference_saying_why_even_with_a_gpu(monkeypatch, capsys, name, words):
    import server.backends as backends
    monkeypatch.setattr(backends, "cuda_available", lambda: (True, ""))  # a GPU and a built extension
    assert pick_backend("auto", _cfg(name)) == "reference"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[case4] backend auto -> reference (") and words in err[0], err
    assert pick_backend("auto", _cfg("llama3")) == "cuda"
    assert pick_backend("auto", _cfg("mistral-window", max_seq=8)) == "cuda"
    assert pick_backend("auto", _cfg("qwen2-tied")) == "cuda" and pick_backend("auto", _cfg("qwen2-untied")) == "cuda"
    assert capsys.readouterr().err == ""


def test_cuda_backend_refuses_in_one_line(hf_models):
    model = resolve_model(str(hf_models["qwen2-window"][0]))
    with pytest.raises(BadInput, match=r"^--backend cuda cannot run this model: config field 'sliding_window': .*"
                                       r"sliding_window 8.*; use --backend reference or auto$"):
        make_backend("cuda", model)


def test_cuda_backend_takes_qwen2_biases(hf_models):
    """The q/k/v biases are no reason to refuse: on a CPU-only machine (or with the model on the CPU) the refusal
    is the missing GPU / the model's device, never the bias."""
    model = resolve_model(str(hf_models["qwen2-untied"][0]))
    assert model.cfg.qkv_bias and model.weights.b_qkv
    with pytest.raises(BadInput, match=r"CUDA") as e:
        make_backend("cuda", model)
    assert "bias" not in str(e.value)


# -- end to end: the three processes --------------------------------------------------------

def _run_ipc(folder: Path, out: Path, *flags):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASE4_") or k in ("CASE4_VENV", "CASE4_HOME")}
    return subprocess.run(["bash", str(ROOT / "run_ipc.sh"), str(folder), "--prompt", PROMPT, "--max-tokens", str(N),
                           "--ignore-eos", "--output-dir", str(out), "--run-name", "r", *flags],
                          capture_output=True, text=True, timeout=300, env=dict(env, PYTHONUNBUFFERED="1"))


@pytest.mark.parametrize("name,backend", [("llama3", "reference"), ("linear", "reference"), ("dynamic", "reference"),
                                          ("qwen2-tied", "reference"), ("qwen2-window", "auto"),
                                          ("mistral-window", "reference"), ("llama2", "reference"),
                                          ("llama3", "hf"), ("qwen2-untied", "hf"), ("mistral-window", "hf"),
                                          ("llama2", "hf")])
def test_run_ipc_matches_hf_greedy(hf_models, tmp_path, name, backend):
    folder, hf = hf_models[name]
    r = _run_ipc(folder, tmp_path, "--backend", backend)
    assert r.returncode == 0, r.stderr
    toks = [int(t) for t in (tmp_path / "r_tokens.txt").read_text().split()]
    assert toks == _hf_greedy(hf, _prompt_ids(folder), N)
    if backend == "auto":
        lines = [l for l in r.stderr.splitlines() if "backend auto" in l]
        assert lines == [lines[0]] and "-> reference (config field 'sliding_window'" in lines[0], r.stderr


def test_run_ipc_cuda_refuses_a_window_it_cannot_serve(hf_models, tmp_path):
    r = _run_ipc(hf_models["mistral-window"][0], tmp_path, "--backend", "cuda")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[")]  # not the progress lines
    assert len(err) == 1 and err[0].startswith("case4: error:"), r.stderr
    assert "'sliding_window'" in err[0] and "--max-seq 64" in err[0] and "sliding_window 8" in err[0], err
