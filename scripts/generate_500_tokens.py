"""The seed's generate_500_tokens: one IPC generation with CSV + text output.

    python scripts/generate_500_tokens.py --input-text "Once upon a time" [--max-new-tokens 500]
        [--model M] [--output-dir output] [any other orchestrator flag]

Writes output/generate_500_tokens_{tokens,text}.txt, _metrics.json and a row of
output/generate.csv (see orchestrator.py).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import orchestrator  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-text", default="Once upon a time")
    ap.add_argument("--max-new-tokens", type=int, default=500)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--output-dir", default="output")
    ap.add_argument("--run-name", default="generate_500_tokens")
    a, rest = ap.parse_known_args()
    sys.exit(orchestrator.main(["--model", a.model, "--prompt", a.input_text, "--max-tokens", str(a.max_new_tokens),
                                "--output-dir", a.output_dir, "--run-name", a.run_name, *rest]))
