"""The JIT client process: tokenizes, samples from the logits in shared memory, and
detokenizes incrementally for streaming. It starts before the model is loaded (imports
overlap with the server's load); `init` then names the tokenizer folder and the channel.
In the decode loop (`sample_loop`, the path of --sampling client) it gets each step from
the server over a direct link (ipc/link.py), sends the sampled token straight back, and
streams tokens, text and per-token times to the orchestrator every STREAM_US.
"""
from __future__ import annotations

from case4_errors import BadInput
from case4_sampling import SamplingParams, sample
from client.tokenizer import IncrementalDetokenizer, load_tokenizer
from ipc.link import ABORT, CANCEL
from ipc.messages import CLIENT_OPS, now_us, ok_reply
from ipc.peers import LOOP_SPIN_S, child_setup, serve, spin_get
from ipc.shm import LogitsChannel

STREAM_US = 10_000  # the decode loop sends what it has to the orchestrator at most this often


class Client:
    def __init__(self, rep=None, link=None):
        self.rep, self.link = rep, link
        self.tok = self.channel = self.detok = self.vocab_size = None
        self._params = {}

    def sample_loop(self, a: dict) -> dict:
        """Sample each step the server hands over, send the token back, or (loop, None)
        after `max_tokens` tokens or a stop id, so the server never steps in vain."""
        if self.link is None:
            raise BadInput("sample_loop: this client has no link to a server")
        loop, pos, n_max, stop = a["loop"], a["position"], a["max_tokens"], frozenset(a["stop_ids"])
        inbox, put = self.link.to_client, self.link.to_server.put
        toks, times, sent, reason = [], [], 0, "aborted"
        try:
            if self.tok is None:
                raise BadInput("sample_loop: the client is not initialised yet (send init first)")
            read, slots = self.channel.read, self.channel.slots
            params = self.params(a["params"])
            if n_max < 1:
                raise BadInput(f"sample_loop: max_tokens must be >= 1, got {n_max}")
            t_sent = now_us()
            while True:
                msg = spin_get(inbox, LOOP_SPIN_S)
                t0 = now_us()
                if msg == ABORT:
                    break
                if msg[0] != loop:  # left over from an earlier loop
                    continue
                if msg[1] is None:
                    raise RuntimeError("the server ended the decode loop (its reply says why)")
                if msg[1] == CANCEL:  # the orchestrator stops this generation early (serve)
                    put((loop, None))
                    reason = "cancelled"
                    break
                tok = sample(read(msg[1] % slots, msg[1]), params, pos)
                pos += 1
                last = len(toks) + 1 >= n_max or tok in stop
                put((loop, None if last else tok))  # first: the server steps while we book-keep
                t1 = now_us()
                toks.append(tok)
                times.append((t0, t1))
                if last:
                    reason = "eos" if tok in stop else "max_tokens"
                    break
                if t1 - t_sent >= STREAM_US:
                    sent, t_sent = self._stream(toks, times, sent), t1
        except BaseException:
            put((loop, None))  # the server may wait for our token: end its loop too
            raise
        finally:
            self._stream(toks, times, sent)
        return {"tokens": len(toks), "stop_reason": reason, "position": pos}

    def _stream(self, toks: list, times: list, sent: int) -> int:
        """Send tokens[sent:] with their text and (t0, t1) sampling times; return len(toks)."""
        if sent < len(toks):
            self.rep.put({"stream": (toks[sent:], self.detok.push(toks[sent:]), times[sent:])})
        return len(toks)

    def params(self, d: dict) -> SamplingParams:
        key = tuple(sorted(d.items()))
        if key not in self._params:
            self._params[key] = SamplingParams.from_dict(d)
        return self._params[key]

    def handle(self, op: str, a: dict) -> dict:
        if op == "init":
            # all or nothing: a failed init (no tokenizer, no such block) leaves the client as it was
            if a["vocab_size"] < 1 or a["slots"] < 1:
                raise BadInput(f"init: vocab_size and slots must be >= 1, got {a['vocab_size']} and {a['slots']}")
            tok = load_tokenizer(a["tokenizer_dir"])
            channel = LogitsChannel(a["shm"], a["slots"], a["vocab_size"])
            if self.channel is not None:
                self.channel.close()
            self.tok, self.vocab_size, self.channel = tok, a["vocab_size"], channel
            self.detok = IncrementalDetokenizer(tok)
            return {"kind": self.tok.kind, "bos_id": self.tok.bos_id, "eos_ids": list(self.tok.eos_ids),
                    "has_chat_template": self.tok.has_chat_template}
        if op == "stop":
            if self.channel:
                self.channel.close()
            return {}
        if op == "sample_loop":
            return self.sample_loop(a)
        if self.tok is None:
            raise BadInput(f"{op}: the client is not initialised yet (send init first)")
        if op == "tokenize":
            conv = a["messages"] if a["messages"] is not None else a["text"]
            ids = self.tok.chat(conv) if a["chat"] else self.tok.encode(a["text"], a["add_special_tokens"])
            if a["max_len"] is not None and len(ids) > a["max_len"]:
                raise BadInput(f"the prompt is {len(ids)} tokens, longer than the context allows "
                               f"({a['max_len']}; see --max-seq)")
            self.detok = IncrementalDetokenizer(self.tok)  # a new prompt starts a new stream
            return {"ids": ids}
        if op == "detokenize":
            bad = [i for i in a["ids"] if not 0 <= i < self.vocab_size]
            if bad:
                raise BadInput(f"detokenize: token id {bad[0]} out of range [0, {self.vocab_size})")
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
    serve(req, rep, CLIENT_OPS, Client(rep, (opts or {}).get("link")).handle)
