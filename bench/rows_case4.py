"""The Case4 rows of the decode benchmark: case4/<exact|dynamic|none>/<device|client> (the
Backend API: be.generate() with device sampling, be.replay() per token + host argmax with
client sampling), case4/prefill (TTFT of be.prefill()) and case4/reference (the pure-torch
oracle). A mixin of runner.Bench (self.args, self.device, self.deadline, the model cache)."""
from __future__ import annotations

import torch

from common import (SESSION, RowSkipped, call_filtered, closing_backend, median, now_s, percentile,
                    prompt_ids, rnd)


class Case4Rows:
    def make_case4_backend(self, model, mode: str):
        from server.backends import make_backend
        name = self.args.case4_backend
        return call_filtered(make_backend, name, model, sessions=1, device=self.device, graph_mode=mode,
                             gemm=self.args.gemm)

    @staticmethod
    def quant_fields(model, row: dict) -> dict:
        """A quantized row's layout (quant_group: the group every matrix shares, 0 where they differ) and
        resident weight bytes (both arenas); returns add_bytes' quant_bytes: what its matrices hold."""
        w = model.weights
        if not row.get("quant"):
            return {}
        row.update(quant_mode=w.quant, quant_group=w.group, resident_weight_bytes=int(w.nbytes()))
        return {"quant_bytes": int(w.quant_bytes())}

    def graph_stats(self, be) -> dict:
        try:
            st = be.status() or {}
        except Exception as e:
            return {"status_error": repr(e)}
        g = st.get("graphs") if isinstance(st, dict) else None
        return dict(g) if isinstance(g, dict) else {}

    def decode_once(self, be, ids: list[int], mode: str, sampling: str, steps: int) -> dict:
        """reset, prefill (TTFT), [pre-capture], then `steps` decode steps. Times in ms."""
        from case4_sampling import SamplingParams
        be.reset(SESSION)
        t0 = now_s()
        logits = be.prefill(SESSION, ids)
        tok = int(torch.argmax(logits))
        ttft = (now_s() - t0) * 1e3
        graphs = mode == "exact" and getattr(be, "supports_graphs", False)
        out = {"ttft_ms": ttft}
        try:
            if graphs:
                w = min(self.args.window, steps)
                t1 = now_s()
                be.bg_capture_start(SESSION, self.args.window)
                call_filtered(be.wait_precapture, SESSION, w, timeout_s=self.args.precapture_timeout_s)
                out["precapture_ms"] = (now_s() - t1) * 1e3
                out["precapture_count"] = w
            toks, per_tok = [], []
            if sampling == "device":
                t1 = now_s()
                toks = list(be.generate(SESSION, tok, steps, SamplingParams()))
                total = (now_s() - t1) * 1e3
            else:
                step_fn = be.step if mode == "none" else None
                t1 = now_s()
                for _ in range(steps):
                    ts = now_s()
                    lg = step_fn(SESSION, tok) if step_fn else be.replay(SESSION, be.seq_len(SESSION), tok)
                    tok = int(torch.argmax(lg))
                    per_tok.append((now_s() - ts) * 1e3)
                    toks.append(tok)
                total = (now_s() - t1) * 1e3
            if len(toks) != steps:
                raise RuntimeError(f"decode returned {len(toks)} tokens, expected {steps}")
            out.update(total_ms=total, per_tok=per_tok, tokens=toks)
        finally:
            if graphs:
                try:
                    be.bg_capture_stop()
                except Exception:
                    pass
        return out

    def row_case4(self, item: dict, row: dict) -> None:
        _, mode, sampling = item["system"].split("/")
        if self.args.case4_backend == "cuda" and not self.device.startswith("cuda"):
            raise RowSkipped("needs a CUDA device (the cuda backend)")
        model = self.case4_model(item["shape"], item["dtype"], item)
        cfg = model.cfg
        steps = int(item["steps"])
        if item["prompt"] + steps + self.args.warmup_steps >= cfg.max_seq_len:
            raise RowSkipped(f"prompt + steps exceed the context of {cfg.max_seq_len}")
        ids = prompt_ids(cfg, item["prompt"], self.args.seed)
        with closing_backend(self.make_case4_backend(model, mode), self.device) as be:
            row["backend"] = getattr(be, "name", self.args.case4_backend)
            g0 = self.graph_stats(be)
            self.decode_once(be, ids, mode, sampling, self.args.warmup_steps)   # warm-up
            runs = []
            for r in range(self.args.repeats):
                if runs and self.deadline.expired():
                    row["note"] = f"stopped after {len(runs)} repeats: time budget"
                    break
                runs.append(self.decode_once(be, ids, mode, sampling, steps))
            g1 = self.graph_stats(be)
        per_run = [r["total_ms"] / steps for r in runs]
        ms = median(per_run)
        row.update(repeats=len(runs), ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2),
                   ttft_ms=rnd(median([r["ttft_ms"] for r in runs]), 3),
                   ms_per_token_runs=[rnd(x) for x in per_run],
                   first_tokens=runs[0]["tokens"][:16], tokens_identical_across_repeats=all(
                       r["tokens"] == runs[0]["tokens"] for r in runs))
        if sampling == "client":
            allt = [t for r in runs for t in r["per_tok"]]
            row.update(p50_ms=rnd(percentile(allt, 50)), p99_ms=rnd(percentile(allt, 99)))
        else:
            row["latency_note"] = "device sampling: all steps in one call, p50/p99 per token not observable"
        if mode in ("exact", "dynamic"):  # dynamic: the capture of its one (or K-step) graph
            self.add_graph_fields(row, g0, g1, runs)
        self.add_bytes(row, cfg, steps, **self.quant_fields(model, row))

    def add_graph_fields(self, row: dict, g0: dict, g1: dict, runs: list[dict]) -> None:
        row["graphs"] = g1 or None
        if not g1:
            row["graphs_note"] = "backend status() has no graph stats"
            return
        for k in ("capture_ms_p50", "capture_ms_p99", "instantiate_ms_p50", "captured", "live", "misses"):
            if k in g1:
                row[k] = g1[k]
        cap = g1.get("capture_ms_p50")
        inst = g1.get("instantiate_ms_p50")
        if cap is not None:
            per_graph = float(cap) + (float(inst) if inst is not None and self.args.capture_includes_instantiate else 0.0)
            row["capture_ms_per_graph"] = rnd(per_graph)
            row["graphs_per_s"] = rnd(1e3 / per_graph, 1) if per_graph > 0 else None
            if row.get("ms_per_token"):
                row["capture_over_replay"] = rnd(per_graph / row["ms_per_token"], 3)
        if "misses" in g1:
            try:
                row["misses_during_row"] = int(g1["misses"]) - int(g0.get("misses", 0) or 0)
            except (TypeError, ValueError):
                pass
        pc = [r.get("precapture_ms") for r in runs if r.get("precapture_ms") is not None]
        if pc:
            row["precapture_ms"] = rnd(median(pc), 2)
            row["precapture_count"] = runs[0].get("precapture_count")

    # ------------------------------------------------------------------ case4 prefill (TTFT)
    def row_prefill(self, item: dict, row: dict) -> None:
        if self.args.case4_backend == "cuda" and not self.device.startswith("cuda"):
            raise RowSkipped("needs a CUDA device (the cuda backend)")
        model = self.case4_model(item["shape"], item["dtype"], item)
        if item["prompt"] + 1 >= model.cfg.max_seq_len:
            raise RowSkipped(f"prompt exceeds the context of {model.cfg.max_seq_len}")
        ids = prompt_ids(model.cfg, item["prompt"], self.args.seed)
        with closing_backend(self.make_case4_backend(model, "none"), self.device) as be:
            row["backend"] = getattr(be, "name", self.args.case4_backend)
            times = []
            for r in range(1 + self.args.ttft_repeats):  # first is warm-up
                be.reset(SESSION)
                t0 = now_s()
                logits = be.prefill(SESSION, ids)
                int(torch.argmax(logits))
                if r:
                    times.append((now_s() - t0) * 1e3)
                if times and self.deadline.expired():
                    break
        row.update(repeats=len(times), ttft_ms=rnd(median(times), 3), ttft_min_ms=rnd(min(times), 3),
                   note="be.prefill incl. last-position logits to host + argmax")
        self.quant_fields(model, row)

    # ------------------------------------------------------------------ reference backend
    def row_reference(self, item: dict, row: dict) -> None:
        model = self.case4_model(item["shape"], item["dtype"], item)
        from server.backends import make_backend
        steps = int(item["steps"])
        ids = prompt_ids(model.cfg, item["prompt"], self.args.seed)
        with closing_backend(call_filtered(make_backend, "reference", model, sessions=1, device=self.device), self.device) as be:
            row["backend"] = getattr(be, "name", "reference")
            self.decode_once(be, ids, "none", "client", min(4, steps))   # warm-up
            run = self.decode_once(be, ids, "none", "client", steps)
        ms = run["total_ms"] / steps
        row.update(repeats=1, ms_per_token=rnd(ms), tok_s=rnd(1e3 / ms, 2), ttft_ms=rnd(run["ttft_ms"], 3),
                   p50_ms=rnd(percentile(run["per_tok"], 50)), p99_ms=rnd(percentile(run["per_tok"], 99)),
                   first_tokens=run["tokens"][:16], note="be.step per token + host argmax")
        self.add_bytes(row, model.cfg, steps, **self.quant_fields(model, row))
