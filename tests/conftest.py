"""Shared fixtures. The built-in model is prepared once into $CASE4_HOME (the same cache
the CLI uses), so the CPU suite converts the GGUF at most once per machine."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from server.model.resolve import prepare_smollm2
    return prepare_smollm2()


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_dir):
    from server.model.resolve import resolve_model
    return resolve_model("smollm2", dtype="float32", device="cpu", max_seq=512)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


def _byte_level_tokenizer(folder: Path) -> None:
    """A real HF tokenizer (tokenizer.json + tokenizer_config.json): ids 0..255 are the bytes
    of the UTF-8 text, 256 = <s>, 257 = </s>; it fits the 512-token vocab of the tiny shapes."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars = {b: chr(b) for b in bs}  # GPT-2's printable stand-ins for the bytes
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    tok = Tokenizer(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}))


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    """The writer of that tokenizer into a folder, for fixtures of a wider scope (tests/test_serve.py);
    `from conftest import` would be ambiguous beside tests/gpu/conftest.py."""
    return _byte_level_tokenizer


@pytest.fixture
def tiny_hf_folder(tmp_path):
    """(folder, weights): synthetic:tiny saved as a servable HF folder (fp32 safetensors,
    config.json, a byte-level tokenizer), for the loader and bad-input tests."""
    from server.model.config import SYNTHETIC_SHAPES
    from server.model.weights import save_hf_folder, synthetic_weights
    w = synthetic_weights(SYNTHETIC_SHAPES["tiny"], "float32", "cpu", seed=1)
    folder = tmp_path / "m"
    save_hf_folder(w, folder)
    _byte_level_tokenizer(folder)
    return folder, w
