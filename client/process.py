"""The JIT client process: tokenizes, samples from the logits in shared memory, and
detokenizes incrementally for streaming. It starts before the model is loaded (imports
overlap with the server's load); `init` then names the tokenizer folder and the channel.
In the decode loop (`sample_loop`, the path of --sampling client) it gets each step from
the server over a direct link (ipc/link.py), sends the sampled token straight back, and
streams tokens, text and per-token times to the orchestrator every STREAM_US.
"""
from __future__ import annotations

import numpy as np

from case4_errors import BadInput
from case4_sampling import SamplingParams, sample
from client.tokenizer import IncrementalDetokenizer, load_tokenizer
from ipc.link import ABORT, CANCEL
from ipc.messages import CLIENT_OPS, now_us, ok_reply
from ipc.peers import LOOP_SPIN_S, child_setup, serve, spin_get
from ipc.shm import LogitsChannel

STREAM_US = 10_000  # the decode loop sends what it has to the orchestrator at most this often
MAX_STREAMS = 4096  # detokenizer streams (one per KV session) a client keeps at most


def logprobs_of(logits, token: int, k: int) -> tuple:
    """(log p(token), [(id, log p)] of the k most likely ids, descending, lower id first on
    ties): log-softmax of the raw logits in float64 (OpenAI's / vLLM's logprobs are of the
    model's distribution, before temperature, top-k or top-p)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lp = x - (m + np.log(np.exp(x - m).sum()))
    top = []
    if k:
        idx = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)
        idx = idx[np.lexsort((idx, -lp[idx]))]
        top = [(int(i), float(lp[i])) for i in idx]
    return float(lp[token]), top


class Client:
    def __init__(self, rep=None, link=None):
        self.rep, self.link = rep, link
        self.tok = self.channel = self.vocab_size = None
        self.detoks: dict[int, IncrementalDetokenizer] = {}  # KV session -> its text stream
        self._params = {}

    def detok(self, session: int, reset: bool = False) -> IncrementalDetokenizer:
        if not 0 <= session < MAX_STREAMS:
            raise BadInput(f"session must be in [0, {MAX_STREAMS}), got {session}")
        if reset or session not in self.detoks:
            self.detoks[session] = IncrementalDetokenizer(self.tok)
        return self.detoks[session]

    def check_logprobs(self, k) -> None:
        if k is not None and not 0 <= k <= self.vocab_size:
            raise BadInput(f"logprobs must be in [0, {self.vocab_size}], got {k}")

    def logprob_entries(self, logits, token: int, k: int) -> tuple:
        """(token text, log p, [(text, id, log p)] top k) for serve's logprobs; a token's text is
        its decode alone (a piece of a UTF-8 character shows as U+FFFD, as in vLLM)."""
        lp, top = logprobs_of(logits, token, k)
        text = self.tok.token_text
        return text(token), lp, [(text(i), i, v) for i, v in top]

    def sample_loop(self, a: dict) -> dict:
        """Sample each step the server hands over, send the token back, or (loop, None)
        after `max_tokens` tokens or a stop id, so the server never steps in vain."""
        if self.link is None:
            raise BadInput("sample_loop: this client has no link to a server")
        loop, pos, n_max, stop = a["loop"], a["position"], a["max_tokens"], frozenset(a["stop_ids"])
        inbox, put = self.link.to_client, self.link.to_server.put
        toks, times, sent, reason = [], [], 0, "aborted"
        lps, k = ([] if a["logprobs"] is not None else None), a["logprobs"]
        detok = None
        try:
            if self.tok is None:
                raise BadInput("sample_loop: the client is not initialised yet (send init first)")
            read, slots = self.channel.read, self.channel.slots
            params = self.params(a["params"])
            detok = self.detok(a["session"])
            self.check_logprobs(k)
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
                logits = read(msg[1] % slots, msg[1])
                tok = sample(logits, params, pos)
                pos += 1
                last = len(toks) + 1 >= n_max or tok in stop
                put((loop, None if last else tok))  # first: the server steps while we book-keep
                if lps is not None:  # the server writes the next step to another ring slot
                    lps.append(self.logprob_entries(logits, tok, k))
                t1 = now_us()
                toks.append(tok)
                times.append((t0, t1))
                if last:
                    reason = "eos" if tok in stop else "max_tokens"
                    break
                if t1 - t_sent >= STREAM_US:
                    sent, t_sent = self._stream(detok, toks, times, sent, lps), t1
        except BaseException:
            put((loop, None))  # the server may wait for our token: end its loop too
            raise
        finally:
            if detok is not None:
                self._stream(detok, toks, times, sent, lps)
        return {"tokens": len(toks), "stop_reason": reason, "position": pos}

    def _stream(self, detok, toks: list, times: list, sent: int, lps: list | None) -> int:
        """Send tokens[sent:] with their text and (t0, t1) sampling times (and their logprobs
        when asked); return len(toks)."""
        if sent < len(toks):
            item = (toks[sent:], detok.push(toks[sent:]), times[sent:])
            self.rep.put({"stream": item if lps is None else (*item, lps[sent:])})
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
            self.detoks = {}
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
            if a["reset"]:
                self.detok(0, reset=True)  # the CLI's new prompt starts a new stream
            return {"ids": ids}
        if op == "detokenize":
            bad = [i for i in a["ids"] if not 0 <= i < self.vocab_size]
            if bad:
                raise BadInput(f"detokenize: token id {bad[0]} out of range [0, {self.vocab_size})")
            if not a["stream"]:
                return {"text": self.tok.decode(a["ids"])}
            return {"text": self.detok(a["session"], a["reset"]).push(a["ids"])}
        if op == "sample":
            logits = self.channel.read(a["slot"], a["step"])
            detok = self.detok(a["session"], a["reset"])
            self.check_logprobs(a["logprobs"])
            token = sample(logits, self.params(a["params"]), a["position"])
            out = {"token": token, "text": detok.push([token])}
            if a["logprobs"] is not None:
                out["logprobs"] = [self.logprob_entries(logits, token, a["logprobs"])]
            return out
        raise BadInput(f"op {op!r} is not implemented")


def client_main(req, rep, opts: dict | None = None) -> None:
    child_setup()
    t0 = now_us()
    if not (opts or {}).get("lazy"):
        import transformers  # noqa: F401  (slow import, done while the server loads)
    rep.put(ok_reply(0, {"ready": True}, t0, now_us()))
    serve(req, rep, CLIENT_OPS, Client(rep, (opts or {}).get("link")).handle)
