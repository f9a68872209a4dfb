"""The JIT client process: tokenizes, samples from the logits in shared memory, and
detokenizes incrementally for streaming. It starts before the model is loaded (imports
overlap with the server's load); `init` then names the tokenizer folder and the channel.
"""
from __future__ import annotations

from case4_errors import BadInput
from client.sampler import SamplingParams, sample
from client.tokenizer import IncrementalDetokenizer, load_tokenizer
from ipc.messages import CLIENT_OPS, now_us, ok_reply
from ipc.peers import child_setup, serve
from ipc.shm import LogitsChannel


class Client:
    def __init__(self):
        self.tok = self.channel = self.detok = None
        self._params = {}

    def params(self, d: dict) -> SamplingParams:
        key = tuple(sorted(d.items()))
        if key not in self._params:
            self._params[key] = SamplingParams.from_dict(d)
        return self._params[key]

    def handle(self, op: str, a: dict) -> dict:
        if op == "init":
            self.tok = load_tokenizer(a["tokenizer_dir"])
            self.channel = LogitsChannel(a["shm"], a["slots"], a["vocab_size"])
            self.detok = IncrementalDetokenizer(self.tok)
            return {"kind": self.tok.kind, "bos_id": self.tok.bos_id, "eos_ids": list(self.tok.eos_ids),
                    "has_chat_template": self.tok.has_chat_template}
        if op == "stop":
            if self.channel:
                self.channel.close()
            return {}
        if self.tok is None:
            raise BadInput(f"{op}: the client is not initialised yet (send init first)")
        if op == "tokenize":
            ids = self.tok.chat(a["text"]) if a["chat"] else self.tok.encode(a["text"], a["add_special_tokens"])
            if a["max_len"] is not None and len(ids) > a["max_len"]:
                raise BadInput(f"the prompt is {len(ids)} tokens, longer than the context allows "
                               f"({a['max_len']}; see --max-seq)")
            self.detok = IncrementalDetokenizer(self.tok)  # a new prompt starts a new stream
            return {"ids": ids}
        if op == "detokenize":
            return {"text": self.detok.push(a["ids"]) if a["stream"] else self.tok.decode(a["ids"])}
        if op == "sample":
            logits = self.channel.read(a["slot"], a["step"])
            token = sample(logits, self.params(a["params"]), a["position"])
            return {"token": token, "text": self.detok.push([token])}
        raise BadInput(f"op {op!r} is not implemented")


def client_main(req, rep, opts: dict | None = None) -> None:
    child_setup()
    t0 = now_us()
    if not (opts or {}).get("lazy"):
        import transformers  # noqa: F401  (slow import, done while the server loads)
    rep.put(ok_reply(0, {"ready": True}, t0, now_us()))
    serve(req, rep, CLIENT_OPS, Client().handle)
