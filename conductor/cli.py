"""The command line (`python orchestrator.py`, `case4`, `bash run_ipc.sh`): the parser with
its environment defaults, the argument checks, and the exit codes (docs/ipc.md for what a
run does). Text goes to stdout; progress and the summary to stderr. Exit codes: 0 ok,
2 bad input (one line on stderr), 1 internal failure (names the process), 130 interrupted
(Ctrl-C) or 143 terminated (SIGTERM), 141 stdout closed (e.g. `| head`): partial outputs are
written in these three cases. `serve` as the first argument runs the HTTP server instead
(conductor/serve.py, docs/serve.md), with the model options of add_model_options.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

from case4_errors import BadInput
from case4_sampling import SamplingParams
from ipc.messages import RemoteError
from ipc.peers import PeerDied, PeerStalled, PeerTimeout

from conductor.outputs import prepare_output_dir
from conductor.run import DEMO_PROMPT, ProcessOptions, Request, Run

DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")
ATTNS = ("sdpa", "flash2", "xformers", "eager")  # server/hf_backend.py ATTNS (checked there again, with the packages)

ENV_HELP = """environment defaults (a flag on the command line wins):
  CASE4_USE_CUSTOM=1       --backend cuda
  CASE4_DISABLE_EXT=1      --backend reference
  CASE4_KV_ONLY=1          --graph-mode none
  CASE4_BG_CAPTURE=0|1     --no-bg-capture / --bg-capture
  CASE4_SKIP_PRECAPTURE=1  --precapture 0
  CASE4_ATTN=NAME          --attn NAME (hf backend)
  CASE4_QUANT=none|int8|int4  --quant (hf backend: int8 through bitsandbytes)
  CASE4_GROUP_SIZE=32|64|128   --group-size
  CASE4_FORCE_FLASH=1      --force-flash (hf backend)
  CASE4_HOME               model cache (default ~/.cache/case4)

exit codes: 0 ok, 2 bad input, 1 internal failure, 130 interrupted / 143 terminated (partial output kept),
  141 stdout closed (e.g. piped into head; outputs kept)
"""


SWITCHES = ("CASE4_USE_CUSTOM", "CASE4_DISABLE_EXT", "CASE4_KV_ONLY", "CASE4_BG_CAPTURE", "CASE4_SKIP_PRECAPTURE",
            "CASE4_FORCE_FLASH")  # the environment defaults that are 0|1 (ENV_HELP)


def _env(name: str) -> str | None:
    v = os.environ.get(name)
    return v if v not in (None, "") else None


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options of the server + client pair, shared by the one-shot CLI and `serve`."""
    backend = "auto"
    if _env("CASE4_USE_CUSTOM") == "1":
        backend = "cuda"
    if _env("CASE4_DISABLE_EXT") == "1":
        backend = "reference"
    a = p.add_argument
    a("--model", "--model-name", dest="model", default="smollm2", help="HF folder, hub id in the local "
      "cache, 'smollm2' (built-in, default) or synthetic:<shape> (--model-name: the seed's name for it)")
    a("--sampling", choices=("client", "device"), default="client",
      help="client: logits through shared memory to the client's sampler (default); "
           "device: the server samples (kv_generate)")
    a("--graph-mode", choices=("exact", "dynamic", "none"),
      default="none" if _env("CASE4_KV_ONLY") == "1" else "exact")
    a("--backend", choices=("auto", "cuda", "reference", "hf"), default=backend,
      help="auto: cuda where the custom kernels cover the model on a GPU, reference where they do not "
           "or on a CPU, hf for what neither covers (docs/decisions.md)")
    a("--attn", default=_env("CASE4_ATTN"), metavar="{sdpa,flash2,xformers,eager}",
      help="hf backend: transformers' attention implementation (default sdpa; flash2 / xformers need "
           "their package: no fallback)")
    a("--force-flash", action="store_true", default=_env("CASE4_FORCE_FLASH") == "1",
      help="hf backend: single-token decode attention through Case4's decode attention kernel "
           "(torch op sdp_single_q); prefill keeps SDPA (GPU)")
    a("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
      help="auto: float16 on a GPU, float32 on the CPU")
    a("--device", default="auto", help="auto | cpu | cuda[:N]")
    a("--gemm", choices=("custom", "cublas"), default="custom")
    a("--window", type=int, default=8, help="graphs captured ahead of the replay position")
    a("--precapture", type=int, default=0 if _env("CASE4_SKIP_PRECAPTURE") == "1" else 4,
      help="graphs to wait for before decoding starts")
    a("--bg-capture", action=argparse.BooleanOptionalAction,
      default=_env("CASE4_BG_CAPTURE") != "0", help="background graph capture (default on)")
    a("--max-seq", type=int, default=None, help="context to plan for (KV cache size)")
    # no argparse choices: a bad value (flag or environment) is one BadInput line (check_model_options)
    a("--quant", default=_env("CASE4_QUANT"), metavar="none|int8|int4",
      help="weight-only quantization of every projection and the lm_head at load (docs/quantization.md); "
           "default none, except a GGUF file (and the built-in smollm2): its own blocks as they are; "
           "hf backend: int8 through bitsandbytes")
    a("--group-size", default=_env("CASE4_GROUP_SIZE"), metavar="32|64|128",
      help="inputs per quantization scale (int4 default 128, int8 default one scale per row)")
    a("--timeout", type=float, default=300.0, help="seconds any one request may take")


def check_model_options(args) -> None:
    """The checks of add_model_options' values (BadInput), and of the IPC spin variables."""
    from ipc.peers import BAD_ENV
    if BAD_ENV:
        raise BadInput(BAD_ENV[0])
    for name in SWITCHES:  # CASE4_DISABLE_EXT=true was ignored: the user's switch silently did nothing
        v = _env(name)
        if v not in (None, "0", "1"):
            raise BadInput(f"{name} must be 0 or 1, got '{v}'")
    if not str(getattr(args, "model", "x") or "").strip():  # --model "" (an unset shell variable) read as "."
        raise BadInput("--model is empty: give a Hugging Face folder, a .gguf file, 'smollm2' or synthetic:<shape>")
    if not DEVICE_RE.fullmatch(args.device):
        raise BadInput(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if not (args.timeout > 0 and math.isfinite(args.timeout)):
        raise BadInput(f"--timeout must be a positive number of seconds, got {args.timeout:g}")
    if args.window < 1 or args.precapture < 0:
        raise BadInput("--window must be >= 1 and --precapture >= 0")
    if args.precapture > args.window:  # asking for N graphs ahead implies a window of at least N
        args.window = args.precapture
    if args.max_seq is not None and args.max_seq < 2:
        raise BadInput(f"--max-seq must be >= 2, got {args.max_seq}")
    if args.attn is not None and args.attn not in ATTNS:
        raise BadInput(f"--attn must be one of {', '.join(ATTNS)}, got '{args.attn}'")
    check_quant_options(args)


def check_quant_options(args) -> None:
    """--quant / --group-size (or CASE4_QUANT / CASE4_GROUP_SIZE): values checked here, their fit to
    the model's dimensions when it loads (server/model/weights.py quant_schemes)."""
    from server.model.quant import GROUP_SIZES, MODES
    if args.quant is not None and args.quant not in MODES:
        raise BadInput(f"--quant must be one of {', '.join(MODES)}, got '{args.quant}'")
    if args.group_size is None:
        return
    try:
        args.group_size = int(args.group_size)
    except (TypeError, ValueError):
        raise BadInput(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                       f"got '{args.group_size}'") from None
    if args.group_size not in GROUP_SIZES:
        raise BadInput(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {args.group_size}")
    if args.quant in (None, "none"):
        raise BadInput(f"--group-size {args.group_size} needs --quant int8 or int4")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="case4", description="Case4: LLaMA-family inference, "
                                "server + client processes over multiprocessing queues.",
                                epilog=ENV_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(p)
    a = p.add_argument
    a("--prompt", default=None, help=f"prompt text (default: a demo question in chat mode: {DEMO_PROMPT!r})")
    a("--prompt-len", type=int, default=None, metavar="N",
      help="instead of --prompt: a seeded random prompt of N tokens (benchmarks)")
    a("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    a("--max-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    a("--top-k", type=int, default=0, help="0 = off")
    a("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    a("--seed", type=int, default=0, help="sampling seed (and synthetic weights / random prompt)")
    a("--greedy", action="store_true", help="force greedy decoding (temperature 0)")
    a("--ipc", choices=("loop", "calls"), default="loop",
      help="--sampling client: loop: server and client exchange steps and tokens directly, "
           "the client streams the tokens here (default); calls: a replay_seq + sample request "
           "pair per token through this process (the protocol's per-token ops; slower)")
    a("--output-dir", default="output", help="where the outputs go (default ./output)")
    a("--run-name", default=None, help="prefix of the output files (default <model>-<time>)")
    a("--trace", action="store_true", help="also write a Chrome trace JSON and a PNG timeline")
    a("--quiet", action="store_true", help="no streamed text on stdout")
    a("--ignore-eos", action="store_true", help="generate exactly --max-tokens (benchmarks; as llama.cpp/vLLM)")
    return p


def check_args(args) -> SamplingParams:
    if args.prompt is not None and args.prompt_len is not None:
        raise BadInput("--prompt and --prompt-len exclude each other: give one of them")
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable argv bytes arrive as surrogate escapes
            raise BadInput("--prompt is not valid UTF-8 (check the bytes given or the shell's locale)") from None
    check_model_options(args)
    if args.max_tokens < 1:
        raise BadInput(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.prompt_len is not None and args.prompt_len < 1:
        raise BadInput(f"--prompt-len must be >= 1, got {args.prompt_len}")
    try:
        return SamplingParams(0.0 if args.greedy else args.temperature, args.top_k, args.top_p, args.seed)
    except BadInput as e:
        raise BadInput("--" + str(e).replace("_", "-")) from None


def process_options(args) -> ProcessOptions:
    """What the server + client pair is started with (checked args)."""
    return ProcessOptions(model=args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                          graph_mode=args.graph_mode, gemm=args.gemm, seed=args.seed, max_seq=args.max_seq,
                          window=args.window, precapture=args.precapture, bg_capture=args.bg_capture,
                          timeout=args.timeout, trace=getattr(args, "trace", False), attn=args.attn,
                          quant=args.quant, group_size=args.group_size, force_flash=args.force_flash)


def request(args, params: SamplingParams) -> Request:
    """The one generation the command line asks for (checked args)."""
    return Request(params=params, prompt=args.prompt, prompt_len=args.prompt_len, chat=args.chat,
                   max_tokens=args.max_tokens, sampling=args.sampling, ipc=args.ipc,
                   ignore_eos=args.ignore_eos)


def make_run(args) -> Run:
    """Parsed args -> the CLI's one-shot Run (BadInput on a bad argument)."""
    params = check_args(args)
    prepare_output_dir(Path(args.output_dir), args.run_name)  # before the model loads, not after the run
    return Run(process_options(args), request(args, params), Path(args.output_dir), args.run_name,
               quiet=args.quiet)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # the HTTP server (docs/serve.md)
        from conductor.serve import main as serve_main
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return make_run(args).go()
    except BadInput as e:
        print(f"case4: error: {e}", file=sys.stderr)
        return 2
    except RemoteError as e:
        if e.bad_input:
            print(f"case4: error: {e.message}", file=sys.stderr)
            return 2
        print(f"case4: internal failure in the {e.peer} process: {e.op}: {e.type}: {e.message}",
              file=sys.stderr)
        return 1
    except PeerStalled as e:  # alive but silent in the decode loop: the process is named, it is not ours to fix
        print(f"case4: error: {e}", file=sys.stderr)
        return 1
    except (PeerDied, PeerTimeout) as e:
        print(f"case4: internal failure: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        print(f"case4: internal failure in the orchestrator process: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
