"""GPU tests (`pytest -m gpu`, run by tests/run_gpu.sh): skipped without CUDA or the built extension."""
import pytest
import torch

from server.model.config import SYNTHETIC_SHAPES, with_max_seq


def pytest_collection_modifyitems(config, items):
    why = None
    if not torch.cuda.is_available():
        why = "no CUDA GPU"
    else:
        try:
            from custom_kernels.ext import load_extension
            load_extension()
        except Exception as e:  # noqa: BLE001
            why = f"extension unavailable: {e}"
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


_models = {}


def synthetic_model(shape: str, dtype: str = "float16", max_seq: int = 2048, seed: int = 0):
    """A LoadedModel with synthetic weights on the GPU (cached per test session)."""
    key = (shape, dtype, max_seq, seed)
    if key not in _models:
        from server.model.weights import synthetic_weights
        from server.model.resolve import LoadedModel
        if len(_models) >= 2:  # keep GPU memory bounded (7B fp16 is 13.5 GB)
            _models.clear()
            torch.cuda.empty_cache()
        cfg = with_max_seq(SYNTHETIC_SHAPES[shape], max_seq)
        w = synthetic_weights(cfg, dtype, "cuda", seed)
        _models[key] = LoadedModel(name=f"synthetic:{shape}", cfg=cfg, weights=w, tokenizer_dir=None, eos_ids=())
    return _models[key]
