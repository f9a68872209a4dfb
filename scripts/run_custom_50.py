"""The seed's 50-token IPC run: the full three-process flow for 50 tokens.

    python scripts/run_custom_50.py [orchestrator flags]   (e.g. --model synthetic:llama2-7b --prompt-len 32)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import orchestrator  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--max-tokens" not in argv:
        argv = ["--max-tokens", "50", *argv]
    if "--run-name" not in argv:
        argv += ["--run-name", "run_custom_50"]
    sys.exit(orchestrator.main(argv))
