"""The OpenAI completions protocol as the server speaks it: request checks, text with stop strings, responses.

No HTTP here (``pipeline.serve`` has the app): ``parse_request`` turns a JSON body into a ``GenRequest``
or raises ``ApiError`` (status, message, the offending field); ``TextStream`` turns committed tokens
into text deltas, holding back what could be the start of a stop string; the ``*_response`` and
``*_chunk`` functions build the response bodies.

Fields: ``model``, ``prompt`` (completions) / ``messages`` (chat), ``max_tokens`` (chat also
``max_completion_tokens``), ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options.include_usage``, ``user``, ``metadata.dataset`` (the skip-set registry's dataset tag),
and vLLM's extra ``top_k``. Fields that would change the result and are not supported (``n > 1``,
``logprobs``, ``tools``, ...) are refused, never ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

# fields accepted but without effect on the tokens (or only checked)
_INERT = {"user", "stream_options", "metadata", "service_tier", "store", "parallel_tool_calls"}
# fields that change results and are not supported: refused by name unless given a neutral value
_UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],), "function_call": ("none", "auto"),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "presence_penalty": (0,),
    "frequency_penalty": (0,), "repetition_penalty": (1,), "min_tokens": (0,), "audio": (), "modalities": (["text"],),
    "prediction": (),
}
GREEDY_BELOW = 1e-5  # a temperature under this is greedy decoding (as vLLM does): logits / 1e-40 overflow
_KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "seed", "stop", "stream"} | _INERT | set(_UNSUPPORTED)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_tokens: int  # the most new tokens a request may ask for
    default_max_tokens: int
    max_stop: int = 4
    max_stop_chars: int = 256


@dataclass
class GenRequest:
    chat: bool
    model: str
    prompt: str | list[dict]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    dataset: str | None = None


def _number(body: dict, key: str, default, lo=None, hi=None, integer=False, lo_open=False):
    v = body.get(key, default)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise ApiError(400, f"'{key}' must be {kind}, got {str(v)[:40]}", key)
    if integer and isinstance(v, float) and not v.is_integer():
        raise ApiError(400, f"'{key}' must be {kind}, got {v!r}", key)
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        if hi is not None:
            rng = f"in {'(' if lo_open else '['}{lo}, {hi}]"
        else:
            rng = f"{'>' if lo_open else '>='} {lo}"
        raise ApiError(400, f"'{key}' must be {rng}, got {v!r}", key)
    return int(v) if integer else float(v)


def parse_request(body, chat: bool, served_model: str, limits: Limits) -> GenRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ApiError(400, f"unknown field(s): {', '.join(unknown)}", unknown[0])
    for key, neutral in _UNSUPPORTED.items():
        given = body.get(key)
        if given is not None and not any(given == v and isinstance(given, bool) == isinstance(v, bool)
                                         for v in neutral):
            only = f" (only {' or '.join(map(repr, neutral))})" if neutral else ""
            raise ApiError(400, f"'{key}' is not supported by this server{only}; it would change the "
                                f"result, so the request is refused rather than answered without it", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (GET /v1/models lists it)", "model")
    if model != served_model:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served_model!r}", "model",
                       "not_found_error")
    if chat:
        prompt = body.get("messages")
        if prompt is None:
            raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", "messages")
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(prompt):
            if isinstance(m, dict) and isinstance(m.get("content"), list):  # content parts: text only
                parts = m["content"]
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in parts):
                    raise ApiError(400, f"messages[{i}].content: only text parts ({{type: text, text}}) are "
                                        f"supported", "messages")
                m = prompt[i] = {**m, "content": "\n".join(p["text"] for p in parts)}
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ApiError(400, f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
            if m["role"] not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}].role must be system, user, assistant or developer, "
                                    f"got {m['role']!r}", "messages")
        prompt = [{"role": m["role"] if m["role"] != "developer" else "system", "content": m["content"]}
                  for m in prompt]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            raise ApiError(400, "'prompt' must be a string (token-id prompts are not supported)", "prompt")
        if isinstance(prompt, list):
            raise ApiError(400, "'prompt' must be one string (a batch of prompts in one request is not supported: "
                                "send one request per prompt)", "prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' is required: a non-empty string", "prompt")
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, limits.default_max_tokens, 1, None, integer=True)
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"'{key}' is {max_tokens}; this server allows at most {limits.max_tokens}", key)
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' has {len(stop)} entries; at most {limits.max_stop} are allowed", "stop")
    if any(len(s) > limits.max_stop_chars for s in stop):
        raise ApiError(400, f"a 'stop' entry is longer than {limits.max_stop_chars} characters", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict) or not isinstance(meta.get("dataset", ""), str):
        raise ApiError(400, "'metadata' must be an object of strings ('metadata.dataset': the dataset tag)",
                       "metadata")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", None, integer=True) % 2**63
    temperature = _number(body, "temperature", 1.0, 0, 2)
    return GenRequest(
        chat=chat, model=model, prompt=prompt, max_tokens=max_tokens,
        temperature=0.0 if temperature < GREEDY_BELOW else temperature,
        top_p=_number(body, "top_p", 1.0, 0, 1, lo_open=True),
        top_k=max(0, _number(body, "top_k", 0, -1, None, integer=True)),  # vLLM: -1 (or 0) = off
        seed=seed, stop=stop, stream=stream, include_usage=bool(opts.get("include_usage", False)),
        dataset=meta.get("dataset") or None)


class TextStream:
    """Committed tokens -> text deltas, decoded incrementally (each token decodes a short window, as
    vLLM's detokenizer does: the text of ``ids[prefix:]`` minus that of ``ids[prefix:read]``, so
    spaces that depend on the previous token and characters split over tokens come out right). A tail
    that could begin a stop string is held back until it cannot; a stop string ends the text before
    it. ``tokens`` counts the tokens up to the one that completed a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far
        self.sent = 0  # characters handed out
        self.stopped = False
        self._hold = max(map(len, stop), default=1) - 1
        self._prefix = self._read = 0

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def _decode_next(self) -> None:
        dec = self.tokenizer.decode
        before = dec(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = dec(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # else: a character still incomplete
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, toks: list[int]) -> str:
        """The new text these tokens make available (sets ``stopped`` when a stop string appears)."""
        for t in toks:
            if self.stopped:
                break
            self.ids.append(int(t))
            self._decode_next()
            if self.stop:
                window = max(0, self.sent - self._hold)
                hits = [i for i in (self.text.find(s, window) for s in self.stop) if i >= 0]
                if hits:
                    self.text = self.text[: min(hits)]
                    self.stopped = True
        end = len(self.text) if self.stopped or not self.stop else max(self.sent, len(self.text) - self._hold)
        out, self.sent = self.text[self.sent : end], max(self.sent, end)
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict:
    if chat:
        body = {"role": "assistant", "content": text} if not delta else ({"content": text} if text else {})
        return {"index": 0, ("delta" if delta else "message"): body, "logprobs": None, "finish_reason": finish}
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def response(req: GenRequest, rid: str, created: int, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": req.model, "choices": [_choice(req.chat, text, finish, delta=False)], "usage": use,
            "system_fingerprint": None}


def chunk(req: GenRequest, rid: str, created: int, text: str | None, finish: str | None,
          use: dict | None = None, first: bool = False) -> dict:
    """One SSE chunk: a text delta (and the finish reason on the last), or the usage chunk (no choices)."""
    out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
           "model": req.model, "choices": [], "system_fingerprint": None}
    if text is not None:
        c = _choice(req.chat, text, finish, delta=True)
        if req.chat and first:
            c["delta"] = {"role": "assistant", "content": text}
        out["choices"] = [c]
    if req.include_usage:
        out["usage"] = use  # null on every chunk but the last, as OpenAI does
    return out


def now() -> int:
    return int(time.time())
