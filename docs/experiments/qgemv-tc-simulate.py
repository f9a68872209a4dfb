# A CPU simulation of qgemv_tc_kernel (custom_kernels/csrc/gemv_quant.cu; performance entries 49-50), lane by lane:
#   python docs/experiments/qgemv-tc-simulate.py
# It follows the kernel's code: the launcher's grid rule, each block's tiles and each warp's steps, the ring of
# kQTDepth register buffers filled by the load cursor (lj, ls; the row offsets lq, lg set once a tile, the chunk lc
# advanced by 32 a step) and drained by the run cursor (rj, rs, rc) (every drained buffer must hold the step being
# computed), the staged input (xperm<5|9> order at xs_put's chunk-major 8-byte slots, each written once; the owner's
# B words read as 16-byte words from uint4 index rc * VPC + h * VPC / 2), the chunk sums from those slots, the unpack
# of each 32-bit word into A registers exactly as the bit operations do, mma.m16n8k16 through its PTX fragment
# layouts, the per-chunk fp32 scaling,
# the two butterflies, the warps' partial sums and the epilogue's row (or gate|up pair) mapping. The sums are float64
# here, so each row's result must equal W x (float64, from the layout's dequantization) to ~1e-12: what this checks
# is the indexing, not the rounding (the GPU tests do that against float64).
import numpy as np

DEPTH, SMS = 4, 132  # a block's warps (8 or 16) and blocks a SM (32 warps a SM) are simulate()'s
STORE, SWIGLU = 0, 2


def frag_a(regs):  # regs[lane] = a0..a7 -> A [16, 16]
    A = np.zeros((16, 16))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(8):
            A[g + (8 if i in (2, 3, 6, 7) else 0), 2 * t + (i & 1) + (8 if i >= 4 else 0)] = regs[lane][i]
    return A


def frag_b(regs):  # regs[lane] = b0..b3 -> B [16, 8]
    B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        for i in range(4):
            B[2 * t + (i & 1) + (8 if i >= 2 else 0), g] = regs[lane][i]
    return B


def frag_c(C):  # C [16, 8] -> per lane c0..c3
    return [[C[lane >> 2, 2 * (lane & 3)], C[lane >> 2, 2 * (lane & 3) + 1], C[(lane >> 2) + 8, 2 * (lane & 3)],
             C[(lane >> 2) + 8, 2 * (lane & 3) + 1]] for lane in range(32)]


def unpack(word, qm):
    """A register values (a0..a7 order: reg0 pair, reg1 pair, ...) of one mma's word(s), from the bits."""
    if qm == 4:
        w = int(word)
        nib = [(w >> (4 * e)) & 15 for e in range(8)]
        # (1024 + v) - 1032 for inputs (0,4) (2,6); (1024 + 16 v) / 16 - 72 for (1,5) (3,7): both v - 8
        return [nib[e] - 8 for e in (0, 4, 1, 5, 2, 6, 3, 7)]
    out = []
    for w in word:  # int8: two words, bytes (0, 2) then (1, 3) of each
        b = [((int(w) >> (8 * e)) & 255) for e in range(4)]
        q = [v - 256 if v >= 128 else v for v in b]
        out += [q[0], q[2], q[1], q[3]]
    return out


def simulate(qm, G, N, K, mode, rng, max_blocks=SMS * 4, KWARPS=8):
    PER_SM = 32 // KWARPS
    kpc, vpc = (32, 4) if qm == 4 else (16, 2)
    rows = 2 * N if mode == SWIGLU else N
    if qm == 4:
        nib = rng.integers(0, 16, size=(rows, K))
        qbytes = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
        scale = rng.standard_normal((rows, K // G)).astype(np.float16)
        minv = rng.standard_normal((rows, K // G)).astype(np.float16)
        W = nib * np.repeat(scale.astype(np.float64), G, 1) + np.repeat(minv.astype(np.float64), G, 1)
    else:
        q8 = rng.integers(-128, 128, size=(rows, K))
        qbytes = q8.astype(np.int8).view(np.uint8)
        scale = rng.standard_normal((rows, K // G)).astype(np.float16)
        minv = None
        W = q8 * np.repeat(scale.astype(np.float64), G, 1)
    x = rng.standard_normal(K).astype(np.float16)
    words = qbytes.copy().view("<u4").reshape(rows, -1)  # 4 words a 16-byte chunk
    want = W @ x.astype(np.float64)

    nchunk, ng = K // kpc, K // G
    ntiles = (N + 3) // 4 if mode == SWIGLU else (N + 7) // 8
    nsteps = (nchunk + 3) // 4
    # the launcher
    grid = min(ntiles, max_blocks) if max_blocks > 0 else ntiles
    grid = min(grid, PER_SM * SMS)
    per_block = -(-ntiles // grid)
    grid = -(-ntiles // per_block)
    # staging (xs_put): vector i = c * vpc + d (8 inputs) permuted; its half h (4 values, 8 bytes) at 8-byte slot
    # (2 c + h) vpc + d; int4's chunk sums from the chunk's vpc 16-byte words (slots 2 c vpc .. 2 (c + 1) vpc)
    order = [0, 4, 2, 6, 1, 5, 3, 7] if qm == 4 else [0, 2, 4, 6, 1, 3, 5, 7]
    nvec = K // 8
    slots = np.full((2 * nvec, 4), np.nan)
    for i in range(nvec):
        v = x[8 * i:8 * i + 8][order].astype(np.float64)
        s0 = (i // vpc) * 2 * vpc + i % vpc
        for hh in range(2):
            assert np.isnan(slots[s0 + hh * vpc]).all(), "a slot written twice"
            slots[s0 + hh * vpc] = v[4 * hh:4 * hh + 4]
    assert not np.isnan(slots).any(), "a slot never written"
    xsum = np.array([slots[2 * c * vpc:2 * (c + 1) * vpc].sum() for c in range(nchunk)])
    assert np.allclose(xsum, [x[c * kpc:(c + 1) * kpc].astype(np.float64).sum() for c in range(nchunk)], rtol=0,
                       atol=1e-9), "a chunk's slots do not hold its inputs"
    u4 = slots.reshape(-1, 2, 4)  # uint4 index -> its two 8-byte words

    got = np.full(rows, np.nan)
    for blk in range(grid):
        my_tiles = -(-(ntiles - blk) // grid) if blk < ntiles else 0
        part = np.zeros((my_tiles, KWARPS, 8))

        def row_of(j, g, blk=blk):
            tile = blk + j * grid
            if mode == SWIGLU:
                p = 4 * tile + (g & 3)
                return (p if g < 4 else p + N) if p < N else -1
            r = 8 * tile + g
            return r if r < N else -1

        for warp in range(KWARPS):
            per_warp = -(-(nsteps - warp) // KWARPS) if warp < nsteps else 0
            nitem = my_tiles * per_warp
            cpg = G // kpc
            gsh = (cpg.bit_length() - 1) if cpg & (cpg - 1) == 0 else -1
            group_of = lambda c: 0 if ng == 1 else (c >> gsh if gsh >= 0 else c // cpg)  # noqa: E731
            qflat, sflat = words.reshape(-1, 4), scale.reshape(-1)  # chunk r * nchunk + c, group r * ng + gi
            mflat = minv.reshape(-1) if qm == 4 else None
            # per lane: lc, lq, lg, lrow (tile_rows), the warp's lj, ls
            cur = {"lj": 0, "ls": 0, "lane": [None] * 32}

            def tile_rows():
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    r = row_of(cur["lj"], g) if cur["lj"] < my_tiles else -1
                    cur["lane"][lane] = {"lrow": r >= 0, "lq": r * nchunk if r >= 0 else 0,
                                         "lg": r * ng if r >= 0 else 0, "lc": 4 * warp + t}

            tile_rows()

            def load_next():
                if per_warp == 0 or cur["lj"] >= my_tiles:
                    return None
                lj, ls = cur["lj"], cur["ls"]
                lanes = []
                for lane in range(32):
                    st = cur["lane"][lane]
                    inn = st["lrow"] and st["lc"] < nchunk
                    gi = st["lg"] + group_of(st["lc"])
                    lanes.append((qflat[st["lq"] + st["lc"]] if inn else np.zeros(4, np.uint32),
                                  float(sflat[gi]) if inn else 0.0,
                                  float(mflat[gi]) if inn and qm == 4 else 0.0))
                    st["lc"] += 4 * KWARPS
                cur["ls"] += 1
                if cur["ls"] == per_warp:
                    cur["ls"], cur["lj"] = 0, cur["lj"] + 1
                    tile_rows()
                return ((lj, ls), lanes)

            bufs = [load_next() for _ in range(DEPTH)]
            acc = np.zeros(32)
            rj = rs = 0
            rc = [4 * warp + (lane & 3) for lane in range(32)]
            for i in range(0, nitem, DEPTH):
                for d in range(DEPTH):
                    if i + d >= nitem:
                        continue
                    tag, lanes = bufs[d]
                    assert tag == (rj, rs), f"buffer holds step {tag}, computing {(rj, rs)}"
                    cc = np.zeros((16, 8))
                    # each owner lane's B words of the step: uint4 index rc * vpc + h * vpc / 2, vpc / 2 of them
                    bwords = []
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        if (g >> 1) == t and rc[lane] < nchunk:
                            base = rc[lane] * vpc + (g & 1) * (vpc // 2)
                            bwords.append([w for k in range(vpc // 2) for w in u4[base + k]])
                        else:
                            bwords.append([np.zeros(4)] * vpc)
                    for mm in range(4 if qm == 4 else 2):
                        A = frag_a([unpack(lanes[l][0][mm] if qm == 4 else lanes[l][0][2 * mm:2 * mm + 2], qm)
                                    for l in range(32)])
                        cc += A @ frag_b([list(bwords[lane][mm]) for lane in range(32)])
                    cf = frag_c(cc)
                    for lane in range(32):
                        dot, cx = cf[lane][0] + cf[lane][3], min(rc[lane], nchunk - 1)
                        _, s_, m_ = lanes[lane]
                        acc[lane] += s_ * dot + ((m_ + 8 * s_) * xsum[cx] if qm == 4 else 0.0)
                        rc[lane] += 4 * KWARPS
                    bufs[d] = load_next()
                    rs += 1
                    if rs == per_warp:
                        for lane in range(0, 32, 4):
                            part[rj, warp, lane >> 2] = acc[lane:lane + 4].sum()
                        acc[:] = 0
                        rs, rj = 0, rj + 1
                        rc = [4 * warp + (lane & 3) for lane in range(32)]
            assert rj == my_tiles or per_warp == 0, "a warp did not finish its tiles"
        for k in range(my_tiles * 8):
            j, r = divmod(k, 8)
            tile = blk + j * grid
            if mode == SWIGLU:
                p = 4 * tile + r
                if r < 4 and p < N:
                    got[p], got[p + N] = part[j, :, r].sum(), part[j, :, r + 4].sum()
            else:
                row = 8 * tile + r
                if row < N:
                    got[row] = part[j, :, r].sum()
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} rows never written"
    err = np.abs(got - want).max() / np.abs(want).max()
    return grid, err


if __name__ == "__main__":
    rng = np.random.default_rng(0)
    cases = [(4, 32, 37, 256, STORE), (4, 64, 37, 256, SWIGLU), (4, 128, 61, 512, STORE), (4, 32, 40, 576, STORE),
             (4, 128, 19, 4096, SWIGLU), (8, 256, 37, 256, STORE), (8, 32, 23, 512, SWIGLU), (8, 576, 9, 576, STORE)]
    for qm, G, N, K, mode in cases:
        for mb in (528, 3):  # the plan's grid, and a small one (blocks loop over several tiles)
            for w in (8, 16):
                grid, err = simulate(qm, G, N, K, mode, rng, mb, w)
                status = "ok" if err < 1e-12 else "FAIL"
                print(f"{status} int{qm} G={G} N={N} K={K} mode={mode} max_blocks={mb} warps={w} grid={grid} "
                      f"max rel err {err:.1e}")
                assert err < 1e-12
    print("simulation matches W x in every case")
    # negative control: A's register pairs of rows g and g + 8 swapped must fail
    good = unpack
    unpack = lambda w, qm: (lambda a: [a[2], a[3], a[0], a[1]] + a[4:])(good(w, qm))  # noqa: E731
    _, err = simulate(4, 32, 37, 256, STORE, rng)
    print(f"negative control (rows g, g + 8 swapped in A): max rel err {err:.1e}, fails as it should: {err > 1e-3}")
    assert err > 1e-3
