"""The compiled CUDA extension `custom_kernels._case4_cuda`: imported, or built on first use.

Where it is missing, nvcc exists and a GPU is visible, the first load builds it (custom_kernels/setup.py,
for the visible GPUs: a few minutes), saying so on stderr with a progress line every HEARTBEAT_S, so a
first run on a fresh GPU machine gets the cuda backend with no manual step. One process builds at a
time (a lock in the package folder); the module appears by an atomic rename. Where it cannot be built,
or the build fails, ExtensionUnavailable says why in one line (the compiler's first error line and the
log), and `--backend auto` falls back to the reference backend with that line (server/backends.py).
CASE4_BUILD_EXT=0 turns the build on first use off. docs/decisions.md "CUDA extension build".
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import threading
import time
from pathlib import Path

from case4_errors import BadInput

BUILD_COMMAND = "cd custom_kernels && python setup.py build_ext --inplace"
PKG = Path(__file__).resolve().parent
LOG = PKG / "build" / "build.log"
HEARTBEAT_S = 15.0  # a progress line at least this often: each one restarts the orchestrator's start-up wait


class ExtensionUnavailable(BadInput):
    """The CUDA extension is not built (or cannot load here)."""


def _stderr(text: str) -> None:
    print(f"[case4] {text}", file=sys.stderr, flush=True)


# where progress lines go: stderr; the server process sends them to the orchestrator instead (ipc/peers.py
# progress(), which also restarts its start-up wait), see server/process.py
on_progress = _stderr
_mod = None


def set_progress(fn) -> None:
    global on_progress
    on_progress = fn


def _setup_module():
    """custom_kernels/setup.py as a module (its setup() runs only as a script)."""
    spec = importlib.util.spec_from_file_location("case4_setup", PKG / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _import():
    importlib.invalidate_caches()
    return importlib.import_module("custom_kernels._case4_cuda")


def _built() -> Path:
    return PKG / ("_case4_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))


def build_blocker(setup=None) -> str | None:
    """Why the extension cannot be built here and now (None: it can)."""
    if os.environ.get("CASE4_BUILD_EXT", "1") == "0":
        return "CASE4_BUILD_EXT=0 turns the build on first use off"
    setup = setup or _setup_module()
    if importlib.util.find_spec("pybind11") is None:
        return "pybind11 is not installed (pip install pybind11)"
    if setup.find_nvcc() is None:
        return f"nvcc not found under {setup.cuda_home()} (install the CUDA toolkit or set CUDA_HOME)"
    if not setup.visible_capabilities():
        return "no CUDA GPU is visible to build it for"
    return None


def build_extension(setup=None) -> None:
    """Build into the package folder under the lock, with progress lines; ExtensionUnavailable on failure."""
    setup = setup or _setup_module()
    try:
        archs = setup.cuda_archs()
        with setup.build_lock(PKG / "build"):
            if _built().exists():  # another process built it while we waited for the lock
                return
            _build_locked(setup, archs)
    except setup.BuildError as e:
        raise ExtensionUnavailable(f"the CUDA extension cannot be built: {e}") from None
    except setup.CompileFailed as e:
        raise ExtensionUnavailable(f"building the CUDA extension failed: {e} (whole log: {LOG})") from None


def _build_locked(setup, archs: list[str]) -> None:
    n = len(setup.SOURCES) + 1  # + the link
    done, t0, stop = [], time.monotonic(), threading.Event()
    on_progress(f"building the CUDA extension for sm_{', sm_'.join(archs)} (first use, a few minutes; "
                f"log: {LOG}) ...")

    def heartbeat():
        while not stop.wait(HEARTBEAT_S):
            on_progress(f"building the CUDA extension: {len(done)}/{n} steps done, {time.monotonic() - t0:.0f} s")
    LOG.parent.mkdir(parents=True, exist_ok=True)
    tmp = PKG / "build" / f"tmp{os.getpid()}"
    beat = threading.Thread(target=heartbeat, name="case4-build-progress", daemon=True)
    beat.start()
    try:
        with open(LOG, "w") as log:
            def on_done(src, output):
                done.append(src)
                log.write(f"== {src}\n{output}")
                log.flush()
            setup.build(_built(), tmp, archs, on_command=lambda cmd: log.write(" ".join(cmd) + "\n"),
                        on_done=on_done)
    finally:
        stop.set()
        beat.join()
        shutil.rmtree(tmp, ignore_errors=True)
    on_progress(f"built the CUDA extension in {time.monotonic() - t0:.0f} s: {_built()}")


def load_extension(build: bool = True):
    """The `_case4_cuda` module, built first where it is missing and can be built (build=True);
    ExtensionUnavailable, one line saying why, otherwise."""
    global _mod
    if _mod is None:
        try:
            _mod = _import()
        except ImportError as e:
            if _built().exists() or not build:  # there but unloadable: a rebuild would not help
                raise ExtensionUnavailable(
                    f"the CUDA extension custom_kernels._case4_cuda is not available ({e}); "
                    f"build it with: {BUILD_COMMAND}") from e
            setup = _setup_module()
            why = build_blocker(setup)
            if why:
                raise ExtensionUnavailable(
                    f"the CUDA extension custom_kernels._case4_cuda is not built and cannot be built here: {why}; "
                    f"build it with: {BUILD_COMMAND}") from e
            build_extension(setup)
            try:
                _mod = _import()
            except ImportError as e2:
                raise ExtensionUnavailable(f"the CUDA extension was built but does not load: {e2}") from e2
    return _mod
