"""Error types shared by every Case4 process.

`BadInput` is anything the user can fix (a missing model, a bad flag): the CLI prints
its message on one line and exits 2. Everything else is an internal failure (exit 1).
"""


class BadInput(ValueError):
    """A user-fixable error: one-line message, exit code 2."""


class GraphsUnavailable(BadInput):
    """A graph op was asked of a backend that has no CUDA graphs."""
