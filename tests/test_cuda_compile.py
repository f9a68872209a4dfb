"""CPU check: every CUDA source compiles with nvcc for sm_90a (skipped without nvcc), so a
kernel that does not compile cannot land. cuBLAS headers come from the toolkit or the
`nvidia-cublas` pip package; without them the files that include cuBLAS are skipped."""
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "custom_kernels" / "csrc"
NVCC = shutil.which("nvcc")
SOURCES = sorted(p.name for p in CSRC.glob("*.cu")) + sorted(p.name for p in CSRC.glob("*.cpp"))


def _cublas_include():
    sys.path.insert(0, str(CSRC.parent))
    try:
        from setup import cublas_dirs, cuda_home  # custom_kernels/setup.py
        inc, _ = cublas_dirs(cuda_home())
        return inc
    except Exception:  # noqa: BLE001
        return []
    finally:
        sys.path.pop(0)


def _needs_cublas(src: Path) -> bool:
    seen, todo = set(), [src]
    while todo:
        f = todo.pop()
        if f in seen or not f.exists():
            continue
        seen.add(f)
        text = f.read_text()
        if "cublas" in text and "#include <cublas" in text:
            return True
        for line in text.splitlines():
            if line.startswith('#include "'):
                todo.append(CSRC / line.split('"')[1])
    return False


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("src", SOURCES)
def test_compiles(src, tmp_path):
    inc = _cublas_include()
    if _needs_cublas(CSRC / src) and not inc:
        pytest.skip("no cuBLAS headers (pip install nvidia-cublas)")
    flags = []
    if src == "bindings.cpp":
        try:
            import pybind11
        except ImportError:
            pytest.skip("pybind11 not installed")
        flags += [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    cmd = [NVCC, "-std=c++17", "-O1", "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler", "-fPIC",
           f"-I{CSRC}", *[f"-I{d}" for d in inc], *flags, "-c", str(CSRC / src), "-o", str(tmp_path / "x.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_build_jobs_knob_rejects_non_numbers():
    """`CASE4_BUILD_JOBS` (setup.py's cap on parallel nvcc processes) that is not a whole number stops
    the build with a one-line error and exit code 2, before anything compiles."""
    env = dict(os.environ, CASE4_BUILD_JOBS="four")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=CSRC.parent, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "CASE4_BUILD_JOBS must be a whole number of nvcc processes (0: one per core), got 'four'")
    assert "Traceback" not in r.stderr
