"""The GPU test files, checked on the CPU: every argument of a GPU test must be a fixture or a parameter. A test
whose parametrize decorator is lost (d2b836d dropped test_quant_prefill_dequant_scratch's in an edit of the test
above it) is only found on a GPU machine, as an error at its setup, after a device call has been spent; CI runs
this file on every commit."""
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parent / "gpu"
BUILTIN = {"request", "monkeypatch", "tmp_path", "tmp_path_factory", "capsys", "capfd", "caplog", "recwarn",
           "pytestconfig", "subtests"}


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_gpu_shape_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(path.parent))
    return mod


def _fixtures(mod) -> set[str]:
    names = set()
    for name, obj in vars(mod).items():
        marker = getattr(obj, "_fixture_function_marker", None) or getattr(obj, "_pytestfixturefunction", None)
        if marker is not None:
            names.add(getattr(marker, "name", None) or name)
    return names


def _params(fn) -> set[str]:
    names = set()
    for m in getattr(fn, "pytestmark", []):
        if m.name == "parametrize":
            arg = m.args[0]
            names |= {a.strip() for a in (arg.split(",") if isinstance(arg, str) else arg)}
    return names


def test_every_gpu_test_argument_is_a_fixture_or_a_parameter():
    shared = _fixtures(_load(GPU / "conftest.py")) | _fixtures(_load(GPU.parent / "conftest.py"))
    checked, missing = 0, []
    for path in sorted(GPU.glob("test_*.py")):
        mod = _load(path)
        known = shared | _fixtures(mod) | BUILTIN
        for name, fn in vars(mod).items():
            if name.startswith("test_") and inspect.isfunction(fn):
                checked += 1
                missing += [f"{path.name}::{name}({a})" for a in inspect.signature(fn).parameters
                            if a not in known and a not in _params(fn)]
    assert checked > 50, checked
    assert not missing, f"GPU test arguments that are neither fixtures nor parameters: {missing}"


def test_the_check_finds_a_lost_decorator(tmp_path):
    """The check itself on a file with one parametrized test and one whose decorator is gone."""
    f = tmp_path / "test_x.py"
    f.write_text("import pytest\n\n@pytest.mark.parametrize('a,b', [(1, 2)])\ndef test_ok(a, b, monkeypatch):\n"
                 "    pass\n\ndef test_lost(mode, G):\n    pass\n")
    mod = _load(f)
    bad = [a for fn in (mod.test_ok, mod.test_lost) for a in inspect.signature(fn).parameters
           if a not in BUILTIN | _fixtures(mod) and a not in _params(fn)]
    assert bad == ["mode", "G"], bad
