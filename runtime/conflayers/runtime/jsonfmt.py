"""JSON text for profiles: objects indented one space per level (readable diffs), lists of
numbers on one line (a draft vocabulary of 8,192 token ids is one line, not 8,192)."""
from __future__ import annotations

import json


def dump_profile_json(obj, indent: int = 1) -> str:
    """Like json.dumps(obj, indent=indent), except that a list whose items are all numbers is
    written inline: `[1, 2, 3]`. json.loads of the result equals obj. No trailing newline."""
    return _dump(obj, 0, indent)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _block(open_: str, close: str, items: list[str], level: int, indent: int) -> str:
    pad = "\n" + " " * (indent * (level + 1))
    return open_ + pad + ("," + pad).join(items) + "\n" + " " * (indent * level) + close


def _dump(obj, level: int, indent: int) -> str:
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{json.dumps(_key(k))}: {_dump(v, level + 1, indent)}" for k, v in obj.items()]
        return _block("{", "}", items, level, indent)
    if isinstance(obj, (list, tuple)):
        if not obj:
            return "[]"
        if all(_is_number(x) for x in obj):
            return json.dumps(list(obj))
        return _block("[", "]", [_dump(v, level + 1, indent) for v in obj], level, indent)
    return json.dumps(obj)


def _key(k) -> str:
    """Object keys as json.dumps writes them (it accepts str, int, float, bool and None keys)."""
    if isinstance(k, str):
        return k
    return json.dumps(k) if k is None or isinstance(k, bool) else str(k)
