"""The HF transformers rows of the decode benchmark: hf/eager (LlamaForCausalLM, DynamicCache)
and hf/static-compile (static cache + transformers' auto-compile), on the same synthetic
shapes with random weights; and case4-hf/<attn>: the server's hf backend (server/hf_backend.py:
transformers' Llama over the same weight arena as the case4 rows, its StaticCache + CUDA graph
on a GPU, device sampling through Backend.generate). A mixin of runner.Bench."""
from __future__ import annotations

import traceback

import torch

import floors  # bench/floors.py
from common import RowSkipped, free_memory, median, now_s, percentile, prompt_ids, rnd, sync


def hf_config_from(cfg):
    """A transformers LlamaConfig with the shapes of a Case4 ModelConfig."""
    from transformers import LlamaConfig
    theta = float(getattr(cfg, "rope_theta", 10000.0))
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
              max_position_embeddings=int(cfg.max_seq_len), rms_norm_eps=float(cfg.rms_norm_eps),
              tie_word_embeddings=bool(cfg.tie_word_embeddings), hidden_act="silu",
              attention_bias=False, mlp_bias=False, bos_token_id=getattr(cfg, "bos_token_id", None),
              eos_token_id=(list(getattr(cfg, "eos_token_ids", ()) or ()) or None), pad_token_id=0,
              rope_parameters={"rope_type": "default", "rope_theta": theta})
    rd = getattr(cfg, "rotary_dim", cfg.head_dim)
    if rd != cfg.head_dim:
        kw["partial_rotary_factor"] = rd / cfg.head_dim
    try:
        return LlamaConfig(**kw)
    except TypeError:  # older transformers: rope_theta instead of rope_parameters
        kw.pop("rope_parameters")
        kw["rope_theta"] = theta
        return LlamaConfig(**kw)


class HFRows:
    def row_case4_hf(self, item: dict, row: dict) -> None:
        """case4-hf/<attn>: Backend.generate (device sampling) on the hf backend, timed as case4's rows."""
        from case4_errors import BadInput
        from server.hf_backend import _ATTN_IMPL, HFBackend, _register, _xformers_attention, check_attn, hf_model_of
        attn = item["system"].split("/", 1)[1]
        try:
            check_attn(attn)
        except BadInput as e:  # flash2 / xformers without their package: the row says so
            raise RowSkipped(str(e)) from None
        if attn == "xformers":
            _register("case4_xformers", _xformers_attention)
        model = self.case4_model(item["shape"], item["dtype"])  # the case4 rows' arena: no second copy
        cfg, steps = model.cfg, int(item["steps"])
        if item["prompt"] + steps + self.args.warmup_steps >= cfg.max_seq_len:
            raise RowSkipped(f"prompt + steps exceed the context of {cfg.max_seq_len}")
        ids = prompt_ids(cfg, item["prompt"], self.args.seed)
        be = HFBackend(hf_model_of(model, _ATTN_IMPL[attn], attn), sessions=1, graph_mode="exact")
        try:
            row["backend"] = "hf"
            self.decode_once(be, ids, "exact", "device", self.args.warmup_steps)  # warm-up (and the capture)
            runs = []
            for r in range(self.args.repeats):
                if runs and self.deadline.expired():
                    row["note"] = f"stopped after {len(runs)} repeats: time budget"
                    break
                runs.append(self.decode_once(be, ids, "exact", "device", steps))
            st = be.status()
        finally:
            be.close()
            del be
        per_run = [r["total_ms"] / steps for r in runs]
        ms = median(per_run)
        row.update(repeats=len(runs), ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2),
                   ttft_ms=rnd(median([r["ttft_ms"] for r in runs]), 3),
                   ms_per_token_runs=[rnd(x) for x in per_run], first_tokens=runs[0]["tokens"][:16],
                   tokens_identical_across_repeats=all(r["tokens"] == runs[0]["tokens"] for r in runs),
                   graphs_note=st["graphs_note"],
                   latency_note="device sampling: all steps in one call, p50/p99 per token not observable")
        if st.get("graph_error"):
            row["note"] = f"graph capture failed, eager static cache: {st['graph_error']}"
        self.add_bytes(row, cfg, steps)

    def build_hf(self, cfg, dtype: str):
        from transformers import LlamaForCausalLM
        hcfg = hf_config_from(cfg)
        dt = getattr(torch, dtype)
        torch.manual_seed(self.args.seed)
        with torch.device(self.device):
            try:
                model = LlamaForCausalLM._from_config(hcfg, dtype=dt)
            except TypeError:
                model = LlamaForCausalLM._from_config(hcfg, torch_dtype=dt)
        model = model.to(device=self.device, dtype=dt).eval()
        gc_ = model.generation_config
        gc_.pad_token_id = 0
        gc_.eos_token_id = None   # random weights: never stop early (min_new_tokens too)
        gc_.bos_token_id = None
        return model

    def row_hf(self, item: dict, row: dict) -> None:
        static = item["system"] == "hf/static-compile"
        dev = self.device
        if static and not dev.startswith("cuda") and not self.args.hf_compile_cpu:
            raise RowSkipped("static cache + compile is a CUDA row (--hf-compile-cpu to force)")
        self.drop_model()   # the Case4 model's memory goes back before HF builds its own
        cfg = floors.shape_config(item["shape"])
        steps = int(item["steps"])
        model = self.build_hf(cfg, item["dtype"])
        try:
            ids = torch.tensor([prompt_ids(cfg, item["prompt"], self.args.seed)], device=dev)
            mask = torch.ones_like(ids)
            gen_kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0)
            if static:
                self.setup_hf_static(model, item["prompt"] + steps + 16, row)
            else:
                gen_kw["cache_implementation"] = None  # the default: DynamicCache

            def gen(n, streamer=None):
                sync(dev)
                t0 = now_s()
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, streamer=streamer, **gen_kw)
                sync(dev)
                dt = (now_s() - t0) * 1e3
                if out.shape[1] != ids.shape[1] + n:
                    raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {n}")
                return dt, out

            t0 = now_s()
            warm = 2 if static else 1
            try:
                for _ in range(warm):
                    gen(steps)
                    gen(1)
            except Exception as e:
                if not (static and self.args.hf_compile == "auto" and self.args.hf_fullgraph_fallback):
                    raise
                # fullgraph=True failed (a graph break?): record it and retry once without fullgraph
                traceback.print_exc()
                row["fullgraph_error"] = f"{type(e).__name__}: {e}"[:500]
                try:
                    torch._dynamo.reset()
                except Exception:
                    pass
                if hasattr(model, "_compiled_call"):
                    del model._compiled_call
                model.generation_config.compile_config.fullgraph = False
                row["compile"] += " -> retried with fullgraph=False"
                for _ in range(warm):
                    gen(steps)
                    gen(1)
            row["warmup_s"] = rnd(now_s() - t0, 2)
            if static:
                row["compiled"] = bool(hasattr(model, "_compiled_call")) or self.args.hf_compile == "manual"
            tn, t1 = [], []
            out = None
            for r in range(self.args.hf_repeats):
                if tn and self.deadline.expired():
                    row["note"] = f"stopped after {len(tn)} repeats: time budget"
                    break
                d, out = gen(steps)
                tn.append(d)
                t1.append(gen(1)[0])
            ms = (median(tn) - median(t1)) / (steps - 1) if steps > 1 else median(tn)
            timing = "(t(generate N) - t(generate 1)) / (N-1), medians"
            if not ms > 0:  # a loaded host can make t(N) - t(1) <= 0 for small N: a bound that cannot lie
                ms, timing = median(tn) / steps, "t(generate N) / N, medians (the difference was not positive)"
            row.update(repeats=len(tn), ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2), ttft_ms=rnd(median(t1), 3),
                       generate_ms_N=rnd(median(tn), 2), generate_ms_1=rnd(median(t1), 2),
                       first_tokens=out[0, ids.shape[1]:ids.shape[1] + 16].tolist(), timing=timing)
            if self.args.hf_latency and not self.deadline.expired():
                st = StampStreamer()
                gen(steps, st)
                d = st.token_intervals_ms()
                row.update(p50_ms=rnd(percentile(d, 50)), p99_ms=rnd(percentile(d, 99)),
                           latency_note="p50/p99 from one extra run with a timestamping streamer "
                                        "(generate copies each token to host for it)")
            self.add_bytes(row, cfg, steps)
        finally:
            del model
            if static:
                try:
                    torch._dynamo.reset()
                except Exception:
                    pass
            free_memory(dev)

    def setup_hf_static(self, model, max_cache_len: int, row: dict) -> None:
        gc_ = model.generation_config
        gc_.cache_implementation = "static"
        gc_.max_cache_len = max_cache_len   # one cache shape for N and 1 token: no recompile
        backend = self.args.hf_compile_backend
        mode = "reduce-overhead" if backend == "inductor" else None
        if self.args.hf_compile == "manual":
            # the brief's recipe: compile forward ourselves and keep generate from compiling again
            model.forward = torch.compile(model.forward, mode=mode, fullgraph=True, backend=backend)
            gc_.disable_compile = True
            row["compile"] = f"manual torch.compile(forward, mode={mode}, fullgraph=True, backend={backend})"
            return
        # transformers 5.x: generate() compiles the decode forward itself when the cache is
        # static (GenerationMixin._valid_auto_compile_criteria), configured by CompileConfig.
        from transformers import CompileConfig
        cc = CompileConfig(fullgraph=True, mode=mode, backend=backend)
        if not self.device.startswith("cuda"):
            cc._compile_all_devices = True
        gc_.compile_config = cc
        row["compile"] = f"transformers auto-compile: CompileConfig(fullgraph=True, mode={mode}, backend={backend})"


class StampStreamer:
    """A generate() streamer that records the host time each token arrives."""

    def __init__(self):
        self.stamps: list[float] = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls == 1:   # the prompt
            return
        self.stamps.append(now_s())

    def end(self):
        pass

    def token_intervals_ms(self) -> list[float]:
        s = self.stamps
        return [(b - a) * 1e3 for a, b in zip(s, s[1:])]
