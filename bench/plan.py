"""The decode benchmark's plan: which rows run, for which shapes and dtypes (bench/decode.py
parses the flags; the rows run in bench/runner.py)."""
from __future__ import annotations

import fnmatch
import sys

from common import CASE4_DECODE, CASE4_HF, DTYPE_ALIASES


def bad_input(msg: str) -> None:
    """One line on stderr, exit code 2 (the project's convention for bad input)."""
    print(f"bench: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def parse_shapes(spec: str | None, device: str, quick: bool) -> list[tuple[str, str]]:
    if not spec:
        if not device.startswith("cuda"):
            spec = "tiny"
        elif quick:
            spec = "llama2-7b:float16,smollm2-135m:float16"
        else:
            spec = "llama2-7b:float16,smollm2-135m:float16,llama2-7b:bfloat16"
    from server.model.config import SYNTHETIC_SHAPES
    out = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        name, _, dt = part.partition(":")
        if name not in SYNTHETIC_SHAPES:
            bad_input(f"unknown shape {name!r} in --shapes (choose from {', '.join(SYNTHETIC_SHAPES)})")
        if dt:
            if dt.lower() not in DTYPE_ALIASES:
                bad_input(f"unknown dtype {dt!r} in --shapes (use fp16, bf16 or fp32)")
            dts = [DTYPE_ALIASES[dt.lower()]]
        elif name == "llama2-7b" and device.startswith("cuda"):
            dts = ["float16"] if quick else ["float16", "bfloat16"]
        else:
            dts = ["float16" if device.startswith("cuda") else "float32"]
        for d in dts:
            if (name, d) not in out:
                out.append((name, d))
    return out


def system_selected(system: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(system, p) or system == p or system.startswith(p.rstrip("/") + "/")
               for p in patterns)


def build_plan(args) -> list[dict]:
    pats = [p.strip() for p in args.systems.split(",")] if args.systems else None
    plan: list[dict] = []

    def add(system, shape, dtype, prompt, **extra):
        if system_selected(system, pats):
            plan.append(dict(system=system, shape=shape, dtype=dtype, prompt=prompt, **extra))

    for shape, dtype in args.shape_list:
        for sysname in CASE4_DECODE:
            add(sysname, shape, dtype, args.prompt, steps=args.steps)
        for sysname in CASE4_HF:  # beside the custom rows: the cost of each path in one run
            add(sysname, shape, dtype, args.prompt, steps=args.steps)
        for p in args.ttft_prompt_list:
            add("case4/prefill", shape, dtype, p)
        add("hf/eager", shape, dtype, args.prompt, steps=args.hf_steps or args.steps)
        add("hf/static-compile", shape, dtype, args.prompt, steps=args.hf_steps or args.steps)
    for shape, dtype in args.shape_list:  # the slow oracle last
        add("case4/reference", shape, dtype, args.prompt, steps=args.reference_steps)
    return plan
