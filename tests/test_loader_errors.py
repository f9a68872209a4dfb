"""Model resolution, config validation and weight loading: every error names its culprit."""
import json

import pytest
import torch

from case4_errors import BadInput
from server.model.config import SYNTHETIC_SHAPES, ConfigError, config_from_hf, hf_config_dict
from server.model.weights import WeightLoadError, load_hf_folder, synthetic_weights
from server.model.resolve import ModelError, load_config, resolve_model

TINY = SYNTHETIC_SHAPES["tiny"]


@pytest.fixture
def tiny_folder(tiny_hf_folder):
    return tiny_hf_folder


def test_roundtrip_and_layout(tiny_folder):
    folder, w = tiny_folder
    cfg, _ = load_config(str(folder))
    w2 = load_hf_folder(folder, cfg, "float32")
    assert torch.equal(w.arena[: w2.arena.numel()], w2.arena)
    # every tensor is a 256-byte aligned view of the one arena
    base = w2.arena.data_ptr()
    views = [w2.embed, w2.final_norm, w2.lm_head] + [getattr(lw, f) for lw in w2.layers
                                                     for f in ("attn_norm", "w_qkv", "w_o", "mlp_norm", "w_gu", "w_down")]
    for v in views:
        assert v.untyped_storage().data_ptr() == w2.arena.untyped_storage().data_ptr()
        assert (v.data_ptr() - base) % 256 == 0
    assert w2.layers[0].w_qkv.shape == (TINY.qkv_rows, TINY.hidden_size)
    assert w2.layers[0].w_gu.shape == (2 * TINY.intermediate_size, TINY.hidden_size)


def test_bf16_and_fp16_arena(tiny_folder):
    folder, w = tiny_folder
    for dt in (torch.float16, torch.bfloat16):
        w2 = load_hf_folder(folder, TINY, dt)
        assert w2.arena.dtype == dt
        assert torch.allclose(w2.layers[1].w_down.float(), w.layers[1].w_down, rtol=1e-2, atol=1e-2)


def test_tied_embeddings_share_storage():
    from dataclasses import replace
    w = synthetic_weights(replace(TINY, tie_word_embeddings=True), "float32", "cpu", 0)
    assert w.lm_head.data_ptr() == w.embed.data_ptr()


def test_sharded_folder(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file
    folder, w = tiny_folder
    sd = load_file(str(folder / "model.safetensors"))
    names = sorted(sd)
    half = len(names) // 2
    out = tmp_path / "sharded"
    out.mkdir()
    save_file({k: sd[k] for k in names[:half]}, str(out / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[half:]}, str(out / "model-00002-of-00002.safetensors"))
    wm = {k: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, k in enumerate(names)}
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_text((folder / f).read_text())
    m = resolve_model(str(out))
    assert torch.equal(m.weights.arena, load_hf_folder(folder, m.cfg).arena)


def test_missing_tensor(tiny_folder):
    from safetensors.torch import load_file, save_file
    folder, _ = tiny_folder
    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        resolve_model(str(folder))


def test_wrong_shape(tiny_folder):
    from safetensors.torch import load_file, save_file
    folder, _ = tiny_folder
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, TINY.hidden_size)
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(WeightLoadError) as e:
        resolve_model(str(folder))
    msg = str(e.value)
    assert "model.safetensors" in msg and "k_proj" in msg and "(7, 128)" in msg and "(64, 128)" in msg


def test_truncated_file(tiny_folder):
    folder, _ = tiny_folder
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        resolve_model(str(folder))


def test_corrupt_file(tiny_folder):
    folder, _ = tiny_folder
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(WeightLoadError, match="model.safetensors"):
        resolve_model(str(folder))


def test_config_json_that_is_a_folder(tiny_folder):
    folder, _ = tiny_folder
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()  # was an IsADirectoryError traceback
    with pytest.raises(ModelError, match=r"config\.json: cannot be read \(Is a directory\)"):
        resolve_model(str(folder))


@pytest.mark.parametrize("index", ['{"weight_map": 5}', '{"weight_map": {"model.norm.weight": 3}}', '[1]'])
def test_malformed_safetensors_index(tiny_folder, index):
    folder, _ = tiny_folder
    (folder / "model.safetensors.index.json").write_text(index)  # was an AttributeError / TypeError traceback
    with pytest.raises(WeightLoadError, match="index.json: not a valid safetensors index"):
        resolve_model(str(folder))


def test_generation_config_eos_of_the_wrong_kind(tiny_folder):
    folder, _ = tiny_folder
    (folder / "generation_config.json").write_text('[1, 2]')  # not an object: ignored, as invalid JSON is
    resolve_model(str(folder))  # was an AttributeError traceback
    (folder / "generation_config.json").write_text('{"eos_token_id": "x"}')  # was a ValueError in the server
    with pytest.raises(ModelError, match="generation_config.json: eos_token_id must be a token id"):
        resolve_model(str(folder))


def test_corrupt_config(tiny_folder):
    folder, _ = tiny_folder
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(folder))


@pytest.mark.parametrize("field,value,culprit", [
    ("attention_bias", True, "attention_bias"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 5e5}, "rope_parameters"),
    ("sliding_window", 4096, "sliding_window"),
    ("architectures", ["GPT2LMHeadModel"], "architectures"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("hidden_act", "gelu", "hidden_act"),
    # malformed values: each was a ValueError / AttributeError / TypeError traceback, or loaded and made
    # every logit NaN (eps NaN or negative, a RoPE factor of 0), or was read wrongly ("no" as true)
    ("vocab_size", True, "'vocab_size': must be a positive integer"),
    ("num_hidden_layers", "2", "'num_hidden_layers': must be a positive integer"),
    ("max_position_embeddings", "4k", "'max_position_embeddings': must be a positive integer"),
    ("rope_theta", "x", "'rope_theta': must be a finite number"),
    ("rms_norm_eps", "a", "'rms_norm_eps': must be a finite number"),
    ("rms_norm_eps", float("nan"), "'rms_norm_eps': must be a finite number"),
    ("rms_norm_eps", -1e-5, "'rms_norm_eps': must be >= 0"),
    ("partial_rotary_factor", "half", "'partial_rotary_factor': must be a finite number"),
    ("rope_parameters", [1, 2], "'rope_parameters': must be an object"),
    ("rope_scaling", "linear", "'rope_scaling': must be an object"),
    ("rope_parameters", {"rope_type": "linear", "rope_theta": 1e4, "factor": 0}, "'rope_parameters.factor'"),
    ("rope_parameters", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": float("inf")}, "'rope_parameters.factor'"),
    ("tie_word_embeddings", "no", "'tie_word_embeddings': must be true or false"),
    ("architectures", "LlamaForCausalLM", "'architectures': must be a list"),
    ("eos_token_id", "x", "'eos_token_id': must be a token id"),
    ("eos_token_id", [[1]], "'eos_token_id': must be a token id"),
    ("bos_token_id", 1.5, "'bos_token_id': must be a token id"),
])
def test_config_refusals(field, value, culprit):
    d = hf_config_dict(TINY)
    d[field] = value
    with pytest.raises(ConfigError, match=culprit):
        config_from_hf(d)


def test_zero_heads_without_head_dim():
    d = hf_config_dict(TINY)
    d.pop("head_dim")
    d["num_attention_heads"] = 0  # was a ZeroDivisionError (head_dim = hidden_size // heads)
    with pytest.raises(ConfigError, match="'num_heads': must be a positive integer"):
        config_from_hf(d)


def test_rope_theta_sources():
    d = hf_config_dict(TINY)
    d.pop("rope_theta")
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 123456.0}
    assert config_from_hf(d).rope_theta == 123456.0
    d = hf_config_dict(TINY)
    d.pop("rope_parameters")
    d["rope_theta"] = 5e5
    assert config_from_hf(d).rope_theta == 5e5
    d["head_dim"] = 64
    d["partial_rotary_factor"] = 0.25
    c = config_from_hf(d)
    assert (c.head_dim, c.rotary_dim) == (64, 16)


def test_model_specs():
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model("/nonexistent/model/path")
    with pytest.raises(ModelError, match="unknown synthetic shape 'nope'"):
        resolve_model("synthetic:nope")
    with pytest.raises(ModelError, match="local Hugging Face cache.*smollm2"):
        resolve_model("nobody-here/no-such-model")
    for name in ("tiny", "smollm2-135m", "llama2-7b", "llama2-13b", "tiny-mha", "gqa-32-8"):
        assert name in SYNTHETIC_SHAPES
    m = resolve_model("synthetic:tiny", dtype="bfloat16", seed=3)
    assert m.weights.arena.dtype == torch.bfloat16 and m.tokenizer_dir is None
    assert torch.equal(m.weights.arena, resolve_model("synthetic:tiny", dtype="bfloat16", seed=3).weights.arena)
    assert isinstance(ModelError("x"), BadInput)


def test_half_written_cache_is_rebuilt(tmp_path, monkeypatch, smollm2_dir):
    """An entry without its .complete marker is never used: it is rebuilt."""
    import shutil

    import server.model.resolve as sm
    home = tmp_path / "home"
    target = home / "models" / "smollm2"
    shutil.copytree(smollm2_dir, target)
    (target / ".complete").unlink()
    (target / "model.safetensors").write_bytes(b"half")
    monkeypatch.setenv("CASE4_HOME", str(home))
    out = sm.prepare_smollm2()
    assert out == target and (target / ".complete").exists()
    assert (target / "model.safetensors").stat().st_size > 100_000_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_asked_without_gpu():
    from server.backends import make_backend
    with pytest.raises(ModelError, match="no CUDA GPU is visible"):
        resolve_model("synthetic:tiny", device="cuda")
    with pytest.raises(BadInput, match="needs a CUDA GPU"):
        make_backend("cuda", resolve_model("synthetic:tiny"))
