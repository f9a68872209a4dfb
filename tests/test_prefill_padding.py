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


def test_buckets():
    pg = PrefillGraphs(dec=None, max_seq=1024)
    assert [pg.bucket(n) for n in (1, 15, 16, 17, 32, 33, 512, 513, 1024)] == [16, 16, 16, 32, 32, 64, 512, 1024, 1024]
    assert pg.bucket(1025) is None
    assert pg.buckets(2048) == [16, 32, 64, 128, 256, 512, 1024, 2048] and pg.buckets(998) == [16, 32, 64, 128, 256, 512]
    assert pg.buckets(15) == [] and pg.buckets(16) == [16]
    assert MIN_BUCKET == 16


@pytest.mark.parametrize("shape", ["tiny", "tiny-mha", "tiny-partial"])
@pytest.mark.parametrize("n", [1, 5, 16, 23])
def test_padded_prompt_matches(shape, n):
    cfg = SYNTHETIC_SHAPES[shape]
    dtype = torch.bfloat16
    seed = int(torch.randint(0, 2**31, ()).item())  # fresh weights and prompt every run
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
    assert rel(got, want) < 3e-2, rel(got, want)        # bf16 path vs the fp32 oracle
    assert rel(got, plain) < 1e-2, rel(got, plain)       # padding changes nothing but GEMM shapes
    # the padded run's top token is a top token of the unpadded run: bf16 logits tie or differ by an ulp or two at
    # the top (480 seeded runs: 2 different argmaxes, both exact ties in `plain`), so within 2 ulps of its maximum
    top = float(plain.float().max())
    assert float(plain.float()[int(got.argmax())]) >= top - 2 * torch.finfo(dtype).eps * abs(top), \
        (seed, int(got.argmax()), int(plain.argmax()), top)
    for l in range(cfg.num_layers):
        for a, r in ((padded_dec.kv.k(0, l), plain_dec.kv.k(0, l)), (padded_dec.kv.v(0, l), plain_dec.kv.v(0, l))):
            assert rel(a[:, :n], r[:, :n]) < 1e-2
