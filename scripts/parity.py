"""Per-stage parity of a Case4 backend against HF transformers: the one implementation
behind the seed's debugging tools `scripts/debug_parity_one_step.py` (step 1) and
`scripts/debug_parity_seq8.py` (step 8), also used by tests/test_reference_hf.py. A
debugging tool, not part of the server: it lives beside its scripts, which put the
repository root on sys.path before importing it.

HF runs the whole sequence without a cache; its per-stage tensors at the last position are
taken with forward hooks. The reference backend records the same stages for every layer;
the CUDA backend exposes logits only, so for it only the logits row is compared.
"""
from __future__ import annotations

import argparse
import sys

import torch

from case4_errors import BadInput
from server.model.weights import hf_state_dict

# stage -> relative-L2 bound per compute dtype (stage error over the stage's own norm)
BOUNDS = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}
# argmax agreement: HF's logit at our argmax may trail HF's max by this much relative to
# |max| (2 ulp of the dtype: in fp16/bf16 the top logits often tie after rounding)
TIE_REL = {torch.float32: 1e-5, torch.float16: 2 * 2.0 ** -10, torch.bfloat16: 2 * 2.0 ** -7}
STAGES = ("q", "k", "v", "ctx", "attn_out", "mlp", "out")


def hf_model_for(model, dtype: torch.dtype, device):
    """An HF LlamaForCausalLM on `model`'s weights: from its folder, or built from our arena."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if model.folder is not None:
        return AutoModelForCausalLM.from_pretrained(str(model.folder), dtype=dtype).to(device).eval()
    if getattr(model, "gguf", None) is not None:  # transformers' own GGUF load (dequantized)
        return AutoModelForCausalLM.from_pretrained(str(model.gguf.parent), gguf_file=model.gguf.name,
                                                    dtype=dtype).to(device).eval()
    from server.model.config import hf_config_dict
    cfg = LlamaConfig(**hf_config_dict(model.cfg))
    hf = LlamaForCausalLM(cfg).to(dtype=dtype)
    sd = {k: v.to(dtype).cpu() for k, v in hf_state_dict(model.weights).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(m.endswith("rotary_emb.inv_freq") for m in missing), (missing, unexpected)
    if model.cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf.to(device).eval()


def hf_stages(hf, ids: list[int]) -> dict[str, torch.Tensor]:
    """HF's per-stage tensors at the last position of `ids` (fp32, CPU)."""
    out: dict[str, torch.Tensor] = {}
    hooks = []

    def grab(name, pre=False):
        def fn(_m, inp, outp=None):
            t = inp[0] if pre else (outp[0] if isinstance(outp, tuple) else outp)
            out[name] = t[0, -1].detach().float().cpu().clone()
        return fn

    for l, layer in enumerate(hf.model.layers):
        a = layer.self_attn
        hooks += [a.q_proj.register_forward_hook(grab(f"L{l}.q")), a.k_proj.register_forward_hook(grab(f"L{l}.k")),
                  a.v_proj.register_forward_hook(grab(f"L{l}.v")),
                  a.o_proj.register_forward_pre_hook(lambda m, i, l=l: grab(f"L{l}.ctx", True)(m, i)),
                  layer.post_attention_layernorm.register_forward_pre_hook(
                      lambda m, i, l=l: grab(f"L{l}.attn_out", True)(m, i)),
                  layer.mlp.register_forward_hook(grab(f"L{l}.mlp")), layer.register_forward_hook(grab(f"L{l}.out"))]
    hooks.append(hf.model.norm.register_forward_hook(grab("final_hidden")))
    try:
        with torch.no_grad():
            dev = next(hf.parameters()).device
            logits = hf(torch.tensor([ids], device=dev)).logits
        out["logits"] = logits[0, -1].float().cpu()
    finally:
        for h in hooks:
            h.remove()
    return out


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], num_layers: int, bound: float,
            tie_rel: float = 0.0):
    """Rows (stage, rel_l2, max_abs, ok) — per stage kind, the worst layer."""
    rows = []
    for st in STAGES:
        worst = None
        for l in range(num_layers):
            key = f"L{l}.{st}"
            if key not in ours or key not in theirs:
                continue
            a, b = ours[key].reshape(-1), theirs[key].reshape(-1)
            rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            mx = (a - b).abs().max().item()
            if worst is None or rel > worst[1]:
                worst = (f"{st} (worst: layer {l})", rel, mx)
        if worst:
            rows.append((*worst, worst[1] <= bound))
    for key in ("final_hidden", "logits"):
        if key in ours and key in theirs:
            a, b = ours[key].reshape(-1), theirs[key].reshape(-1)
            rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            rows.append((key, rel, (a - b).abs().max().item(), rel <= bound))
    if "logits" in ours and "logits" in theirs:
        t = theirs["logits"].reshape(-1)
        gap = float(t.max() - t[int(ours["logits"].argmax())])   # 0 when the argmax agrees
        ok = gap <= tie_rel * float(t.abs().max())
        rows.append(("logits argmax equal (or a tie)", gap, gap, ok))
    return rows


def run_parity(model_spec: str, steps: int, backend: str = "reference", device: str = "cpu",
               dtype: str = "float32", prompt: str = "The capital of France is") -> tuple[list, bool]:
    """Prefill a prompt of (steps-1) tokens... then compare step `steps` (T = steps-1)."""
    from server.backends import make_backend
    from server.model.resolve import resolve_model

    model = resolve_model(model_spec, dtype=dtype, device=device, max_seq=256)
    ids = _prompt_ids(model, prompt, steps)
    be = make_backend(backend, model, sessions=1, graph_mode="none")
    try:
        if len(ids) > 1:
            be.prefill(0, ids[:-1])
        else:
            be.reset(0)
        if backend == "reference" or be.name == "reference":
            logits, ours = be.dec.step_stages(0, ids[-1])
            ours = {k: (v[0] if v.dim() > 1 and v.shape[0] == 1 else v) for k, v in ours.items()}
        else:
            if len(ids) == 1:
                be.prefill(0, ids)  # T=1 on a backend without a stage dump: the prompt is the one token
                raise BadInput("stage parity on this backend needs at least 2 steps")
            ours = {"logits": be.step(0, ids[-1]).float().cpu()}
    finally:
        be.close()
    hf = hf_model_for(model, model.weights.dtype, device)
    theirs = hf_stages(hf, ids)
    rows = compare(ours, theirs, model.cfg.num_layers, BOUNDS[model.weights.dtype], TIE_REL[model.weights.dtype])
    return rows, all(r[3] for r in rows)


def _prompt_ids(model, prompt: str, steps: int) -> list[int]:
    """`steps` token ids: the tokenized prompt, cut or padded by repeating it."""
    if model.tokenizer_dir is not None:
        from tokenizers import Tokenizer
        ids = Tokenizer.from_file(str(model.tokenizer_dir / "tokenizer.json")).encode(prompt).ids
    else:
        ids = [b for b in prompt.encode()]
    ids = (ids * (steps // max(len(ids), 1) + 1))[:steps]
    return ids


def main(steps: int, argv=None) -> int:
    ap = argparse.ArgumentParser(description=f"Per-stage differences of a Case4 backend vs HF transformers "
                                             f"at decode step {steps}")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--backend", default="reference", choices=["reference", "cuda"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda for --backend cuda, else cpu)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt", default="The capital of France is")
    a = ap.parse_args(argv)
    device = a.device or ("cuda" if a.backend == "cuda" else "cpu")
    try:
        rows, ok = run_parity(a.model, steps, a.backend, device, a.dtype, a.prompt)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bound = BOUNDS[{"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
        a.dtype, torch.float32)]
    print(f"{a.model} {a.backend} {a.dtype} on {device}: step {steps} (T={steps - 1}) vs HF transformers; "
          f"bound rel-L2 <= {bound:g}")
    print(f"{'stage':32s} {'rel L2':>12s} {'max abs':>12s}  ok")
    for name, rel, mx, good in rows:
        print(f"{name:32s} {rel:12.3e} {mx:12.3e}  {'yes' if good else 'NO'}")
    print("PASS" if ok else "FAIL: a stage exceeds its bound")
    return 0 if ok else 1
