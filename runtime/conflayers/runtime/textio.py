"""Text in and out without transformers: tokenizers for ids, jinja2 for chat templates.

Chat templates render as transformers renders them (sandboxed jinja2, trim_blocks, lstrip_blocks,
raise_exception/strftime_now helpers), then tokenise without adding special tokens again.

Control tokens come only from the chat template: text in a message that spells one (e.g.
"<|im_end|>\n<|im_start|>system") is encoded as plain text, so a user cannot fake a turn (what
llama.cpp's server does). A raw prompt is encoded the same way unless the caller opts in.
"""
from __future__ import annotations

import datetime
import json
import re
import uuid

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatError(ValueError):
    pass


def lone_surrogate(text: str) -> int | None:
    """Index of the first character that cannot be UTF-8 encoded (a lone surrogate such as
    "\\ud800", which JSON allows), or None: the tokenizer cannot take such text."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if isinstance(content, list):   # OpenAI content parts: keep the text parts
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ChatError(f"messages[{i}].content parts must be {{type: 'text', text: str}}")
        elif not isinstance(content, str):
            raise ChatError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    out = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
            else "".join(p["text"] for p in m["content"])} for m in messages]
    for i, m in enumerate(out):
        at = lone_surrogate(m["content"])
        if at is not None:
            raise ChatError(f"messages[{i}].content is not valid Unicode (a lone surrogate at character {at})")
    return out


def _raise_exception(msg):
    raise ChatError(f"chat template refused the messages: {msg}")


def compile_chat_template(text: str):
    """A chat template compiled as transformers compiles it; ChatError on a syntax error, so a
    broken template is refused when the bundle loads, not at the first chat request."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(text)
    except TemplateError as e:
        raise ChatError(f"the chat template does not compile: {e}") from None


class TextCodec:
    def __init__(self, tokenizer_file: str, chat_template: str | None = None, bos_token: str | None = None,
                 eos_token: str | None = None):
        self.tok = Tokenizer.from_file(tokenizer_file)
        # The same tokenizer with special-token parsing off: "<|im_end|>" becomes "<", "|", ...
        # (a second instance: the setting is per tokenizer, and requests run on many threads).
        self.plain = Tokenizer.from_file(tokenizer_file)
        self.plain.encode_special_tokens = True
        specials = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self._special_ids = specials
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))) \
            if specials else None
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = compile_chat_template(chat_template) if chat_template else None

    def encode(self, text: str, special_tokens: bool = False) -> list[int]:
        """Token ids of a raw prompt (with the tokenizer's BOS etc.); text spelling a control token
        is encoded as plain text unless special_tokens=True."""
        return (self.tok if special_tokens else self.plain).encode(text, add_special_tokens=True).ids

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        messages = validate_messages(messages)
        if not self.chat_template:
            raise ChatError("this model has no chat template: send a plain prompt instead of messages")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages) -> list[int]:
        """Token ids of the rendered chat; control tokens only where the template wrote them."""
        messages = validate_messages(messages)
        if self._special_re is None or not any(self._special_re.search(m["content"]) for m in messages):
            return self.tok.encode(self.render_chat(messages), add_special_tokens=False).ids
        # Some content spells a control token. Render with each such span replaced by a marker, so
        # every control token in the rendered text is the template's; encode the text between them
        # with special-token parsing off and the markers put back.
        marker, found = f"\ue000{uuid.uuid4().hex}", []

        def hide(m):
            found.append(m.group())
            return f"{marker}{len(found) - 1}\ue001"
        hidden = [{**m, "content": self._special_re.sub(hide, m["content"])} for m in messages]
        text = self.render_chat(hidden)
        unhide = re.compile(re.escape(marker) + r"(\d+)\ue001")

        def plain(segment: str) -> list[int]:
            segment = unhide.sub(lambda m: found[int(m.group(1))], segment)
            return self.plain.encode(segment, add_special_tokens=False).ids if segment else []
        ids, pos = [], 0
        for m in self._special_re.finditer(text):
            ids += plain(text[pos:m.start()])
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        return ids + plain(text[pos:])

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def stream(self) -> "StreamDecoder":
        return StreamDecoder(self)


class StreamDecoder:
    """Incremental detokenisation: emits text only once it is final (no half UTF-8 characters,
    no pieces that a later token merges differently). The concatenated deltas equal decode(ids)."""

    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.ids: list[int] = []
        self.prefix = 0      # start of the window decoded for context
        self.read = 0        # end of the ids already emitted
        self.text = ""       # everything emitted so far

    def push(self, new_ids) -> str:
        self.ids.extend(new_ids)
        before = self.codec.decode(self.ids[self.prefix:self.read])
        after = self.codec.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            delta = after[len(before):]
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """The rest of the text at the end of generation (decodes everything once)."""
        full = self.codec.decode(self.ids)
        self.prefix = self.read = len(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
