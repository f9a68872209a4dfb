"""Tokenizers for the client: the model's own (HF `transformers.AutoTokenizer` on the
model folder, chat template included), or the byte-level fallback of synthetic models.

Byte-level ids: 0..255 are the bytes of the UTF-8 text, 256 = BOS, 257 = EOS, 258 = PAD.
"""
from __future__ import annotations

from case4_errors import BadInput

BYTE_BOS, BYTE_EOS, BYTE_PAD = 256, 257, 258


class ByteTokenizer:
    kind = "byte"
    bos_id, eos_ids = BYTE_BOS, (BYTE_EOS,)
    has_chat_template = True

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([BYTE_BOS] if add_special_tokens else []) + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token_text(self, i: int) -> str:
        """One token's text for logprobs (special tokens by name)."""
        return {BYTE_BOS: "<s>", BYTE_EOS: "</s>", BYTE_PAD: "<pad>"}.get(i) or self.decode([i])

    def chat(self, conv) -> list[int]:
        """conv: one user message (str) or a conversation [{"role", "content"}, ...]."""
        turns = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in _messages(conv))
        return self.encode(turns + "<|assistant|>\n")


class HFTokenizer:
    kind = "hf"

    def __init__(self, folder: str):
        from transformers import AutoTokenizer
        try:
            self.tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            # one line: transformers' messages span several (a tokenizer.json that is a folder: six)
            why = " ".join(str(e).split()) or type(e).__name__
            raise BadInput(f"cannot load the tokenizer of {folder}: {why}") from None
        self.bos_id = self.tok.bos_token_id
        self.eos_ids = tuple(i for i in [self.tok.eos_token_id] if i is not None)
        self.has_chat_template = bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tok(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_text(self, i: int) -> str:
        """One token's text for logprobs (special tokens as written, e.g. <|im_end|>)."""
        return self.tok.decode([i], skip_special_tokens=False)

    def chat(self, conv) -> list[int]:
        """conv: one user message (str) or a conversation [{"role", "content"}, ...]."""
        if not self.has_chat_template:
            raise BadInput("--chat: this model's tokenizer has no chat template")
        prompt = self.tok.apply_chat_template(_messages(conv), tokenize=False, add_generation_prompt=True)
        return self.encode(prompt, add_special_tokens=False)  # the template has its own BOS


def _messages(conv) -> list[dict]:
    """A prompt (one user turn) or a message list, checked: each a {role, content} of strings."""
    if isinstance(conv, str):
        return [{"role": "user", "content": conv}]
    if not conv or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in conv):
        raise BadInput("chat messages must be a non-empty list of {role, content} strings")
    return [{"role": m["role"], "content": m["content"]} for m in conv]


def load_tokenizer(folder: str | None):
    return HFTokenizer(folder) if folder else ByteTokenizer()


class IncrementalDetokenizer:
    """Streaming decode: emit only text that can no longer change (the vLLM / TGI method:
    decode a short window of ids twice, hold back an incomplete UTF-8 sequence)."""

    def __init__(self, tok):
        self.tok, self.ids, self.prefix, self.read = tok, [], 0, 0

    def push(self, ids) -> str:
        n = len(self.ids)
        self.ids.extend(int(i) for i in ids)
        try:
            before = self.tok.decode(self.ids[self.prefix:self.read])
            after = self.tok.decode(self.ids[self.prefix:])
        except BaseException:
            del self.ids[n:]  # a push that fails leaves the stream as it was (no poisoned state)
            raise
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def text(self) -> str:
        return self.tok.decode(self.ids)
