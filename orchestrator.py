"""Case4's entry point: `python orchestrator.py ...`, the `case4` console script and
`bash run_ipc.sh` all land in main(). The parts live in conductor/: the command line
(cli.py), the conductor of a server + client pair and its generations (run.py), the
metrics and output files (outputs.py), the --trace timeline (trace.py), the OpenAI-compatible
HTTP server `serve` (serve.py, docs/serve.md); docs/ipc.md describes the three processes
and their protocol.

    python orchestrator.py --model smollm2 --prompt "Hello" --max-tokens 64
    python orchestrator.py serve --model smollm2 --port 8000

Exit codes: 0 ok, 2 bad input (one line on stderr), 1 internal failure (names the
process), 130 interrupted (partial outputs are written).
"""
import sys

from conductor.cli import main

if __name__ == "__main__":
    sys.exit(main())
