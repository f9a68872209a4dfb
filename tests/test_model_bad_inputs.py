"""Bad models through the real CLI: exit code 2, one line on stderr that names the culprit,
no traceback (issue 29). The model folders are synthetic:tiny saved as HF folders
(conftest.tiny_hf_folder), broken one way each."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path, model, *flags):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "orchestrator.py"), "--model", str(model), "--prompt", "hi",
                           "--max-tokens", "4", "--backend", "reference", "--output-dir", str(tmp_path / "out"),
                           *flags], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


def error_line(r) -> str:
    """The one error line of a bad-input exit (progress lines start with '[')."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("[")]
    assert len(lines) == 1 and lines[0].startswith("case4: error:"), r.stderr
    return lines[0]


def poison(folder: Path, tname: str, value: float) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    sd[tname][3, 5] = value
    save_file(sd, str(folder / "model.safetensors"))


def test_config_json_that_is_a_list(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder
    (folder / "config.json").write_text('[{"architectures": ["LlamaForCausalLM"]}]')
    line = error_line(run(tmp_path, folder))
    assert f"{folder / 'config.json'}: not a JSON object" in line and "list" in line, line


@pytest.mark.parametrize("field, value, words", [
    ("rms_norm_eps", float("nan"), "config field 'rms_norm_eps': must be a finite number, got nan"),  # was: NaN logits, id 0 every token, exit 0
    ("eos_token_id", "x", "config field 'eos_token_id': must be a token id"),  # was: a ValueError traceback in the server, exit 1
])
def test_config_values_of_the_wrong_kind(tmp_path, tiny_hf_folder, field, value, words):
    import json
    folder, _ = tiny_hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, field: value}))
    line = error_line(run(tmp_path, folder))
    assert words in line, line


def test_folder_without_tokenizer(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder
    r = run(tmp_path, folder)  # the same folder with its tokenizer serves
    assert r.returncode == 0, r.stderr
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (folder / f).unlink()
    line = error_line(run(tmp_path, folder))
    assert f"{folder}: no tokenizer (tokenizer.json or tokenizer.model is missing)" in line, line


def test_tokenizer_json_that_is_a_folder(tmp_path, tiny_hf_folder):
    folder, _ = tiny_hf_folder
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").mkdir()  # transformers' error spanned six lines of stderr
    line = error_line(run(tmp_path, folder))
    assert f"cannot load the tokenizer of {folder}: Couldn't instantiate the backend tokenizer" in line, line


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_nan_or_inf(tmp_path, tiny_hf_folder, value):
    folder, _ = tiny_hf_folder
    poison(folder, "model.layers.1.mlp.down_proj.weight", value)
    line = error_line(run(tmp_path, folder))
    assert (f"{folder / 'model.safetensors'}: tensor 'model.layers.1.mlp.down_proj.weight' holds 1 NaN or Inf"
            in line), line


def test_weights_beyond_float16(tmp_path, tiny_hf_folder):
    """Finite in the file, Inf once converted: the conversion, not the file, is named."""
    folder, _ = tiny_hf_folder
    poison(folder, "model.layers.0.self_attn.k_proj.weight", 1e6)
    assert run(tmp_path, folder, "--dtype", "float32").returncode == 0
    line = error_line(run(tmp_path, folder, "--dtype", "float16"))
    assert "tensor 'model.layers.0.self_attn.k_proj.weight' has values beyond the range of float16" in line, line
    assert "--dtype bfloat16 or float32" in line, line


def test_synthetic_llama2_7b_on_a_cpu_that_is_too_small(tmp_path):
    """The README example: refused before anything is allocated, with what would fit."""
    from server.model.config import SYNTHETIC_SHAPES
    from server.model.memory import available_bytes, need_bytes
    need = need_bytes(SYNTHETIC_SHAPES["llama2-7b"], torch.float32)
    if available_bytes("cpu") >= need:
        pytest.skip(f"this machine has the {need / 1e9:.1f} GB that synthetic:llama2-7b needs in float32")
    line = error_line(run(tmp_path, "synthetic:llama2-7b", "--device", "cpu", "--dtype", "float32"))
    assert "synthetic:llama2-7b in float32 needs 31.2 GB" in line and "the CPU has" in line, line
    assert "synthetic:tiny" in line and "GPU" in line, line


def test_memory_check_boundary(monkeypatch):
    """resolve_model loads a model that needs exactly what is available and refuses one byte less."""
    import server.model.memory as mem
    from server.model.config import SYNTHETIC_SHAPES, with_max_seq
    from server.model.resolve import resolve_model
    need = mem.need_bytes(with_max_seq(SYNTHETIC_SHAPES["tiny"], 512), torch.float32, sessions=3)
    monkeypatch.setattr(mem, "available_bytes", lambda device: need)
    assert resolve_model("synthetic:tiny", sessions=3).weights.arena.numel() > 0
    monkeypatch.setattr(mem, "available_bytes", lambda device: need - 1)
    with pytest.raises(mem.ModelTooLarge, match=r"synthetic:tiny in float32 needs .* for 3 sessions x 512 "
                                                r"positions\) but the CPU has"):
        resolve_model("synthetic:tiny", sessions=3)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_billion_layers_is_refused_before_walking_them(tmp_path, tiny_hf_folder, monkeypatch, quant):
    """num_hidden_layers 10**9 in config.json: the per-layer walks of quant_schemes and of the arena plan
    (need_bytes) ran for many minutes, growing to gigabytes, before the memory check could answer; now
    a floor (4 bits a weight) refuses it at once. The walks are made to fail here, so the test fails fast
    without the floor."""
    import json

    import server.model.memory as mem
    import server.model.weights as weights
    from server.model.resolve import resolve_model

    def walked(*a, **k):
        raise AssertionError("walked the layers of a model that cannot fit")
    monkeypatch.setattr(weights, "_plan", walked)
    monkeypatch.setattr(weights, "matrix_shapes", walked)
    folder, _ = tiny_hf_folder
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 10**9}))
    with pytest.raises(mem.ModelTooLarge, match=r"needs at least .* GB for its weights alone \(1000000000 layers"):
        resolve_model(str(folder), quant=quant)


@pytest.mark.parametrize("name,value", [("CASE4_QGEMV", "tcb"), ("CASE4_QGEMV_GRID", "x8"), ("CASE4_QGEMV_TCW", "32")])
def test_bad_quant_kernel_knob_is_the_users_error(monkeypatch, name, value):
    """The quantized gemv's A/B knobs (README): a bad value is refused by the cuda backend before the extension
    loads, as BadInput (the CLI's one line and exit code 2); the extension's own check raised a ValueError, which the
    CLI reported as an internal failure of the server process (exit 1)."""
    from case4_errors import BadInput
    from ipc.messages import error_reply
    from server.cuda_backend import CudaBackend
    from server.model.resolve import resolve_model
    import server.cuda_backend as cb

    def loaded():
        raise AssertionError("the extension was loaded before the knob was checked")
    monkeypatch.setattr(cb, "load_extension", loaded)
    monkeypatch.setenv(name, value)
    with pytest.raises(BadInput, match=rf"^{name} must be .* got '{value}'$") as e:
        CudaBackend(resolve_model("synthetic:tiny"), graph_mode="none")
    assert error_reply(0, e.value)["error"]["bad_input"]
