"""Build the Case4 CUDA extension with plain nvcc (no libtorch):

    cd custom_kernels && python setup.py build_ext --inplace

produces custom_kernels/_case4_cuda*.so. Targets sm_90a (Hopper) and sm_80; override with
CASE4_CUDA_ARCHS="90a;80". CUDA is found through $CUDA_HOME or the nvcc on PATH; cuBLAS
headers come from the toolkit or the `nvidia-cublas` pip package.
"""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
SOURCES = ["gemv.cu", "norm.cu", "attention.cu", "sampling.cu", "step.cu", "graphs.cpp", "bindings.cpp"]


def cuda_home() -> Path:
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    return Path(nvcc).resolve().parent.parent


def cublas_dirs(home: Path) -> tuple[list[str], list[str]]:
    """(include dirs, library dirs) holding cublas_v2.h / libcublas.so."""
    inc, lib = [], []
    for d in (home / "include", home / "targets" / "x86_64-linux" / "include"):
        if (d / "cublas_v2.h").exists():
            inc.append(str(d))
    for d in (home / "lib64", home / "targets" / "x86_64-linux" / "lib", home / "lib"):
        if any(d.glob("libcublas.so*")):
            lib.append(str(d))
    if not inc or not lib:
        for sp in sys.path:
            for sub in ("nvidia/cu13", "nvidia/cublas"):
                p = Path(sp) / sub
                if not inc and (p / "include" / "cublas_v2.h").exists():
                    inc.append(str(p / "include"))
                if not lib and any((p / "lib").glob("libcublas.so*")):
                    lib.append(str(p / "lib"))
    return inc, lib


def cublas_lib_flag(lib: list[str]) -> str:
    for d in lib:
        if (Path(d) / "libcublas.so").exists():
            return "-lcublas"
        for f in sorted(Path(d).glob("libcublas.so.*")):
            return f"-l:{f.name}"  # pip wheels ship only the versioned name
    return "-lcublas"


def gencode_flags() -> list[str]:
    archs = os.environ.get("CASE4_CUDA_ARCHS", "90a;80").split(";")
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]


class NvccBuild(build_ext):
    def build_extension(self, ext):
        import pybind11
        home = cuda_home()
        nvcc = str(home / "bin" / "nvcc")
        inc, lib = cublas_dirs(home)
        includes = [str(CSRC), pybind11.get_include(), sysconfig.get_paths()["include"], *inc]
        tmp = Path(self.build_temp)
        tmp.mkdir(parents=True, exist_ok=True)
        flags = ["-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo",
                 *gencode_flags(), *[f"-I{d}" for d in includes]]
        objs, cmds = [], []
        for src in ext.sources:
            obj = tmp / (Path(src).name + ".o")
            cmds.append([nvcc, *flags, "-c", str(CSRC / src), "-o", str(obj)])
            objs.append(str(obj))
        # the sources compile independently: in parallel (the build is as long as its longest file;
        # CASE4_BUILD_JOBS caps the number of nvcc processes, default: one per core)
        raw = os.environ.get("CASE4_BUILD_JOBS", "0")
        if not raw.strip().isdigit():
            print(f"CASE4_BUILD_JOBS must be a whole number of nvcc processes (0: one per core), got '{raw}'",
                  file=sys.stderr)
            sys.exit(2)
        jobs = max(1, min(len(cmds), int(raw) or os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            for cmd in cmds:
                print(" ".join(cmd), flush=True)
            for f in [pool.submit(subprocess.check_call, cmd) for cmd in cmds]:
                f.result()
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [nvcc, "-shared", *gencode_flags(), *objs, "-o", str(out),
                *[f"-L{d}" for d in lib], *[f"-Xlinker=-rpath={d}" for d in lib], cublas_lib_flag(lib)]
        print(" ".join(link), flush=True)
        subprocess.check_call(link)


if __name__ == "__main__":
    setup(
        name="case4_cuda",
        ext_modules=[Extension("_case4_cuda", sources=SOURCES)],
        cmdclass={"build_ext": NvccBuild},
    )
