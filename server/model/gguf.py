"""GGUF files as they are (issue 26; docs/quantization.md): read with the `gguf` package, config
from the file's metadata, the Q8_0 / Q4_0 / Q4_1 blocks of every projection and of the lm_head
repacked into our QuantLinear layouts with no rounding (server/model/quant.py says why each maps
exactly), every other tensor type dequantized at load (one line for each matrix that is): by
`gguf.quants.dequantize`, or, for llama.cpp's K-quants bound for a GPU, by server/model/kquants.py
there. The tokenizer and chat template come from the file too: transformers converts them once into
a cache folder the client reads like any other.

Two architectures (general.architecture): `llama` (Llama-2/3.x, SmolLM2, Mistral as llama.cpp writes
them) and `qwen2` (Qwen2, Qwen2.5: q/k/v biases, stored F32, that go to the arena's fused b_qkv as an HF
folder's do). For `llama`, llama.cpp's converter permutes the rows of attn_q / attn_k within each head
(its RoPE pairs adjacent dims; HF's rotates halves); as transformers' GGUF loader does, we undo that on
the rows. Blocks run along the input dimension, so a row permutation moves whole rows of blocks: exact.
For `qwen2` it permutes nothing (llama.cpp runs it with NEOX RoPE, which is HF's rotate-half; transformers'
loader has no tensor processor for it either).

A `rope_freqs.weight` tensor (llama.cpp's form of Llama-3.1's "llama3" RoPE scaling) holds one factor per
rotated pair; ggml's rope divides that pair's frequency by it. It goes to ModelConfig.rope_freq_factors,
which rope_inv_freq (weights.py) applies, so both backends' cos/sin tables carry it (docs/decisions.md).

Every tensor of the file must be one we read, of the shape the metadata implies: a tensor we would
ignore (a llama file's attention biases, MoE experts) would silently compute another model.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from server.model import kquants
from server.model.config import ConfigError, ModelConfig, config_from_hf
from server.model.quant import QuantLinear, dequantize as dequantize_ql
from server.model.weights import WeightLoadError, _assemble, matrix_shapes, quant_schemes

# general.architecture -> the HF class it is (llama: SmolLM2, Llama-2/3.x, Mistral as llama.cpp writes them)
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PERMUTED = ("llama",)  # the architectures whose attn_q / attn_k rows llama.cpp's converter permutes
IGNORED = ("attn_rot_embd",)  # old converters' per-layer inv_freq copies, which llama.cpp ignores too
REPACKED = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}
BLOCK = 32


def _log(msg: str) -> None:
    print(f"[case4] {msg}", file=sys.stderr, flush=True)


class _PlainMapNumpy:
    """numpy as the gguf package's reader module sees it during `read_gguf`: memmap(path, 'r') gives a plain
    read-only array over the file's memory map instead of an np.memmap. The reader slices its map once or more per
    metadata value (every token and merge of the vocabulary), and np.memmap's slices cost a Python-level
    __array_finalize__ each: the built-in file parses in 1.64 s that way, 0.48 s this way, to the same fields and
    tensors (tests/test_gguf.py)."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def memmap(path, mode="r", **kw):
        if mode != "r" or kw:
            return np.memmap(path, mode=mode, **kw)
        with open(path, "rb") as fh:
            return np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def read_gguf(path: Path):
    """gguf.GGUFReader(path) with its file mapped as a plain array (_PlainMapNumpy): the package's own parse, its
    reader module's `np` swapped for the call and restored after it. A file that fails to parse is read again by
    the unchanged reader, so that its error is the package's own."""
    from gguf import GGUFReader, gguf_reader
    saved = gguf_reader.np
    gguf_reader.np = _PlainMapNumpy()
    try:
        return GGUFReader(str(path))
    except Exception:  # noqa: BLE001
        pass
    finally:
        gguf_reader.np = saved
    return GGUFReader(str(path))


class GGUFFile:
    """One GGUF file, opened and checked: its metadata, its tensors by name, our ModelConfig."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.reader = read_gguf(self.path)
        except Exception as e:  # truncated / corrupt headers raise ValueError, IndexError, struct errors...
            raise WeightLoadError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._check_sizes()
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHS:
            raise ConfigError(f"{self.path}: GGUF architecture '{self.arch}' is not supported "
                              f"(supported: {', '.join(ARCHS)})")
        self.cfg = config_from_hf(self.hf_config())
        if "rope_freqs.weight" in self.tensors:
            self.cfg = replace(self.cfg, rope_freq_factors=self._rope_factors())
        self._check_tensors()

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        if f is None:
            return default
        try:
            v = f.contents()
        except Exception as e:
            raise WeightLoadError(f"{self.path}: metadata '{key}' is unreadable ({e})") from None
        return v

    def _check_sizes(self) -> None:
        """Every tensor's data must be all there (a truncated file gives short memory maps)."""
        from gguf import GGML_QUANT_SIZES
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            bs, ts = GGML_QUANT_SIZES[t.tensor_type]
            want = int(np.prod(t.shape, dtype=np.int64)) // bs * ts
            if t.data.nbytes != want or t.data_offset + want > size:
                raise WeightLoadError(f"{self.path}: tensor '{t.name}' holds {t.data.nbytes} of its {want} bytes "
                                      f"(a truncated or corrupt GGUF file)")

    def hf_config(self) -> dict:
        """The HF config.json fields the metadata gives (as transformers' GGUF loader maps them)."""
        a = self.arch
        g = lambda k, d=None: self.field(f"{a}.{k}", d)  # noqa: E731
        need = {"embedding_length": g("embedding_length"), "block_count": g("block_count"),
                "feed_forward_length": g("feed_forward_length"), "attention.head_count": g("attention.head_count")}
        for k, v in need.items():
            if v is None:
                raise ConfigError(f"{self.path}: metadata '{a}.{k}' is missing")
            if not int(v) > 0:  # head_count or embedding_length 0 was a ZeroDivisionError below
                raise ConfigError(f"{self.path}: metadata '{a}.{k}' must be a positive integer, got {v}")
        H, Hq = int(need["embedding_length"]), int(need["attention.head_count"])
        if "token_embd.weight" not in self.tensors:
            raise WeightLoadError(f"{self.path}: tensor 'token_embd.weight' is missing")
        V = g("vocab_size") or int(self.tensors["token_embd.weight"].shape[1])
        D = int(g("attention.key_length") or H // Hq)
        R = int(g("rope.dimension_count") or D)
        scaling = g("rope.scaling.type")
        hf = {"architectures": [ARCHS[a]], "vocab_size": int(V),
              "hidden_size": H, "intermediate_size": int(need["feed_forward_length"]),
              "num_hidden_layers": int(need["block_count"]), "num_attention_heads": Hq,
              "num_key_value_heads": int(g("attention.head_count_kv") or Hq), "head_dim": D,
              "rope_theta": float(g("rope.freq_base", 10000.0)),
              "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
              "max_position_embeddings": int(g("context_length", 4096)),
              "tie_word_embeddings": "output.weight" not in self.tensors,
              "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
              "eos_token_id": self.field("tokenizer.ggml.eos_token_id")}
        if R != D:
            hf["partial_rotary_factor"] = R / D
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ConfigError(f"{self.path}: metadata '{a}.rope.scaling.type' = '{scaling}' is not supported")
            hf["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
        return hf

    def _rope_factors(self) -> tuple[float, ...]:
        """rope_freqs.weight: one positive, finite factor per rotated pair (R/2 of them), as llama.cpp
        requires ({n_rot/2}); ggml divides each pair's frequency by its factor."""
        t, cfg = self.tensors["rope_freqs.weight"], self.cfg
        want = cfg.rotary_dim // 2
        if len(t.shape) != 1 or int(t.shape[0]) != want:
            raise ConfigError(f"{self.path}: tensor 'rope_freqs.weight' has {int(np.prod(t.shape))} values, expected "
                              f"{want} (one per rotated pair of the {cfg.rotary_dim} RoPE dimensions)")
        v = self.dense("rope_freqs.weight")
        if not bool((torch.isfinite(v) & (v > 0)).all()):
            raise ConfigError(f"{self.path}: tensor 'rope_freqs.weight' must hold positive finite factors, "
                              f"got {v.tolist()}")
        return tuple(float(x) for x in v)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this architecture reads, with its shape as HF writes it ([rows, inputs])."""
        c = self.cfg
        H, I, V = c.hidden_size, c.intermediate_size, c.vocab_size
        out = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
        if not c.tie_word_embeddings:
            out["output.weight"] = (V, H)
        if c.rope_freq_factors:
            out["rope_freqs.weight"] = (c.rotary_dim // 2,)
        for l in range(c.num_layers):
            p = f"blk.{l}."
            out.update({p + "attn_norm.weight": (H,), p + "ffn_norm.weight": (H,),
                        p + "attn_q.weight": (c.q_dim, H), p + "attn_k.weight": (c.kv_dim, H),
                        p + "attn_v.weight": (c.kv_dim, H), p + "attn_output.weight": (H, c.q_dim),
                        p + "ffn_gate.weight": (I, H), p + "ffn_up.weight": (I, H), p + "ffn_down.weight": (H, I)})
            if c.qkv_bias:
                out.update({p + "attn_q.bias": (c.q_dim,), p + "attn_k.bias": (c.kv_dim,),
                            p + "attn_v.bias": (c.kv_dim,)})
        return out

    def _check_tensors(self) -> None:
        """Before anything is allocated: every tensor the architecture needs is there with its shape,
        and no tensor is one we would silently ignore."""
        want = self.expected_shapes()
        for name, shape in want.items():
            if name not in self.tensors:
                why = " (a qwen2 GGUF has q/k/v biases)" if name.endswith(".bias") else ""
                raise WeightLoadError(f"{self.path}: tensor '{name}' is missing{why}")
            got = tuple(int(x) for x in reversed(self.tensors[name].shape))  # ggml lists ne0 (the inputs) first
            if got != shape:
                raise WeightLoadError(f"{self.path}: tensor '{name}' has shape {got}, expected {shape}")
        for name in self.tensors:
            kind = name.split(".")[-2] if "." in name else name  # blk.3.attn_rot_embd.weight -> attn_rot_embd
            if name not in want and kind not in IGNORED:
                raise ConfigError(f"{self.path}: tensor '{name}' is not supported in a GGUF of architecture "
                                  f"'{self.arch}' (ignoring it would compute another model)")

    def eos_ids(self) -> tuple[int, ...]:
        ids = []
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            v = self.field(k)
            if v is not None and int(v) not in ids:
                ids.append(int(v))
        return tuple(ids)

    # -- tensors ------------------------------------------------------------------------
    def tensor(self, name: str):
        if name not in self.tensors:
            raise WeightLoadError(f"{self.path}: tensor '{name}' is missing")
        return self.tensors[name]

    def type_of(self, name: str) -> str:
        return self.tensor(name).tensor_type.name

    def rows(self, name: str) -> np.ndarray:
        """The tensor's raw data as [rows, bytes or values per row], with llama.cpp's Q/K row
        permutation undone."""
        t = self.tensor(name)
        data = np.asarray(t.data)
        n = int(t.shape[-1]) if len(t.shape) > 1 else 1
        data = data.reshape(n, -1)
        heads = {"attn_q": self.cfg.num_heads, "attn_k": self.cfg.num_kv_heads}.get(name.split(".")[-2]) \
            if self.arch in PERMUTED else None
        if heads is not None:
            data = data[_unpermute(n, heads)]
        return data

    def dense(self, name: str, device="cpu") -> torch.Tensor:
        """The tensor's values in fp32 ([n, k], or [k] for a vector), as gguf.quants.dequantize gives them, on the
        CPU or, for a K-quant matrix, on `device`. A matrix of a type we repack (the built-in model's Q8_0
        token_embd) is repacked and dequantized by quant.dequantize instead: the same values bit for bit
        (test_gguf.py), ~20x sooner than the package's numpy loop. A K-quant matrix bound for a GPU is dequantized
        there by server/model/kquants.py, also bit for bit, instead of by the package's numpy on the CPU."""
        from gguf.quants import dequantize
        t = self.tensor(name)
        kind = t.tensor_type.name
        if kind in REPACKED and len(t.shape) == 2:
            return dequantize_ql(self.quant(name))
        rows = self.rows(name)
        if kind in kquants.KINDS and len(t.shape) == 2 and torch.device(device).type == "cuda":
            return kquants.dequantize(rows, kind, device)
        try:
            v = dequantize(rows, t.tensor_type)
        except NotImplementedError:
            raise WeightLoadError(f"{self.path}: tensor '{name}' has type {t.tensor_type.name}, which the gguf "
                                  f"package cannot dequantize") from None
        out = torch.from_numpy(np.array(v, dtype=np.float32))  # a copy: the file's map is read-only
        return out.reshape(-1) if len(t.shape) == 1 else out

    def quant(self, name: str) -> QuantLinear:
        """A Q8_0 / Q4_0 / Q4_1 tensor as our QuantLinear (group 32), bit for bit."""
        t = self.tensor(name)
        kind = t.tensor_type.name
        rows = self.rows(name)
        n, k = rows.shape[0], int(t.shape[0])
        blocks = rows.reshape(n, k // BLOCK, -1)
        f16 = lambda b: torch.from_numpy(np.ascontiguousarray(b).view(np.float16)[..., 0].copy())  # noqa: E731
        d = f16(blocks[..., 0:2])
        if kind == "Q8_0":
            q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k).copy())
            return QuantLinear("int8", n, k, BLOCK, q, d, None)
        g = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]  # [n, k/32, 16]
        # ggml: byte i of a block holds element i (low nibble) and element i + 16 (high nibble); ours: byte j
        # holds elements 2j (low) and 2j + 1 (high). Bytes 0..7 of ours come from the low nibbles, 8..15 from
        # the high ones: the same nibbles, moved.
        lo, hi = g[..., 0::2], g[..., 1::2]
        packed = np.concatenate(((lo & 0x0F) | ((hi & 0x0F) << 4), (lo >> 4) | (hi & 0xF0)), axis=-1)
        q = torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8).reshape(n, k // 2))
        if kind == "Q4_1":
            minv = f16(blocks[..., 2:4])
        else:  # Q4_0: (nib - 8) * d = nib * d + (-8 d), exact in fp32; -8 d is exact in fp16 unless it overflows
            minv = (d.float() * -8).half()
            if not bool(torch.isfinite(minv[torch.isfinite(d)]).all()):  # values to -8 d: beyond fp16 anyway
                raise WeightLoadError(f"{self.path}: tensor '{name}' has a Q4_0 scale beyond 8188, whose "
                                      f"values (-8 d) do not fit float16 (a corrupt file?)")
        return QuantLinear("int4", n, k, BLOCK, q, d, minv)


_opened: dict[tuple, GGUFFile] = {}  # one entry: (path, size, mtime) -> the file opened for it


def open_gguf(path: str | Path) -> GGUFFile:
    """GGUFFile(path), parsed once for the config check and the load that follows it (server/backends.py's
    `--backend auto` reads the config first): the gguf package parses every metadata field, the tokenizer's
    vocabulary included (the built-in SmolLM2 file: ~1.6 s on the CPU machines), at each GGUFReader. The one
    entry is the last file opened; a changed file (size or mtime) is opened again. `forget_gguf` drops it."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return GGUFFile(p)  # GGUFFile says what is wrong with the path
    f = _opened.get(key)
    if f is None:
        f = GGUFFile(p)
        _opened.clear()
        _opened[key] = f
    return f


def forget_gguf() -> None:
    """Drop the file open_gguf keeps (after the load: its memory map and parsed fields are not needed again)."""
    _opened.clear()


def _finite(ql: QuantLinear) -> bool:
    return bool(torch.isfinite(ql.scale).all()) and (ql.minv is None or bool(torch.isfinite(ql.minv).all()))


def _unpermute(n: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's permute(w, heads) (transformers' _reverse_permute_weights)."""
    dim = n // heads // 2
    return np.arange(n).reshape(heads, dim, 2).swapaxes(1, 2).reshape(-1)


def _sources(cfg: ModelConfig, name: str) -> list[str]:
    """GGUF tensor names of one of our arena tensors (concatenated along rows)."""
    if name == "embed":
        return ["token_embd.weight"]
    if name == "final_norm":
        return ["output_norm.weight"]
    if name == "lm_head":
        return ["token_embd.weight" if cfg.tie_word_embeddings else "output.weight"]
    l, k = name.split(".")
    p = f"blk.{l}."
    return {"attn_norm": [p + "attn_norm.weight"], "mlp_norm": [p + "ffn_norm.weight"],
            "w_qkv": [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"],
            "b_qkv": [p + "attn_q.bias", p + "attn_k.bias", p + "attn_v.bias"],  # qwen2 (cfg.qkv_bias)
            "w_o": [p + "attn_output.weight"], "w_gu": [p + "ffn_gate.weight", p + "ffn_up.weight"],
            "w_down": [p + "ffn_down.weight"]}[k]


def own_schemes(f: GGUFFile, cfg: ModelConfig) -> dict[str, tuple[str, int]]:
    """{matrix: (mode, 32)} for the matrices whose blocks repack as they are: all of its source
    tensors Q8_0 (int8), or all Q4_0 / Q4_1 (int4). The rest are dequantized, saying so."""
    out, dense = {}, {}
    for name in matrix_shapes(cfg):
        types = [f.type_of(s) for s in _sources(cfg, name)]
        modes = {REPACKED.get(t) for t in types}
        if len(modes) == 1 and None not in modes:
            out[name] = (modes.pop(), BLOCK)
        else:
            dense.setdefault("/".join(sorted(set(types))), []).append(name)
    for types, names in dense.items():
        _log(f"{f.path.name}: {len(names)} matri{'x' if len(names) == 1 else 'ces'} of type {types} "
             f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}) dequantized at load "
             f"(only Q8_0, Q4_0 and Q4_1 blocks run as they are; --quant int8|int4 re-quantizes the rest)")
    return out


def schemes_for(f: GGUFFile, quant: str | None, group: int | None) -> dict[str, tuple[str, int]]:
    """quant None: the file's own blocks; none: every matrix dequantized; int8/int4: re-quantized
    (round to nearest) from the dequantized values."""
    if quant is None:
        if group is not None:
            raise ConfigError(f"{f.path}: --group-size applies to --quant int8/int4; the file's own blocks "
                              f"have groups of {BLOCK}")
        return own_schemes(f, f.cfg)
    return quant_schemes(f.cfg, quant, group, str(f.path))


def load_gguf(f: GGUFFile, cfg: ModelConfig, dtype: torch.dtype, device, schemes: dict):
    """The weight arenas of a GGUF file: repacked blocks for the matrices `schemes` maps with
    group 32 to the file's own type, RTN for the others in `schemes`, dequantized values elsewhere."""
    from server.model.quant import quantize_rtn
    bad: list[str] = []

    def fill(name: str, view: torch.Tensor) -> None:
        row = 0
        for s in _sources(cfg, name):
            t = f.dense(s, view.device)
            if t.shape[0] + row > view.shape[0] or tuple(t.shape[1:]) != tuple(view.shape[1:]):
                raise WeightLoadError(f"{f.path}: tensor '{s}' has shape {tuple(t.shape)}, expected rows of "
                                      f"{tuple(view.shape[1:])} in {tuple(view.shape)}")
            if not bool(torch.isfinite(t).all()):
                bad.append(s)
            view[row:row + t.shape[0]].copy_(t.to(view.dtype))
            row += t.shape[0]

    def qfill(name: str, ql: QuantLinear) -> None:
        srcs = _sources(cfg, name)
        own = ql.group == BLOCK and all(REPACKED.get(f.type_of(s)) == ql.mode for s in srcs)
        if own:
            parts = [f.quant(s) for s in srcs]
            for p, s in zip(parts, srcs):
                if p.k != ql.k:
                    raise WeightLoadError(f"{f.path}: tensor '{s}' has {p.k} inputs, expected {ql.k}")
                if not _finite(p):
                    bad.append(s)
            got = QuantLinear(ql.mode, ql.n, ql.k, BLOCK, torch.cat([p.q for p in parts]),
                              torch.cat([p.scale for p in parts]),
                              None if ql.minv is None else torch.cat([p.minv for p in parts]))
            if got.n != ql.n:
                raise WeightLoadError(f"{f.path}: tensors {', '.join(srcs)} have {got.n} rows, expected {ql.n}")
        else:
            # on the arena's device: a K-quant source is then dequantized there (kquants) and rounded there
            full = torch.empty(ql.shape, dtype=torch.float32, device=ql.q.device)
            fill(name, full)
            got = quantize_rtn(full, ql.mode, ql.group)
            if not _finite(got):  # a range beyond fp16's
                bad.append(srcs[0])
        for a, b in ((ql.q, got.q), (ql.scale, got.scale), (ql.minv, got.minv)):
            if a is not None:
                a.copy_(b)

    w = _assemble(cfg, dtype, device, fill, str(f.path), schemes, qfill)
    if bad:
        raise WeightLoadError(f"{f.path}: tensor '{bad[0]}' holds NaN or Inf values (a corrupt file)")
    return w


class _SharedReader:
    """gguf.GGUFReader as transformers' GGUF loader sees it during `tokenizer_dir`: for the file already open
    (f.reader, parsed by read_gguf) the reader itself, for any other path the package's own. transformers parses
    the whole file again to convert its tokenizer (`from gguf import GGUFReader` inside load_gguf_checkpoint), with
    the package's slow np.memmap slicing: 10 of the 15 s that the built-in file's first conversion took on the CPU
    machines. It only reads the reader's fields."""

    def __init__(self, f: GGUFFile, real):
        self.f, self.real = f, real

    def __call__(self, path, *args, **kw):
        if not args and not kw and Path(path).resolve() == self.f.path.resolve():
            return self.f.reader
        return self.real(path, *args, **kw)


def tokenizer_dir(f: GGUFFile, cache: Path) -> Path:
    """A folder with the file's tokenizer and chat template in HF form (tokenizer.json,
    tokenizer_config.json, chat_template.jinja), converted once by transformers
    (AutoTokenizer.from_pretrained(folder, gguf_file=...), over the reader `f` already holds: _SharedReader)
    and cached by the file's path, size and mtime. Built under a temporary name and renamed into place when
    complete."""
    st = f.path.stat()
    key = hashlib.sha256(f"{f.path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / f"{f.path.stem}-{key}"
    if (target / "tokenizer.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    import gguf
    real = gguf.GGUFReader
    gguf.GGUFReader = _SharedReader(f, real)
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        tok = AutoTokenizer.from_pretrained(str(f.path.parent), gguf_file=f.path.name)
        tok.save_pretrained(str(tmp))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WeightLoadError(f"{f.path}: its tokenizer could not be read ({type(e).__name__}: {e})") from None
    finally:
        gguf.GGUFReader = real
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
