"""The prefill-graph padding (server/prefill_graphs.py), checked on the CPU: a prompt padded with
token 0 to its bucket, run through `forward_tokens` with the index of its last real row, gives
that row's logits and KV rows 0..n-1 as the unpadded prompt does -- against the fp32 reference
(the oracle) on fresh random weights, and tightly against the unpadded model-dtype forward."""
import pytest
import torch

from server.model.config import SYNTHETIC_SHAPES
from server.model.weights import synthetic_weights
from server.kv import KVArena
from server.prefill_graphs import MIN_BUCKET, PrefillGraphs
from server.reference import ReferenceDecoder


@pytest.mark.parametrize("max_seq", [1, MIN_BUCKET, 100, 1024, 4096])
def test_buckets(max_seq):
    """Whatever MIN_BUCKET is: a prompt's bucket is the smallest power of two >= MIN_BUCKET that
    holds it, or None past max_seq; `buckets(m)` (the start-up captures) lists, ascending, every
    bucket a prompt of m tokens or fewer fills exactly."""
    pg = PrefillGraphs(dec=None, max_seq=max_seq)
    assert MIN_BUCKET > 0 and MIN_BUCKET & (MIN_BUCKET - 1) == 0  # a power of two
    sizes = [MIN_BUCKET << i for i in range(40)]
    for n in range(1, 2 * max_seq + 2):
        smallest = next(c for c in sizes if c >= n)
        assert pg.bucket(n) == (smallest if smallest <= max_seq else None), (n, pg.bucket(n))
    for up_to in range(0, 70 * MIN_BUCKET, 7):
        assert pg.buckets(up_to) == [c for c in sizes if c <= up_to], up_to
        assert all(pg.bucket(c) == c for c in pg.buckets(up_to) if c <= max_seq)


@pytest.mark.parametrize("shape", ["tiny", "tiny-mha", "tiny-partial"])
@pytest.mark.parametrize("n", [1, 5, 16, 23])
def test_padded_prompt_matches(shape, n):
    cfg = SYNTHETIC_SHAPES[shape]
    dtype = torch.bfloat16
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh weights and prompt every run (printed: -s, or on failure)
    print(f"seed {seed}")
    w = synthetic_weights(cfg, dtype, "cpu", seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (n,), generator=gen).tolist()
    b = PrefillGraphs(None, cfg.max_seq_len).bucket(n)

    oracle = ReferenceDecoder(w, KVArena(cfg, 1, dtype), compute_dtype=torch.float32)
    want = oracle.forward(0, ids, 0, last_only=True)[0]
    plain_dec = ReferenceDecoder(w, KVArena(cfg, 1, dtype), compute_dtype=dtype)
    plain = plain_dec.forward(0, ids, 0, last_only=True)[0]
    padded_dec = ReferenceDecoder(w, KVArena(cfg, 1, dtype), compute_dtype=dtype)
    tok = torch.zeros(b, dtype=torch.long)
    tok[:n] = torch.tensor(ids)
    got = padded_dec.forward_tokens(0, tok, 0, last=torch.tensor([n - 1]))[0]

    rel = lambda a, r: float((a.double() - r.double()).norm() / r.double().norm())  # noqa: E731
    assert rel(got, want) < 3e-2, (seed, rel(got, want))    # bf16 path vs the fp32 oracle
    assert rel(got, plain) < 1e-2, (seed, rel(got, plain))  # padding changes nothing but GEMM shapes
    # the padded run's top token is a top token of the unpadded run: bf16 logits tie or differ by an ulp or two at
    # the top (480 seeded runs: 2 different argmaxes, both exact ties in `plain`), so within 2 ulps of its maximum
    top = float(plain.float().max())
    assert float(plain.float()[int(got.argmax())]) >= top - 2 * torch.finfo(dtype).eps * abs(top), \
        (seed, int(got.argmax()), int(plain.argmax()), top)
    for l in range(cfg.num_layers):
        for a, r in ((padded_dec.kv.k(0, l), plain_dec.kv.k(0, l)), (padded_dec.kv.v(0, l), plain_dec.kv.v(0, l))):
            assert rel(a[:, :n], r[:, :n]) < 1e-2, (seed, l)
