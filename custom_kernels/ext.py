"""Import wrapper of the compiled CUDA extension `custom_kernels._case4_cuda`."""
from __future__ import annotations

from case4_errors import BadInput

BUILD_COMMAND = "cd custom_kernels && python setup.py build_ext --inplace"


class ExtensionUnavailable(BadInput):
    """The CUDA extension is not built (or cannot load here)."""


_mod = None


def load_extension():
    """The `_case4_cuda` module; ExtensionUnavailable (with the build command) if it is missing."""
    global _mod
    if _mod is None:
        try:
            from custom_kernels import _case4_cuda as m
        except ImportError as e:
            raise ExtensionUnavailable(
                f"the CUDA extension custom_kernels._case4_cuda is not available ({e}); "
                f"build it with: {BUILD_COMMAND}") from e
        _mod = m
    return _mod
