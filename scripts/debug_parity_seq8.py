"""Per-stage differences vs HF transformers at decode step 8 (T=7).

    python scripts/debug_parity_seq8.py --model smollm2 [--backend reference|cuda] [--device cpu|cuda] [--dtype float32]

Prints rel-L2 and max-abs differences for Q/K/V, attention context, O-proj + residual, MLP,
layer output, final hidden and logits; exits 1 when a stage exceeds its bound, 2 on bad input.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parity import main  # noqa: E402  (scripts/parity.py, beside this file)

if __name__ == "__main__":
    sys.exit(main(8))
