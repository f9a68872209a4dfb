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
