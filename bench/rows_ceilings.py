"""The ceiling rows of the decode benchmark: `copy` (device-to-device bandwidth, the decode
floor's denominator) and `gemm` (fp16 matmul, the compute ceiling for prefill / TTFT).
A mixin of runner.Bench (self.args, self.device, self.copy_GBps, self.gemm_TFLOPs)."""
from __future__ import annotations

import torch

from common import free_memory, median, now_s, rnd


class CeilingRows:
    def row_copy(self, item: dict, row: dict) -> None:
        dev = self.device
        nbytes = int(self.args.copy_gib * (1 << 30)) if dev.startswith("cuda") else int(self.args.cpu_copy_mib * (1 << 20))
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        times = []
        for i in range(self.args.copy_warmup + self.args.copy_repeats):
            if dev.startswith("cuda"):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src)
                b.record()
                b.synchronize()
                ms = a.elapsed_time(b)
            else:
                t0 = now_s()
                dst.copy_(src)
                ms = (now_s() - t0) * 1e3
            if i >= self.args.copy_warmup:
                times.append(ms)
        if not torch.equal(dst[:1 << 20], src[:1 << 20]) or not torch.equal(dst[-(1 << 20):], src[-(1 << 20):]):
            raise RuntimeError("copy check failed: destination differs from source")
        del src, dst
        free_memory(dev)
        ms = median(times)
        gbps = 2 * nbytes / (ms / 1e3) / 1e9
        self.copy_GBps = gbps
        row.update(copy_bytes=nbytes, ms=rnd(ms, 4), copy_GBps=rnd(gbps, 1), repeats=len(times),
                   min_ms=rnd(min(times), 4), max_ms=rnd(max(times), 4),
                   note="(read+write bytes)/time, median of repeats" + (", CUDA events" if dev.startswith("cuda") else ""))

    # ------------------------------------------------------------------ gemm (compute ceiling, for prefill/TTFT)
    def row_gemm(self, item: dict, row: dict) -> None:
        dev = self.device
        cuda = dev.startswith("cuda")
        n = self.args.gemm_n if cuda else 256
        dt = torch.float16 if cuda else torch.float32
        g = torch.Generator(device=dev).manual_seed(1)
        a = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        b = torch.randn(n, n, device=dev, dtype=dt, generator=g)
        times = []
        for i in range(3 + 10):
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                c = a @ b
                e1.record()
                e1.synchronize()
                ms = e0.elapsed_time(e1)
            else:
                t0 = now_s()
                c = a @ b
                ms = (now_s() - t0) * 1e3
            if i >= 3:
                times.append(ms)
        ref = (a[:4].double() @ b.double())
        err = float((c[:4].double() - ref).norm() / ref.norm())
        del a, b, c, ref
        free_memory(dev)
        ms = median(times)
        self.gemm_TFLOPs = 2 * n ** 3 / (ms / 1e3) / 1e12
        row.update(dtype=str(dt).replace("torch.", ""), gemm_n=n, ms=rnd(ms, 4), gemm_TFLOPs=rnd(self.gemm_TFLOPs, 3),
                   rel_err=rnd(err, 6), repeats=len(times), note="n x n x n matmul, median, random inputs")
