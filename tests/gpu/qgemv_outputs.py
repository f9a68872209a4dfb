"""The quantized gemv's outputs on fixed random inputs, for a bitwise A/B of two kernels (GPU machine).

    python tests/gpu/qgemv_outputs.py save OUT.pt [--quick]   # with this build and CASE4_QGEMV as set
    python tests/gpu/qgemv_outputs.py compare A.pt B.pt        # how many outputs are bitwise equal

tests/gpu/test_quant_kernels.py runs it (--quick: fp16, no 70B matrices) for each kernel variant against the
half2 kernel's outputs.

Shapes: Llama-2-7B's and 70B's matrices, SmolLM2's, odd row counts; fp16 and bf16; int8 per row and G32, int4
G128 and G32; every epilogue (store, residual, SwiGLU, fp32 logits) with the RMSNorm'd input; with and without a
bias on the store mode. The output buffer is poisoned before each call."""
import sys

import torch

sys.path.insert(0, ".")
from custom_kernels.ext import load_extension  # noqa: E402
from tests.gpu.test_quant_kernels import MAX_BLOCKS, QMODE, ptrs, random_quant, stream  # noqa: E402

SHAPES = [(12288, 4096), (4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096), (960, 576), (576, 1536),
          (1536, 576), (49152, 576), (8192, 28672), (2 * 28672, 8192), (4097, 4096), (7, 4096)]


QUICK = [(12288, 4096), (4096, 11008), (32000, 4096), (960, 576), (49152, 576), (4097, 4096), (7, 4096)]


def save(path: str, quick: bool = False) -> None:
    ext = load_extension()
    res = {}
    for dt, dti in ((torch.float16, 0),) + (() if quick else ((torch.bfloat16, 1),)):
        for N, K in QUICK if quick else SHAPES:
            for mode, G in (("int8", K), ("int4", 128), ("int4", 32), ("int8", 32)):
                if K % G:
                    continue
                g = torch.Generator(device="cuda").manual_seed(N + 7 * K + G)
                ql = random_quant(mode, 2 * N, K, G, g)
                x = torch.randn(K, device="cuda", generator=g).to(dt)
                nw = (1 + 0.1 * torch.randn(K, device="cuda", generator=g)).to(dt)
                bias = torch.randn(N, device="cuda", generator=g).to(dt)
                q, s, m = ptrs(ql)
                for om in (0, 1, 2, 3):
                    for b in ((0, bias.data_ptr()) if om == 0 else (0,)):
                        out = torch.full((N,), float("nan"), device="cuda", dtype=torch.float32 if om == 3 else dt)
                        if om == 1:
                            out.normal_(generator=g)  # the residual added to
                        ext.qgemv(q, s, m, QMODE[mode], G, N, K, x.data_ptr(), nw.data_ptr(), 1e-5, out.data_ptr(),
                                  om, dti, stream(), 1, MAX_BLOCKS, pdl=3 if om % 2 == 0 else 1, bias=b)
                        torch.cuda.synchronize()
                        res[(str(dt), N, K, mode, G, om, bool(b))] = out.cpu()
    torch.save(res, path)
    print(f"saved {len(res)} outputs to {path}")


def compare(a_path: str, b_path: str) -> int:
    a, b = torch.load(a_path), torch.load(b_path)
    same, diff = 0, []
    for k, ref in a.items():
        v = b[k]
        bits = (lambda t: t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16))
        if torch.equal(bits(v), bits(ref)):
            same += 1
        else:
            diff.append((k, float((v.double() - ref.double()).abs().max()), int(torch.isnan(v).sum())))
    for d in diff[:12]:
        print("DIFF", *d)
    print(f"bitwise equal: {same} of {len(a)}; different: {len(diff)}")
    return 1 if diff or len(a) != len(b) else 0


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2], "--quick" in sys.argv[3:])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
