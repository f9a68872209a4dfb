"""GPU tests (`pytest -m gpu`, run by tests/run_gpu.sh): skipped without a CUDA device; on a machine
with one, a missing or unloadable extension FAILS every selected GPU test (it is built on first use
where nvcc exists, custom_kernels/ext.py), so a failed build cannot pass as "all skipped"."""
import pytest
import torch

from server.model.config import SYNTHETIC_SHAPES, with_max_seq


def pytest_collection_modifyitems(config, items):
    no_gpu = None if torch.cuda.is_available() else pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "tests/gpu" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if no_gpu:
                item.add_marker(no_gpu)


_ext_error = []  # the one load attempt's error, shared by every test of the session


@pytest.fixture(autouse=True)
def _extension_loads():
    """Loaded once, when the first GPU test runs (not at collection: a CPU-only run on a GPU machine
    deselects these tests and must not build or need the extension)."""
    if not _ext_error:
        try:
            from custom_kernels.ext import load_extension
            load_extension()
            _ext_error.append(None)
        except Exception as e:  # noqa: BLE001
            _ext_error.append(f"{type(e).__name__}: {e}")
    if _ext_error[0]:
        pytest.fail(f"a CUDA device is present but the extension is unavailable: {_ext_error[0]}", pytrace=False)


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
