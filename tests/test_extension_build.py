"""CPU tests of the CUDA extension's build decisions (custom_kernels/setup.py cuda_archs, custom_kernels/ext.py
load_extension), with fakes for nvcc, the GPU and the compiler: which architectures a default build
compiles, and the one line a user sees when the first run cannot build it, or the build fails."""
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from custom_kernels import ext


@pytest.fixture()
def setup_mod():
    return ext._setup_module()


# ---- which architectures a default build compiles

@pytest.mark.parametrize("caps, want", [
    ([(9, 0)], ["90a"]),                      # Hopper keeps its sm_90a-only instructions
    ([(8, 0)], ["80"]),
    ([(8, 9), (9, 0), (9, 0)], ["90a", "89"]),  # each visible GPU once
    ([(10, 0)], ["100"]),
    ([], ["90a", "80"]),                      # no GPU: the measured target and the oldest supported
])
def test_default_archs_follow_the_visible_gpus(setup_mod, caps, want):
    assert setup_mod.cuda_archs(env={}, capabilities=lambda: caps) == want


def test_archs_variable_wins_over_the_gpu(setup_mod):
    assert setup_mod.cuda_archs(env={"CASE4_CUDA_ARCHS": "80; 90a"}, capabilities=lambda: [(9, 0)]) == ["80", "90a"]


@pytest.mark.parametrize("env, caps, message", [
    ({}, [(7, 5)], "sm_75 is not supported: the kernels need sm_80 or newer"),
    ({"CASE4_CUDA_ARCHS": "70"}, [], "sm_70 is not supported: the kernels need sm_80 or newer"),
    ({"CASE4_CUDA_ARCHS": "hopper"}, [], "CASE4_CUDA_ARCHS must be a ';'-separated list such as '90a;80', got 'hopper'"),
])
def test_unsupported_archs_are_refused_in_one_line(setup_mod, env, caps, message):
    with pytest.raises(setup_mod.BuildError) as e:
        setup_mod.cuda_archs(env=env, capabilities=lambda: caps)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_compile_failure_names_the_compiler_error_line(setup_mod):
    out = ("nvcc warning : something\n"
           "ptxas /tmp/x.ptx, line 3; error   : Feature 'cp.async.bulk.prefetch' requires .target sm_90 or higher\n"
           "ptxas fatal   : Ptx assembly aborted due to errors\n")
    e = setup_mod.CompileFailed("gemv.cu", out)
    assert str(e) == ("gemv.cu: ptxas /tmp/x.ptx, line 3; error : Feature 'cp.async.bulk.prefetch' requires "
                      ".target sm_90 or higher")


# ---- what the first load does

@pytest.fixture()
def fake(monkeypatch, tmp_path, setup_mod):
    """ext with no module importable, its package folder in tmp_path, and a setup module whose nvcc,
    GPU and build the test sets."""
    state = {"built": False, "builds": 0, "progress": []}
    so = tmp_path / "_case4_cuda.so"

    def fake_import():
        if not so.exists():
            raise ImportError("No module named 'custom_kernels._case4_cuda'")
        return "the module"

    def fake_build(out, tmp, archs, on_command=None, on_done=None):
        state["builds"] += 1
        state["archs"] = archs
        time.sleep(0.2)  # long enough for a second loader to wait on the lock
        if state.get("fail"):
            raise setup_mod.CompileFailed("gemv.cu", "gemv.cu(12): error: identifier \"x\" is undefined\n1 error\n")
        for src in setup_mod.SOURCES:
            on_done(src, "")
        out.write_text("built")

    monkeypatch.setattr(ext, "PKG", tmp_path)
    monkeypatch.setattr(ext, "LOG", tmp_path / "build" / "build.log")
    monkeypatch.setattr(ext, "_built", lambda: so)
    monkeypatch.setattr(ext, "_import", fake_import)
    monkeypatch.setattr(ext, "_setup_module", lambda: setup_mod)
    monkeypatch.setattr(ext, "_mod", None)
    monkeypatch.setattr(ext, "on_progress", state["progress"].append)
    monkeypatch.setattr(setup_mod, "find_nvcc", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(setup_mod, "visible_capabilities", lambda: [(9, 0)])
    monkeypatch.setattr(setup_mod, "build", fake_build)
    monkeypatch.delenv("CASE4_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("CASE4_BUILD_EXT", raising=False)
    return state


def _one_line_error() -> str:
    with pytest.raises(ext.ExtensionUnavailable) as e:
        ext.load_extension()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_nvcc_says_so_and_does_not_build(fake, monkeypatch, setup_mod):
    monkeypatch.setattr(setup_mod, "find_nvcc", lambda: None)
    assert "nvcc not found" in _one_line_error()
    assert fake["builds"] == 0


def test_nvcc_without_a_gpu_does_not_build(fake, monkeypatch, setup_mod):
    monkeypatch.setattr(setup_mod, "visible_capabilities", lambda: [])
    assert "no CUDA GPU is visible to build it for" in _one_line_error()
    assert fake["builds"] == 0


def test_no_pybind11_says_so(fake, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "pybind11" else real(n, *a))
    assert "pybind11 is not installed (pip install pybind11)" in _one_line_error()
    assert fake["builds"] == 0


def test_build_turned_off(fake, monkeypatch):
    monkeypatch.setenv("CASE4_BUILD_EXT", "0")
    assert "CASE4_BUILD_EXT=0" in _one_line_error()
    assert fake["builds"] == 0


def test_failed_build_shows_the_compiler_error_line(fake):
    fake["fail"] = True
    msg = _one_line_error()
    assert msg.startswith('building the CUDA extension failed: gemv.cu: gemv.cu(12): error: identifier "x" is undefined')
    assert "whole log:" in msg
    assert fake["builds"] == 1


def test_first_load_builds_for_the_gpu_with_progress(fake):
    assert ext.load_extension() == "the module"
    assert fake["builds"] == 1 and fake["archs"] == ["90a"]
    assert fake["progress"][0].startswith("building the CUDA extension for sm_90a (first use")
    assert fake["progress"][-1].startswith("built the CUDA extension in")


def test_heartbeat_progress_during_a_long_build(fake, monkeypatch):
    monkeypatch.setattr(ext, "HEARTBEAT_S", 0.05)
    ext.load_extension()
    assert any(p.startswith("building the CUDA extension: ") and "steps done" in p for p in fake["progress"])


def test_two_loaders_build_once(fake, monkeypatch):
    """Two processes starting at once: one builds, the other waits on the lock and loads its result."""
    got, errors = [], []

    def load():
        try:
            ext._mod = None
            got.append(ext.load_extension())
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == ["the module", "the module"]
    assert fake["builds"] == 1


def test_present_but_unloadable_module_is_not_rebuilt(fake, monkeypatch, tmp_path):
    (tmp_path / "_case4_cuda.so").write_text("x")
    monkeypatch.setattr(ext, "_import", lambda: (_ for _ in ()).throw(ImportError("undefined symbol: foo")))
    assert "undefined symbol: foo" in _one_line_error()
    assert fake["builds"] == 0


def test_auto_backend_falls_back_with_the_build_error_in_one_line(fake, monkeypatch, capsys):
    """On a GPU machine whose build fails, `--backend auto` says why in one stderr line and uses the reference."""
    import torch
    from server.backends import pick_backend
    fake["fail"] = True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_backend("auto") == "reference"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("[case4] backend auto -> reference (building the CUDA extension failed: gemv.cu: ")


def test_progress_goes_to_stderr_by_default(capsys):
    ext._stderr("building the CUDA extension ...")
    out = capsys.readouterr()
    assert out.err == "[case4] building the CUDA extension ...\n" and out.out == ""  # stdout: the text only


def test_gpu_suite_fails_not_skips_without_the_extension(tmp_path):
    """On a machine with a CUDA device (faked here) and no loadable extension, `pytest -m gpu` fails."""
    root = Path(__file__).resolve().parent.parent
    if any((root / "custom_kernels").glob("_case4_cuda*.so")):
        pytest.skip("the extension is built in this checkout")
    (tmp_path / "fakegpu.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}:{root}", "CASE4_BUILD_EXT": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "fakegpu", "-m", "gpu", "-q", "-x", "tests/gpu/test_graphs.py"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:]
    assert "a CUDA device is present but the extension is unavailable" in r.stdout
    assert "CASE4_BUILD_EXT=0" in r.stdout


def test_build_links_into_a_folder_that_does_not_exist_yet(setup_mod, monkeypatch, tmp_path):
    """`python setup.py build_ext --inplace` on a clean tree links into setuptools' build/lib.* folder,
    which nothing has created yet (seen on a fresh H100 machine: ld could not open its output)."""
    nvcc = tmp_path / "nvcc"
    nvcc.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done; touch "$2"\n')
    nvcc.chmod(0o755)
    monkeypatch.setattr(setup_mod, "find_nvcc", lambda: str(nvcc))
    monkeypatch.setattr(setup_mod, "cublas_dirs", lambda home: ([], []))
    out = tmp_path / "build" / "lib.fresh" / "_case4_cuda.so"
    setup_mod.build(out, tmp_path / "temp", ["90a"])
    assert out.is_file() and not list(out.parent.glob("*.tmp*"))
