"""The hf backend (server/hf_backend.py; issue 28 item 1) on the CPU: transformers' model inside the
server with its own cache per session. Oracles: HF's own full forward (no cache) for the logits,
and the reference backend on the same seeded weights for device sampling. Bad input end to end
through run_ipc.sh: one line, exit 2. `--backend auto` sends an architecture neither custom path
covers (a tiny random GPT-NeoX) to hf and says so. The GPU side (static cache + CUDA graphs,
--force-flash) is tests/gpu/test_hf_backend_gpu.py."""
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from case4_errors import BadInput
from case4_sampling import SamplingParams
from server.backends import load_backend

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=256, eos_token_id=257)


@pytest.fixture(scope="module")
def neox(tmp_path_factory, byte_level_tokenizer):
    """A tiny random GPT-NeoX folder (an architecture config.py does not parse) and its HF model."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig
    torch.manual_seed(3)
    m = AutoModelForCausalLM.from_config(GPTNeoXConfig(**SHAPE), dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("neox")
    m.save_pretrained(str(folder))
    byte_level_tokenizer(folder)
    return folder, m


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _random_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [256] + torch.randint(0, 256, (n - 1,), generator=g).tolist()


def test_prefill_and_steps_match_hf_full_forward(neox):
    folder, hf = neox
    model, b = load_backend({"model": str(folder), "backend": "hf"}, "cpu", "float32")
    ids = _random_ids(14, 1)
    want = _hf_logits(hf, ids)
    got = [b.prefill(0, ids[:6])] + [b.step(0, t) for t in ids[6:10]] + [b.replay(0, b.seq_len(0), t) for t in ids[10:]]
    assert (torch.stack(got) - want[5:]).abs().max().item() < 1e-4
    assert b.seq_len(0) == len(ids)
    st = b.status()
    assert st["backend"] == "hf" and st["arch"] == "GPTNeoXForCausalLM" and st["hf_mode"] == "dynamic-cache+eager"
    assert "DynamicCache" in st["graphs_note"] and st["graphs"] is None


def test_sessions_have_their_own_caches(neox):
    folder, hf = neox
    _, b = load_backend({"model": str(folder), "backend": "hf", "sessions": 2}, "cpu", "float32")
    a, c = _random_ids(5, 2), _random_ids(7, 3)
    b.prefill(0, a)
    b.prefill(1, c)
    la, lc = b.step(0, 9), b.step(1, 11)
    assert (la - _hf_logits(hf, a + [9])[-1]).abs().max() < 1e-4
    assert (lc - _hf_logits(hf, c + [11])[-1]).abs().max() < 1e-4
    b.reset(0)
    assert b.seq_len(0) == 0 and b.seq_len(1) == 8


def test_static_cache_path_matches_the_dynamic_one(neox):
    """The GPU graph modes' StaticCache, run eagerly here (the capture itself needs a GPU)."""
    folder, hf = neox
    _, b = load_backend({"model": str(folder), "backend": "hf"}, "cpu", "float32")
    b.static, b.WARMUP_STEPS = True, 10**9  # the static cache, never a capture
    ids = _random_ids(12, 4)
    want = _hf_logits(hf, ids)
    for _ in range(2):  # the second prefill reuses the zeroed cache
        got = [b.prefill(0, ids[:4])] + [b.step(0, t) for t in ids[4:]]
        assert (torch.stack(got) - want[3:]).abs().max().item() < 1e-4
    assert type(b.caches[0]).__name__ == "StaticCache"


def test_device_sampling_is_the_other_backends_sampler():
    """hf and reference backends on the same seeded synthetic weights draw the same tokens."""
    params = SamplingParams(0.8, 40, 0.9, 1234)
    toks = {}
    for name in ("hf", "reference"):
        _, b = load_backend({"model": "synthetic:tiny", "backend": name, "seed": 5}, "cpu", "float32")
        ids = _random_ids(6, 5)
        b.prefill(0, ids)
        first = b.sample(0, params, len(ids) - 1)
        toks[name] = [first] + b.generate(0, first, 12, params)
    assert toks["hf"] == toks["reference"]
    assert len(set(toks["hf"])) > 3  # really sampled, not a greedy repeat


@pytest.mark.parametrize("opts, words", [
    ({"attn": "flash2"}, "--attn flash2 needs the 'flash-attn' package"),
    ({"attn": "xformers"}, "--attn xformers needs the 'xformers' package"),
    ({"quant": "int8"}, "--quant int8 needs the 'bitsandbytes' package"),
    ({"attn": "bogus"}, "--attn must be one of sdpa, flash2, xformers, eager"),
    ({"force_flash": True}, "--force-flash runs Case4's CUDA decode attention kernel: it needs a CUDA GPU"),
])
def test_hf_options_refused_in_one_line(neox, opts, words):
    if opts.get("quant") and __import__("importlib").util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(BadInput, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        load_backend({"model": str(neox[0]), "backend": "hf", **opts}, "cpu", "float32")


def test_hf_options_on_another_backend_are_refused(neox):
    with pytest.raises(BadInput, match=r"^--attn eager applies to --backend hf only \(got --backend reference\)$"):
        load_backend({"model": "synthetic:tiny", "backend": "reference", "attn": "eager"}, "cpu", "float32")


def test_eager_attention_matches(neox):
    folder, hf = neox
    _, b = load_backend({"model": str(folder), "backend": "hf", "attn": "eager"}, "cpu", "float32")
    ids = _random_ids(8, 6)
    got = [b.prefill(0, ids[:5])] + [b.step(0, t) for t in ids[5:]]
    assert (torch.stack(got) - _hf_logits(hf, ids)[4:]).abs().max().item() < 1e-4
    assert b.status()["attn"] == "eager"


# -- end to end through run_ipc.sh ------------------------------------------------------------

def _run_ipc(model, out: Path, *flags, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASE4_") or k in ("CASE4_VENV", "CASE4_HOME")}
    env.update(env_extra or {})
    return subprocess.run(["bash", str(ROOT / "run_ipc.sh"), str(model), "--prompt", "Hello there", "--max-tokens",
                           "8", "--ignore-eos", "--output-dir", str(out), "--run-name", "r", "--device", "cpu", *flags],
                          capture_output=True, text=True, timeout=300, env=dict(env, PYTHONUNBUFFERED="1"))


def _error_line(r) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[")]
    assert len(err) == 1 and err[0].startswith("case4: error:"), r.stderr
    return err[0]


@pytest.mark.parametrize("sampling", ["client", "device"])
def test_auto_runs_an_architecture_only_transformers_has_through_hf(neox, tmp_path, sampling):
    from transformers import AutoTokenizer
    folder, hf = neox
    r = _run_ipc(folder, tmp_path, "--sampling", sampling)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if "backend auto" in l]
    assert len(lines) == 1 and "-> hf (" in lines[0] and "'GPTNeoXForCausalLM'" in lines[0], r.stderr
    ids = AutoTokenizer.from_pretrained(str(folder))("Hello there")["input_ids"]
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist()
    assert [int(t) for t in (tmp_path / "r_tokens.txt").read_text().split()] == want


@pytest.mark.parametrize("flags, env, words", [
    (("--backend", "hf", "--attn", "flash2"), {}, "--attn flash2 needs the 'flash-attn' package"),
    (("--backend", "hf"), {"CASE4_ATTN": "xformers"}, "--attn xformers needs the 'xformers' package"),
    (("--backend", "hf", "--attn", "nope"), {}, "--attn must be one of"),
    (("--backend", "hf", "--force-flash"), {}, "--force-flash runs Case4's CUDA decode attention kernel"),
    ((), {"CASE4_FORCE_FLASH": "1"}, "--force-flash runs Case4's CUDA decode attention kernel"),
])
def test_run_ipc_bad_hf_options_exit_2_in_one_line(neox, tmp_path, flags, env, words):
    assert words in _error_line(_run_ipc(neox[0], tmp_path, *flags, env_extra=env))


def test_an_architecture_transformers_cannot_load_exits_2(neox, tmp_path, byte_level_tokenizer):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo_lm",
                                                    "vocab_size": 300}))
    byte_level_tokenizer(folder)
    line = _error_line(_run_ipc(folder, tmp_path / "o"))
    assert "transformers cannot load this configuration" in line and "foo_lm" in line, line


# -- the benchmark's case4-hf rows ------------------------------------------------------------

def test_bench_case4_hf_rows(tmp_path):
    """case4-hf/<attn> rows measured on the CPU beside a custom-path row, greedy tokens equal
    (the same weight arena); flash2 / xformers without their package: skipped, saying which."""
    import sys
    fast = ["--device", "cpu", "--shapes", "tiny", "--steps", "6", "--repeats", "1", "--warmup-steps", "2",
            "--cpu-copy-mib", "8", "--copy-repeats", "3"]
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "decode.py"), "--out", str(tmp_path), *fast,
                        "--case4-backend", "reference", "--systems", "case4/none/device,case4-hf/*"],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {r["system"]: r for r in json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]}
    for attn in ("sdpa", "eager"):
        r = rows[f"case4-hf/{attn}"]
        assert "error" not in r and not r.get("skipped"), r
        assert r["tok_s"] > 0 and r["backend"] == "hf" and "DynamicCache" in r["graphs_note"]
        assert r["first_tokens"] == rows["case4/none/device"]["first_tokens"]
    for attn, pkg in (("flash2", "flash-attn"), ("xformers", "xformers")):
        if importlib.util.find_spec(pkg.replace("-", "_")) is None:
            assert f"needs the '{pkg}' package" in rows[f"case4-hf/{attn}"]["skipped"]


def test_our_attention_names_are_not_taken_for_flash_attention():
    """transformers routes any attention implementation whose name contains "flash" to its flash-attention
    loader (which looked for a hub kernel named `case4_force_flash` on the GPU image and raised); the
    names we register must stay ordinary attention functions."""
    from transformers.utils.generic import is_flash_attention_requested
    from server.hf_backend import _ATTN_IMPL, FORCE_FLASH_IMPL
    for name in (FORCE_FLASH_IMPL, _ATTN_IMPL["xformers"]):
        assert not is_flash_attention_requested(requested_attention_implementation=name), name
