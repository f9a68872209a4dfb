"""The seed's direct decode: no IPC, one process: load, prefill, N decode steps on the
chosen backend (greedy or seeded sampling with case4_sampling.py), then write
<out>/direct_decode_tokens.txt and _text.txt and print tok/s.

    python scripts/direct_custom_decode_500.py [--model smollm2] [--prompt TEXT] [--steps 500]
        [--backend auto|cuda|reference] [--device-sampling] [--temperature T --top-k K --top-p P --seed S]
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from case4_errors import BadInput  # noqa: E402
from case4_sampling import SamplingParams, sample  # noqa: E402
from client.tokenizer import load_tokenizer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--graph-mode", default="exact")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--device-sampling", action="store_true", help="Backend.generate instead of host sampling")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="output")
    a = ap.parse_args(argv)
    try:
        from server.process import load
        params = SamplingParams(a.temperature, a.top_k, a.top_p, a.seed)
        model, backend = load({"model": a.model, "backend": a.backend, "graph_mode": a.graph_mode,
                               "dtype": a.dtype, "device": a.device, "seed": a.seed})
        tok = load_tokenizer(str(model.tokenizer_dir) if model.tokenizer_dir else None)
        ids = tok.encode(a.prompt)
        steps = min(a.steps, backend.cfg.max_seq_len - len(ids) - 1)
        t0 = time.perf_counter()
        logits = backend.prefill(0, ids)
        first = sample(logits.numpy(), params, len(ids) - 1)
        t1 = time.perf_counter()
        if a.device_sampling:
            out = [first] + backend.generate(0, first, steps - 1, params)
        else:
            out = [first]
            for _ in range(steps - 1):
                logits = backend.step(0, out[-1])
                out.append(sample(logits.numpy(), params, backend.seq_len(0) - 1))
        t2 = time.perf_counter()
    except BadInput as e:
        print(f"case4: error: {e}", file=sys.stderr)
        return 2
    text = tok.decode(out)
    d = Path(a.output_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "direct_decode_tokens.txt").write_text(" ".join(map(str, out)) + "\n")
    (d / "direct_decode_text.txt").write_text(text)
    print(text)
    print(f"[direct] {backend.name}: prefill {len(ids)} tokens {1e3 * (t1 - t0):.1f} ms, "
          f"{len(out) - 1} decode steps {(len(out) - 1) / (t2 - t1):.1f} tok/s; files in {d}/", file=sys.stderr)
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
