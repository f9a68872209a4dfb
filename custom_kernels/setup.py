"""Build the Case4 CUDA extension with plain nvcc (no libtorch):

    cd custom_kernels && python setup.py build_ext --inplace

produces custom_kernels/_case4_cuda*.so. The first run of the server builds it too where nvcc and a
GPU exist (custom_kernels/ext.py). Targets: the visible GPUs (as torch.utils.cpp_extension does; 9.0
becomes sm_90a so the Hopper-only instructions stay on), or sm_90a + sm_80 without a GPU; an explicit
list: CASE4_CUDA_ARCHS="90a;80". sm_80 is the oldest supported (docs/decisions.md "CUDA
architectures"). CUDA is found through $CUDA_HOME or the nvcc on PATH; cuBLAS headers come from the
toolkit or the `nvidia-cublas` pip package. tests/test_cuda_compile.py compiles with the same
commands (cuda_archs, compile_command), so what CI compiles is what the build compiles.
"""
import concurrent.futures
import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE / "csrc"
SOURCES = ["gemv.cu", "gemv_quant.cu", "norm.cu", "attention.cu", "sampling.cu", "step.cu", "graphs.cpp", "bindings.cpp"]


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


NO_GPU_ARCHS = ("90a", "80")  # a build on a machine without a GPU: Hopper (measured) and Ampere
MIN_ARCH = 80  # cp.async, createpolicy and ld.global...L2::cache_hint need sm_80


class BuildError(Exception):
    """A build that cannot start (bad CASE4_CUDA_ARCHS, no nvcc, ...): one line for the user."""


class CompileFailed(Exception):
    """nvcc failed on one source: .src, .output (its whole output), .line (the first error line)."""

    def __init__(self, src: str, output: str):
        self.src, self.output = src, output
        errs = [ln.strip() for ln in output.splitlines() if re.search(r"\berror\b", ln, re.I)]
        last = [ln.strip() for ln in output.splitlines() if ln.strip()]
        self.line = re.sub(r"\s+", " ", (errs or last or ["(no output)"])[0])
        super().__init__(f"{src}: {self.line}")


def visible_capabilities() -> list[tuple[int, int]]:
    """(major, minor) of each visible GPU: through torch where it imports, else nvidia-smi; [] without one."""
    try:
        import torch
    except ImportError:
        smi = shutil.which("nvidia-smi")
        if not smi:
            return []
        r = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                           capture_output=True, text=True)
        caps = [ln.strip().split(".") for ln in r.stdout.splitlines() if re.fullmatch(r"\d+\.\d+", ln.strip())]
        return [(int(a), int(b)) for a, b in caps] if r.returncode == 0 else []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def cuda_archs(env=None, capabilities=None) -> list[str]:
    """The architectures a default build compiles: CASE4_CUDA_ARCHS ("90a;80") if set, else the visible
    GPUs' (9.0 -> "90a": the Hopper features), else NO_GPU_ARCHS. BuildError for one older than sm_80."""
    env = os.environ if env is None else env
    raw = env.get("CASE4_CUDA_ARCHS", "").strip()
    if raw:
        archs = [a.strip() for a in raw.split(";") if a.strip()]
        bad = [a for a in archs if not re.fullmatch(r"\d{2,3}[af]?", a)]
        if bad or not archs:
            raise BuildError(f"CASE4_CUDA_ARCHS must be a ';'-separated list such as '90a;80', got '{raw}'")
    else:
        caps = sorted(set((capabilities or visible_capabilities)()), reverse=True)
        archs = [f"{a}{b}" + ("a" if (a, b) == (9, 0) else "") for a, b in caps] or list(NO_GPU_ARCHS)
    old = [a for a in archs if int(re.match(r"\d+", a).group()) < MIN_ARCH]
    if old:
        raise BuildError(f"sm_{old[0]} is not supported: the kernels need sm_{MIN_ARCH} or newer "
                         f"(sm_90a is the measured target; CASE4_CUDA_ARCHS picks others)")
    return list(dict.fromkeys(archs))


def gencode_flags(archs: list[str]) -> list[str]:
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def find_nvcc() -> str | None:
    nvcc = cuda_home() / "bin" / "nvcc"
    return str(nvcc) if nvcc.exists() else None


def compile_command(nvcc: str, src: str, obj: Path, archs: list[str]) -> list[str]:
    """The one nvcc command of the build (and of the CI compile check) for csrc/<src>."""
    import pybind11
    inc, _ = cublas_dirs(cuda_home())
    includes = [str(CSRC), pybind11.get_include(), sysconfig.get_paths()["include"], *inc]
    return [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-lineinfo",
            *gencode_flags(archs), *[f"-I{d}" for d in includes], "-c", str(CSRC / src), "-o", str(obj)]


def build_jobs() -> int:
    """CASE4_BUILD_JOBS caps the number of nvcc processes (0, the default: one per core)."""
    raw = os.environ.get("CASE4_BUILD_JOBS", "0")
    if not raw.strip().isdigit():
        raise BuildError(f"CASE4_BUILD_JOBS must be a whole number of nvcc processes (0: one per core), got '{raw}'")
    return max(1, min(len(SOURCES), int(raw) or os.cpu_count() or 1))


@contextlib.contextmanager
def build_lock(folder: Path):
    """One build at a time in `folder` (flock; released when the holder exits, even killed)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".case4-build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(out: Path, tmp: Path, archs: list[str], on_command=None, on_done=None) -> None:
    """Compile SOURCES in parallel and link `out`, atomically: linked under a temporary name, then
    renamed, so a reader sees the old module or the new one, never half of one. CompileFailed for
    the first source that does not compile. on_command(cmd), on_done(src, output): progress."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError(f"nvcc not found under {cuda_home()} (install the CUDA toolkit or set CUDA_HOME)")
    jobs = build_jobs()
    tmp.mkdir(parents=True, exist_ok=True)
    cmds = {src: compile_command(nvcc, src, tmp / (src + ".o"), archs) for src in SOURCES}

    def run(src):
        r = subprocess.run(cmds[src], capture_output=True, text=True)
        output = r.stdout + r.stderr
        if on_done:
            on_done(src, output)
        if r.returncode != 0:
            raise CompileFailed(src, output)
    # the sources compile independently: in parallel (the build is as long as its longest file)
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for cmd in cmds.values():
            if on_command:
                on_command(cmd)
        for f in [pool.submit(run, src) for src in SOURCES]:
            f.result()
    _, lib = cublas_dirs(cuda_home())
    out.parent.mkdir(parents=True, exist_ok=True)  # setuptools' build/lib.* does not exist on a clean tree
    part = out.with_name(f"{out.name}.tmp{os.getpid()}")
    link = [nvcc, "-shared", *gencode_flags(archs), *[str(tmp / (s + ".o")) for s in SOURCES], "-o", str(part),
            *[f"-L{d}" for d in lib], *[f"-Xlinker=-rpath={d}" for d in lib], cublas_lib_flag(lib), "-ldl"]
    if on_command:
        on_command(link)
    r = subprocess.run(link, capture_output=True, text=True)
    if on_done:
        on_done("link", r.stdout + r.stderr)
    if r.returncode != 0:
        part.unlink(missing_ok=True)
        raise CompileFailed("link", r.stdout + r.stderr)
    os.replace(part, out)


def main() -> None:
    # setuptools only here: custom_kernels/ext.py and the CI compile check import this file without it
    from setuptools import Extension, setup
    from setuptools.command.build_ext import build_ext

    class NvccBuild(build_ext):
        def build_extension(self, ext):
            try:
                archs = cuda_archs()
                build_jobs()  # a bad knob stops the build before anything compiles
                out = Path(self.get_ext_fullpath(ext.name))
                with build_lock(HERE / "build"):  # the lock custom_kernels/ext.py takes
                    build(out, Path(self.build_temp), archs,
                          on_command=lambda cmd: print(" ".join(cmd), flush=True),
                          on_done=lambda src, output: print(output, end="", file=sys.stderr, flush=True))
            except BuildError as e:
                print(e, file=sys.stderr)
                sys.exit(2)
            except CompileFailed as e:
                print(f"building the CUDA extension failed: {e}", file=sys.stderr)
                sys.exit(1)

    setup(
        name="case4_cuda",
        ext_modules=[Extension("_case4_cuda", sources=SOURCES)],
        cmdclass={"build_ext": NvccBuild},
    )


if __name__ == "__main__":
    main()
