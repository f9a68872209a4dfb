# Lane-level emulation of qgemv-tc.patch's operand mapping (performance entry 49), CPU only:
#   python docs/experiments/qgemv-tc-emulate.py
# mma.m16n8k16's A, B and C fragments as the PTX ISA lays them out; each lane's A values from its own row's word
# (int4 inputs (0,4)(2,6) in A's row g, (1,5)(3,7) in row g + 8; int8 (0,2)(4,6) and (1,3)(5,7)), B's column 2t
# (2t + 1) holding lane t's inputs in the k slots of row g's (g + 8's) values at the owner lanes g = 2t + h (the
# staging orders xperm<5> and xperm<9>), zero elsewhere; checks that c0 + c3 of every lane is its word's dot product
# (float64), and that a wrong owner rule fails.
import numpy as np
rng = np.random.default_rng(0)
def frag_A(regs):  # regs[lane] = 8 values a0..a7 -> A 16x16
    A = np.zeros((16, 16))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        a = regs[lane]
        for i in range(8):
            row = g + (8 if i in (2, 3, 6, 7) else 0)
            col = 2 * t + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = a[i]
    return A
def frag_B(regs):  # regs[lane] = b0..b3 -> B 16x8
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            B[2 * t + (i & 1) + (8 if i >= 2 else 0), g] = regs[lane][i]
    return B
def frag_C(C):  # -> per lane c0..c3
    out = []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        out.append([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]])
    return out
for mode in (4, 8):
    for trial in range(20):
        x = rng.standard_normal(8)  # the 8 inputs a word (int4) / word pair (int8) covers, per t (chunk position)
        xs = rng.standard_normal((4, 8))  # x of lane-t's 8 inputs
        w = rng.integers(-8, 8, size=(32, 8)) if mode == 4 else rng.integers(-128, 128, size=(32, 8))  # lane's 8 weights (input order)
        # A regs: int4 r0=(0,4) r1=(1,5) r2=(2,6) r3=(3,7); int8 r0=(0,2) r1=(1,3) r2=(4,6) r3=(5,7)
        order = [0, 4, 1, 5, 2, 6, 3, 7] if mode == 4 else [0, 2, 1, 3, 4, 6, 5, 7]
        Aregs = [[w[l][e] for e in order] for l in range(32)]
        # staged vector order: int4 [x0,x4,x2,x6,x1,x5,x3,x7], int8 [x0,x2,x4,x6,x1,x3,x5,x7]; owner h reads half h
        stage = [0, 4, 2, 6, 1, 5, 3, 7] if mode == 4 else [0, 2, 4, 6, 1, 3, 5, 7]
        Bregs = []
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            owner = (g >> 1) == t
            h = g & 1
            Bregs.append([xs[t][stage[4 * h + i]] for i in range(4)] if owner else [0, 0, 0, 0])
        C = frag_A(Aregs) @ frag_B(Bregs)
        cf = frag_C(C)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            want = sum(w[lane][e] * xs[t][e] for e in range(8))
            got = cf[lane][0] + cf[lane][3]
            assert abs(want - got) < 1e-9, (mode, lane, want, got)
print("8-row mapping ok (int4 and int8)")
# negative control: a wrong owner rule must fail
try:
    x = None
    w = rng.integers(-8, 8, size=(32, 8)); xs = rng.standard_normal((4, 8))
    order = [0, 4, 1, 5, 2, 6, 3, 7]; stage = [0, 4, 2, 6, 1, 5, 3, 7]
    Aregs = [[w[l][e] for e in order] for l in range(32)]
    Bregs = [[xs[l & 3][stage[4 * ((l >> 2) & 1) + i]] for i in range(4)] if ((l >> 2) & 3) == (l & 3) else [0]*4 for l in range(32)]
    cf = frag_C(frag_A(Aregs) @ frag_B(Bregs))
    bad = any(abs(sum(w[l][e] * xs[l & 3][e] for e in range(8)) - cf[l][0] - cf[l][3]) > 1e-9 for l in range(32))
    print("negative control fails as it should:", bad)
except Exception as e:
    print("neg", e)
