"""Finding machine paths in artifacts (bundles, shipped profiles): absolute paths, the home
directory, the repository or temporary folders of the machine that wrote them."""
from __future__ import annotations

import json
import os
import re

# an absolute path under a usual root, a home-relative path, or a Windows drive path
ABSOLUTE = re.compile(r"(?:^|[\s\"'(=,\[])((?:/(?:home|root|tmp|work|Users|var|opt|usr|mnt|private|srv|data|etc)"
                      r"(?=[/\"'\s,)\]]|$)|~/|[A-Za-z]:\\\\)[^\"'\s,)\]]*)")


def machine_paths(text: str, forbidden=()) -> list[str]:
    """Absolute paths in `text`, and each of the `forbidden` strings (home, repo, ...) it contains."""
    hits = [m.group(1) for m in ABSOLUTE.finditer(text)]
    return hits + [f for f in forbidden if f and f in text]


def absolute_values(obj, where: str = "") -> list[str]:
    """`key.path: value` for every string in a JSON document (keys too) that is an absolute path."""
    if isinstance(obj, dict):
        return [hit for k, v in obj.items()
                for hit in ([f"{where}{k} (key)"] if _absolute(k) else []) + absolute_values(v, f"{where}{k}.")]
    if isinstance(obj, list):
        return [hit for i, v in enumerate(obj) for hit in absolute_values(v, f"{where}{i}.")]
    return [f"{where.rstrip('.')}: {obj}"] if isinstance(obj, str) and _absolute(obj) else []


def _absolute(s: str) -> bool:
    return os.path.isabs(s) or s.startswith("~") or bool(re.match(r"[A-Za-z]:\\", s))


def scan_bundle(root: str, forbidden=(), skip: dict | None = None) -> list[str]:
    """Machine paths in every text file of a bundle, as `file: finding`. JSON documents are also
    walked value by value (but tokenizer.json, whose vocabulary may hold "/" tokens, is only
    searched for the `forbidden` strings). `skip`: {file: [dotted key path, ...]} values left out
    of the scan (known exceptions, each named by its test)."""
    found = []
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if name.endswith((".onnx", ".bin", ".png", ".data")):
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if name == "tokenizer.json":
                hits = []
            elif name.endswith(".json"):
                doc = json.loads(text)
                for key in (skip or {}).get(rel, []):
                    _drop(doc, key.split("."))
                text = json.dumps(doc)
                hits = absolute_values(doc) + machine_paths(text)
            else:
                hits = machine_paths(text)
            hits += [f for f in forbidden if f and f in text]
            found += [f"{rel}: {h}" for h in hits]
    return found


def _drop(doc: dict, keys: list[str]) -> None:
    for k in keys[:-1]:
        doc = doc.get(k, {})
    doc.pop(keys[-1], None)
