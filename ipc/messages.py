"""Request / reply records and their validation (docs/ipc.md "Records").

    request: {"id": int, "op": str, "args": dict}
    reply:   {"id": int, "ok": True,  "result": dict, "t": (t0_us, t1_us)}
             {"id": int, "ok": False, "error": {"type": str, "message": str, "bad_input": bool}}

`t` is when the serving process started and finished the op, in microseconds of
time.perf_counter() (CLOCK_MONOTONIC: the same clock in every process of the machine);
the orchestrator builds its trace from it.
"""
from __future__ import annotations

import time

from case4_errors import BadInput

REQUIRED = object()


class ProtocolError(BadInput):
    """A malformed request: unknown op, missing or wrongly typed argument."""


class RemoteError(RuntimeError):
    """An error reply, raised on the caller's side."""

    def __init__(self, peer: str, op: str, error: dict):
        self.peer, self.op, self.type = peer, op, error.get("type", "Error")
        self.message = error.get("message", "")
        self.bad_input = bool(error.get("bad_input"))
        super().__init__(f"{peer}: {op}: {self.type}: {self.message}")


_LIST = "list[int]"

# op -> {arg: (type, default)}; REQUIRED marks a mandatory argument.
SERVER_OPS: dict[str, dict] = {
    # keep: the first `keep` positions of the session's KV already hold input_ids[:keep] (serve's
    # prompt cache): only the rest is pre-filled
    "kv_init": {"session": (int, 0), "input_ids": (_LIST, REQUIRED), "sample": (dict, None), "keep": (int, 0)},
    "bg_capture_start": {"session": (int, 0), "window": (int, 8)},
    "wait_precapture": {"session": (int, 0), "count": (int, 1), "timeout_s": (float, 60.0)},
    "replay_seq": {"session": (int, 0), "seq_len": (int, REQUIRED), "token": (int, REQUIRED),
                   "sample": (dict, None)},
    "bg_capture_stop": {},
    "kv_step": {"session": (int, 0), "token": (int, REQUIRED), "sample": (dict, None)},
    "kv_generate": {"session": (int, 0), "steps": (int, REQUIRED), "sampling": (dict, REQUIRED),
                    "start_token": (int, REQUIRED), "stop_ids": (_LIST, ())},
    # the decode loop of --sampling client (docs/ipc.md "Decode loop"): feeds `token` at
    # `seq_len` (replay_seq, or kv_step when eager), hands each step's logits to the client
    # over the direct link and steps again on the token it sends back, until it says stop;
    # a token that does not come in `timeout_s` ends the loop with an error reply
    "decode_loop": {"session": (int, 0), "seq_len": (int, REQUIRED), "token": (int, REQUIRED),
                    "loop": (int, REQUIRED), "eager": (bool, False), "timeout_s": (float, 300.0)},
    "status": {"trace": (bool, False)},
    "stop": {},
    # the seed's graph-mode API (README "Seed compatibility"): `generate` feeds the whole sequence
    # input_ids (len == seq_len) and leaves the last position's logits in the ring; when the session
    # already holds input_ids[:-1] (the previous generate) only the last token is stepped.
    # `prep_next` makes graphs ready for positions prev_seq_len..next_seq_len-1 (behind the position
    # the capture thread deletes them); a backend without per-length graphs answers ok with a note
    "generate": {"session": (int, 0), "seq_len": (int, REQUIRED), "input_ids": (_LIST, REQUIRED)},
    "prep_next": {"session": (int, 0), "prev_seq_len": (int, REQUIRED), "next_seq_len": (int, REQUIRED),
                  "timeout_s": (float, 60.0)},
}
# the seed's long names
SERVER_ALIASES = {
    "devgraph_bg_capture_start_custom": "bg_capture_start",
    "devgraph_wait_precapture_custom": "wait_precapture",
    "devgraph_bg_capture_stop": "bg_capture_stop",
    "devgraph_replay_seq_custom": "replay_seq",
}

CLIENT_OPS: dict[str, dict] = {
    # internal: tell the client its tokenizer and the logits channel once the server is up
    "init": {"tokenizer_dir": (str, None), "vocab_size": (int, REQUIRED), "shm": (str, REQUIRED),
             "slots": (int, REQUIRED)},
    # reset: the prompt starts a new detokenizer stream for session 0 (the CLI's one
    # generation); serve tokenizes before it picks a slot and passes reset False
    "tokenize": {"text": (str, REQUIRED), "add_special_tokens": (bool, True), "chat": (bool, False),
                 "max_len": (int, None), "messages": (list, None), "reset": (bool, True)},
    # stream: through the streaming detokenizer of KV session `session` (one per slot of serve);
    # reset: that stream starts anew (a generation's first token)
    "detokenize": {"ids": (_LIST, REQUIRED), "stream": (bool, False), "session": (int, 0), "reset": (bool, False)},
    # sample from the logits in shm slot `slot` (written for `step`); returns token + text
    # (+ logprobs: the token's log-probability and the top `logprobs` ones, when not None);
    # reset: start session's detokenizer stream anew (the first token of a generation)
    "sample": {"slot": (int, REQUIRED), "step": (int, REQUIRED), "params": (dict, REQUIRED),
               "position": (int, REQUIRED), "session": (int, 0), "reset": (bool, False),
               "logprobs": (int, None)},
    # the client's half of the decode loop: samples each step the server hands over (the
    # first at `position`), sends the token back, streams tokens and text to the
    # orchestrator; stops after `max_tokens` tokens or a stop id (no step is wasted)
    "sample_loop": {"loop": (int, REQUIRED), "params": (dict, REQUIRED), "position": (int, REQUIRED),
                    "max_tokens": (int, REQUIRED), "stop_ids": (_LIST, ()), "session": (int, 0),
                    "logprobs": (int, None)},
    "stop": {},
}


def _type_ok(value, typ) -> bool:
    if typ == _LIST:
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def validate(msg, ops: dict, aliases: dict | None = None) -> tuple[int, str, dict]:
    """Check a request; return (id, canonical op, args with defaults). Raises ProtocolError."""
    if not isinstance(msg, dict):
        raise ProtocolError(f"a request must be a dict, got {type(msg).__name__}")
    rid, op, args = msg.get("id"), msg.get("op"), msg.get("args", {})
    if not isinstance(op, str):
        raise ProtocolError("request has no op")
    op = (aliases or {}).get(op, op)
    if op not in ops:
        raise ProtocolError(f"unknown op {op!r}; known: {', '.join(sorted(ops))}")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(f"{op}: args must be a dict, got {type(args).__name__}")
    spec = ops[op]
    unknown = set(args) - set(spec)
    if unknown:
        raise ProtocolError(f"{op}: unknown argument(s) {sorted(unknown)}")
    out = {}
    for name, (typ, default) in spec.items():
        if name not in args or args[name] is None:
            if default is REQUIRED:
                raise ProtocolError(f"{op}: missing argument {name!r}")
            out[name] = default
            continue
        value = args[name]
        if not _type_ok(value, typ):
            tname = typ if isinstance(typ, str) else typ.__name__
            raise ProtocolError(f"{op}: argument {name!r} must be {tname}, got {type(value).__name__}")
        out[name] = list(value) if typ == _LIST else value
    return rid, op, out


def now_us() -> float:
    return time.perf_counter_ns() / 1e3


def request(rid: int, op: str, args: dict | None = None) -> dict:
    return {"id": rid, "op": op, "args": args or {}}


def ok_reply(rid, result: dict, t0: float, t1: float) -> dict:
    return {"id": rid, "ok": True, "result": result, "t": (t0, t1)}


def error_reply(rid, exc: BaseException) -> dict:
    return {"id": rid, "ok": False, "error": {
        "type": type(exc).__name__, "message": str(exc) or repr(exc),
        "bad_input": isinstance(exc, BadInput)}}
