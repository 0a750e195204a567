"""The HTTP API's request schema and response bodies (OpenAI's shapes, plus the `conflayers`
metrics object), and the error a refused request becomes."""
from __future__ import annotations

import json
import time

from ..engine import EngineAPI


RETRY_AFTER_S = 1


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def busy(message: str) -> ApiError:
    return ApiError(503, message, kind="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})


def json_bytes(obj) -> bytes:
    """UTF-8 JSON; falls back to ASCII escapes when a string holds a lone surrogate (an echoed
    field), which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(obj).encode()


# -- request parsing --------------------------------------------------------------------------

# Request fields passed to Engine.generate under another name; the engine checks every value.
ENGINE_NAMES = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
                "stop": "stop", "task": "task", "speculate": "speculate"}


def parse_request(body, chat: bool) -> tuple[dict, dict]:
    """An OpenAI-style body as Engine.generate keyword arguments (+ 'stream'), and the map from
    the engine's parameter names back to the body's fields, for error bodies. Only the HTTP
    shape is checked here (what decides the response form, which fields carry the prompt);
    whether the values are valid is the engine's to say."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, "only n=1 is supported", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    max_field = "max_completion_tokens" if body.get("max_tokens") is None and \
        body.get("max_completion_tokens") is not None else "max_tokens"
    fields = {**ENGINE_NAMES, max_field: "max_new_tokens"}
    args = {name: body[f] for f, name in fields.items() if body.get(f) is not None}
    args.setdefault("max_new_tokens", None)        # absent: as many as fit, up to the engine's default
    args.update(_prompt_input(body, chat), stream=stream)
    return args, {name: f for f, name in fields.items()}


def _prompt_input(body: dict, chat: bool) -> dict:
    """prompt= or messages= for Engine.generate: the field must be there; a completion prompt may
    be a list of exactly one string (OpenAI's batch shape)."""
    field = "messages" if chat else "prompt"
    value = body.get(field)
    if value is None:
        raise ApiError(400, f"'{field}' is required", field)
    if not chat and isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise ApiError(400, "'prompt' must be a string (a list of exactly one string is accepted; "
                                "batches and token-id prompts are not supported)", "prompt")
        value = value[0]
    return {field: value}


def _profile_hint(engine: EngineAPI, args: dict) -> str | None:
    """The profile label a request's tokens go under when it ends before the engine says."""
    if not args.get("speculate", True):
        return None
    return args.get("task") or engine.bundle.default_profile


# -- responses --------------------------------------------------------------------------------


def _usage(metrics: dict) -> dict:
    p, c = metrics["prompt_tokens"], metrics["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": metrics.get("cached_prompt_tokens", 0)}}


def completion_body(rid: str, model: str, chat: bool, result) -> dict:
    metrics = result.metrics.to_dict()
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "logprobs": None, "finish_reason": result.finish_reason}
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": result.finish_reason}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(metrics), "conflayers": metrics}


def chunk_body(rid: str, model: str, chat: bool, created: int, delta: dict | None = None,
               text: str | None = None, finish_reason: str | None = None) -> dict:
    """One SSE chunk in OpenAI's streaming shape (delta for chat, text for completions)."""
    if chat:
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}
