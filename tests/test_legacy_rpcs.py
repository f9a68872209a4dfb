"""The seed's legacy API (issue 28 item 4), through the protocol: the server RPCs `generate
{seq_len, input_ids}` and `prep_next {prev_seq_len, next_seq_len}` on live reference and hf
servers, `--model-name` as an alias of `--model`, and run_ipc.sh's PYTORCH_CUDA_ALLOC_CONF.

Oracles: `generate`'s logits (its step path and its prefill path) against the reference
decoder's own prefill of the same ids computed in this process, and the hf server's against
the reference server's (two implementations of the same seeded weights)."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ipc import shm
from ipc.peers import Peer

ROOT = Path(__file__).resolve().parent.parent


def _start(backend: str) -> Peer:
    from server.process import server_main
    name = shm.new_name(os.getpid())
    p = Peer("server", server_main, ({"model": "synthetic:tiny", "backend": backend, "device": "cpu",
                                      "graph_mode": "exact", "shm": name, "slots": 4},)).start()
    info = p.recv(0, timeout=300)
    assert info["ok"], info
    p.info, p.shm_name = info["result"], name
    p.channel = shm.LogitsChannel(name, 4, p.info["vocab_size"])
    return p


@pytest.fixture(scope="module", params=["reference", "hf"])
def server(request):
    p = _start(request.param)
    yield p
    p.channel.close()
    p.stop(timeout=30)  # a clean exit is the check; the hf server's took over Peer.stop's default 3 s on a loaded CI
    assert p.proc.exitcode == 0
    shm.unlink(p.shm_name)


@pytest.fixture(scope="module")
def oracle():
    """The reference decoder on the same synthetic weights, in this process: logits of a prefill."""
    from server.kv import KVArena
    from server.model.resolve import resolve_model
    from server.reference import ReferenceDecoder
    m = resolve_model("synthetic:tiny", dtype="float32", device="cpu", seed=0)
    dec = ReferenceDecoder(m.weights, KVArena(m.cfg, 1, torch.float32))
    return lambda ids: dec.prefill(0, list(ids)).numpy()


def _logits(p, r):
    return np.array(p.channel.read(r["slot"], r["step"]))


def _err(p, op, args):
    reply = p.recv(p.send(op, args), timeout=60)
    assert not reply["ok"], reply
    return reply["error"]


def test_generate_returns_the_last_logits_stepping_when_it_can(server, oracle):
    g = torch.Generator().manual_seed(7)
    ids = [256] + torch.randint(0, 256, (6,), generator=g).tolist()
    seq = ids[:3]
    r = server.call("generate", {"seq_len": 3, "input_ids": seq})["result"]
    assert r["path"] == "prefill" and r["seq_len"] == 3
    np.testing.assert_allclose(_logits(server, r), oracle(seq), rtol=0, atol=2e-4)
    for n in range(4, len(ids) + 1):  # the seed's loop: the sequence grows by the sampled token each call
        seq = ids[:n]
        r = server.call("generate", {"seq_len": n, "input_ids": seq})["result"]
        assert r["path"] == "step" and r["seq_len"] == n
        np.testing.assert_allclose(_logits(server, r), oracle(seq), rtol=0, atol=2e-4)
    # a different history of the same length is a prefill again, not a step on the wrong cache
    other = ids[:-1] + [(ids[-1] + 1) % 256]
    r = server.call("generate", {"seq_len": len(other), "input_ids": other})["result"]
    assert r["path"] == "prefill"
    np.testing.assert_allclose(_logits(server, r), oracle(other), rtol=0, atol=2e-4)
    # after kv_init the session no longer holds what generate fed: the next generate prefills
    server.call("kv_init", {"input_ids": ids[:2]})
    r = server.call("generate", {"seq_len": 3, "input_ids": ids[:3]})["result"]
    assert r["path"] == "prefill"


def test_generate_bad_input(server):
    assert "must equal len(input_ids)" in _err(server, "generate", {"seq_len": 4, "input_ids": [256, 1]})["message"]
    assert "out of range" in _err(server, "generate", {"seq_len": 2, "input_ids": [256, 10**6]})["message"]
    assert "missing argument 'input_ids'" in _err(server, "generate", {"seq_len": 2})["message"]
    assert server.call("status")["ok"]


def test_prep_next_answers_ok_with_a_note_without_per_length_graphs(server):
    server.call("kv_init", {"input_ids": [256, 65, 66]})
    r = server.call("prep_next", {"prev_seq_len": 3, "next_seq_len": 5})["result"]
    assert r["ok"] is True and r["captured"] == 0
    assert r["note"].startswith("nothing to prepare") and server.info["backend"] in r["note"]
    e = _err(server, "prep_next", {"prev_seq_len": 2, "next_seq_len": 5})
    assert e["bad_input"] and "does not match session 0's position 3" in e["message"]
    e = _err(server, "prep_next", {"prev_seq_len": 3, "next_seq_len": 3})
    assert e["bad_input"] and "next_seq_len must be in (3," in e["message"]


def test_hf_and_reference_servers_agree_on_generate():
    """Two implementations (transformers' Llama, our ReferenceDecoder) of the same seeded weights."""
    ps = [_start(b) for b in ("reference", "hf")]
    try:
        ids = [256] + list(b"legacy")
        out = []
        for p in ps:
            paths, logits = [], []
            for n in range(2, len(ids) + 1):
                r = p.call("generate", {"seq_len": n, "input_ids": ids[:n]})["result"]
                paths.append(r["path"])
                logits.append(_logits(p, r))  # before the ring's slot is reused
            assert paths == ["prefill"] + ["step"] * (len(ids) - 2)
            out.append(np.stack(logits))
        np.testing.assert_allclose(out[0], out[1], rtol=0, atol=2e-4)
    finally:
        for p in ps:
            p.channel.close()
            p.stop()
            shm.unlink(p.shm_name)


def test_model_name_is_an_alias_of_model():
    from conductor.cli import build_parser
    assert build_parser().parse_args(["--model-name", "synthetic:tiny"]).model == "synthetic:tiny"
    assert build_parser().parse_args(["--model", "x", "--model-name", "y"]).model == "y"  # the last one wins


def record_env(opts):
    """A server factory (CASE4_SERVER_FACTORY) that writes the server's PYTORCH_CUDA_ALLOC_CONF."""
    from server.process import load
    Path(os.environ["CASE4_TEST_ENV_OUT"]).write_text(os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "<unset>"))
    return load({**opts, "factory": None})


@pytest.mark.parametrize("given, seen", [(None, "expandable_segments:True"), ("max_split_size_mb:64", "max_split_size_mb:64")])
def test_run_ipc_sets_the_alloc_conf_where_unset(tmp_path, given, seen):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASE4_") or k in ("CASE4_VENV", "CASE4_HOME")}
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if given:
        env["PYTORCH_CUDA_ALLOC_CONF"] = given
    env.update(CASE4_SERVER_FACTORY="tests.test_legacy_rpcs:record_env", CASE4_TEST_ENV_OUT=str(tmp_path / "env"),
               PYTHONPATH=str(ROOT))
    r = subprocess.run(["bash", str(ROOT / "run_ipc.sh"), "--model-name", "synthetic:tiny", "--device", "cpu",
                        "--backend", "reference", "--prompt", "hi", "--max-tokens", "2", "--output-dir",
                        str(tmp_path), "--quiet"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "env").read_text() == seen
    assert "model synthetic:tiny loaded" in r.stderr  # --model-name reached the server (after run_ipc's default)
