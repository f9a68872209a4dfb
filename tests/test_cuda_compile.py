"""CPU check: every CUDA source compiles with nvcc (skipped without nvcc), with the build's own command
(custom_kernels/setup.py compile_command) for the architectures a default build compiles on this
machine (cuda_archs: the visible GPUs, or sm_90a + sm_80 without one), plus sm_80 where that list
lacks it, so the pre-Hopper fallbacks keep compiling. A kernel that does not compile, or an sm_90-only
instruction left unguarded, cannot land. cuBLAS headers come from the toolkit or the `nvidia-cublas`
pip package; without them the files that include cuBLAS are skipped."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "custom_kernels"
CSRC = PKG / "csrc"
NVCC = shutil.which("nvcc")


def _setup():
    spec = importlib.util.spec_from_file_location("case4_setup", PKG / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SETUP = _setup()
DEFAULT = SETUP.cuda_archs()  # exactly what `python setup.py build_ext` compiles here
ARCH_SETS = [DEFAULT] + ([] if "80" in DEFAULT else [["80"]])


def _needs_cublas(src: Path) -> bool:
    seen, todo = set(), [src]
    while todo:
        f = todo.pop()
        if f in seen or not f.exists():
            continue
        seen.add(f)
        text = f.read_text()
        if "#include <cublas" in text:
            return True
        for line in text.splitlines():
            if line.startswith('#include "'):
                todo.append(CSRC / line.split('"')[1])
    return False


def test_sources_are_the_build_sources():
    """A new .cu/.cpp file in csrc/ that the build does not list would be neither built nor checked."""
    assert sorted(SETUP.SOURCES) == sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cu", ".cpp"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("archs", ARCH_SETS, ids=lambda a: "sm_" + "+".join(a))
@pytest.mark.parametrize("src", SETUP.SOURCES)
def test_compiles(src, archs, tmp_path):
    pytest.importorskip("pybind11")
    inc, _ = SETUP.cublas_dirs(SETUP.cuda_home())
    if _needs_cublas(CSRC / src) and not inc:
        pytest.skip("no cuBLAS headers (pip install nvidia-cublas)")
    cmd = SETUP.compile_command(SETUP.find_nvcc() or NVCC, src, tmp_path / "x.o", archs)
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr[-4000:]}"


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
def test_build_jobs_knob_rejects_non_numbers():
    """`CASE4_BUILD_JOBS` (setup.py's cap on parallel nvcc processes) that is not a whole number stops
    the build with a one-line error and exit code 2, before anything compiles."""
    env = dict(os.environ, CASE4_BUILD_JOBS="four")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=PKG, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "CASE4_BUILD_JOBS must be a whole number of nvcc processes (0: one per core), got 'four'")
    assert "Traceback" not in r.stderr
