"""OpenAI's wire format for the agent and the router: request parsing, bodies, stream chunks, errors.

Free of torch and of aiohttp handlers, so that the router can use it; the routes are openai_api.py.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticError

from ..engine.requests import FinalEvent, FinishReason, SamplingParams, TokenEvent
from .schemas import MIN_TEMPERATURE, document_request

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_SEED = 2**64 - 1
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions
ENCODE_IN_THREAD_CHARS = 4096


class OpenAIError(Exception):
    """An answer other than 200, with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type, self.headers = status, message, param, code, type, headers

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def sse(payload: dict | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


# -- requests ----------------------------------------------------------------------------------
# name -> (values that mean "off", what to tell the client)
_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "n": ((None, 1), "`n` > 1 is not supported by this server; send several requests with different seeds"),
    "echo": ((None, False), "`echo` is not supported by this server; prepend the prompt yourself"),
    "logprobs": ((None, False), "`logprobs` is not supported by this server; leave it null"),
    "top_logprobs": ((None, 0), "`top_logprobs` is not supported by this server; leave it null"),
    "best_of": ((None, 1), "`best_of` > 1 is not supported by this server"),
    "suffix": ((None, ""), "`suffix` (insertion) is not supported by this server"),
    "presence_penalty": ((None, 0, 0.0), "`presence_penalty` is not supported by this server; leave it at 0"),
    "frequency_penalty": ((None, 0, 0.0), "`frequency_penalty` is not supported by this server; leave it at 0"),
    "logit_bias": ((None, {}), "`logit_bias` is not supported by this server"),
    "tools": ((None, []), "tools (function calling) are not supported by this server; describe the tools in the messages instead"),
    "tool_choice": ((None, "none"), "`tool_choice` is not supported: this server does no function calling"),
    "functions": ((None, []), "functions (function calling) are not supported by this server"),
    "function_call": ((None, "none"), "`function_call` is not supported: this server does no function calling"),
    "response_format": ((None, {"type": "text"}), 'only `response_format` {"type": "text"} is supported by this server'),
}


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: dict | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None  # informational; ignored


class CompletionRequest(_Common):
    """The body of POST /v1/completions (OpenAI's legacy completions)."""

    model_config = ConfigDict(
        json_schema_extra=document_request(
            _UNSUPPORTED,
            {"model": "tiny", "prompt": "The Python language reference describes", "max_tokens": 8, "temperature": 0},
            {"prompt": ["def fibonacci(n):"], "max_tokens": 4, "seed": 7, "stream": True, "stream_options": {"include_usage": True}},
        )
    )

    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatCompletionRequest(_Common):
    """The body of POST /v1/chat/completions; `messages` hold text only (roles system, developer, user, assistant)."""

    model_config = ConfigDict(
        json_schema_extra=document_request(
            _UNSUPPORTED,
            {"messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8, "temperature": 0},
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}], "max_completion_tokens": 4, "stream": True},
        )
    )

    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict | None = None


_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class OpenAIRequest:
    """A validated /v1/completions or /v1/chat/completions request."""

    chat: bool
    model: str | None
    prompt: str  # /v1/completions
    messages: tuple[dict, ...]  # /v1/chat/completions: {"role", "content"} with text content
    max_tokens: int | None
    temperature: float
    top_p: float | None
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_openai_request(body: Any, *, chat: bool) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise OpenAIError(400, 'the body must be a JSON object like {"model": "...", ' + ('"messages": [...]}' if chat else '"prompt": "..."}'))
    try:
        req = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
    except PydanticError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        what = "is required" if err["type"] == "missing" else f"is invalid: {err['msg']} (got {err.get('input')!r:.60})"
        raise OpenAIError(400, f"`{param}` {what}", param=param) from None
    for key, value in (req.model_extra or {}).items():
        if value is not None:
            raise OpenAIError(400, f"Unrecognized request argument supplied: {key}", param=key)
    for name, (off, message) in _UNSUPPORTED.items():
        value = getattr(req, name, None)
        if not any(value == o and type(value) is type(o) for o in off):  # typed: logprobs=0 is not "off"
            raise OpenAIError(400, message, param=name)
    max_tokens = req.max_completion_tokens if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise OpenAIError(400, f"`max_tokens` must be at least 1. Given: {max_tokens}", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise OpenAIError(400, f"`temperature` must be between 0 and 2. Given: {temperature}", param="temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise OpenAIError(400, f"`top_p` must be > 0 and <= 1. Given: {req.top_p}", param="top_p")
    if req.seed is not None and not 0 <= req.seed <= MAX_SEED:
        raise OpenAIError(400, f"`seed` must be between 0 and 2**64 - 1. Given: {req.seed}", param="seed")
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise OpenAIError(400, f"`stop` takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop")
    options = req.stream_options or {}
    if options and (not req.stream or set(options) - {"include_usage"}):
        raise OpenAIError(400, "`stream_options` is allowed only with stream=true and takes only `include_usage`", param="stream_options")
    prompt, messages = "", ()  # type: tuple[str, tuple[dict, ...]]
    if isinstance(req, ChatCompletionRequest):
        messages = _chat_messages(req.messages)
    elif isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise OpenAIError(400, "`prompt` must be a string or a list of exactly one string (batched prompts are not supported)", param="prompt")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    return OpenAIRequest(
        chat, req.model, prompt, messages, max_tokens, temperature, req.top_p, stop, req.seed, bool(req.stream), bool(options.get("include_usage"))
    )


def _chat_messages(raw: list[dict]) -> tuple[dict, ...]:
    if not raw:
        raise OpenAIError(400, "`messages` must hold at least one message", param="messages")
    out = []
    for i, message in enumerate(raw):
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise OpenAIError(
                400, f"`messages[{i}].role` must be one of {', '.join(_ROLES)} (tool messages are not supported). Given: {role!r}", param=f"messages[{i}].role"
            )
        if isinstance(content, list):  # content parts: only text
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise OpenAIError(400, f"`messages[{i}].content` may hold only text parts", param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise OpenAIError(400, f"`messages[{i}].content` must be a string", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
    return tuple(out)


def sampling_params(req: OpenAIRequest, prompt_tokens: int, max_total_tokens: int) -> SamplingParams:
    """The engine's parameters; an unset max_tokens is 16 (completions) or the room left (chat)."""
    room = max_total_tokens - prompt_tokens
    if room < 1:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {max_total_tokens} tokens; the prompt alone has {prompt_tokens}. Shorten it.",
            param="messages" if req.chat else "prompt",
            code="context_length_exceeded",
        )
    max_new = req.max_tokens
    if max_new is None:
        max_new = room if req.chat else min(DEFAULT_COMPLETION_TOKENS, room)
    elif max_new > room:
        raise OpenAIError(
            400,
            f"This model's maximum context length is {max_total_tokens} tokens. However, you requested {prompt_tokens + max_new} tokens "
            f"({prompt_tokens} in the prompt, {max_new} in the completion). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    sample = req.temperature >= MIN_TEMPERATURE  # below it: greedy, as at 0 (schemas.MIN_TEMPERATURE says why)
    return SamplingParams(
        max_new_tokens=max_new,
        do_sample=sample,
        temperature=req.temperature if sample and req.temperature != 1.0 else None,
        top_p=req.top_p if sample and req.top_p is not None and req.top_p < 1.0 else None,
        seed=req.seed,
        stop=req.stop,
    )


def resolve_model(requested: str | None, base_id: str) -> None:
    """Accept the base id and any `<base>@<cluster version>.<revision>` (served by the current version); 404 otherwise."""
    if requested is None or requested == base_id or re.fullmatch(re.escape(base_id) + r"@(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)", requested):
        return
    raise OpenAIError(
        404, f"The model `{requested}` does not exist on this server; GET /v1/models lists the models (e.g. `{base_id}`)", param="model", code="model_not_found"
    )


# -- responses ---------------------------------------------------------------------------------
def finish_reason(reason: FinishReason) -> str:
    return "length" if reason is FinishReason.LENGTH else "stop"


def fingerprint(version: str | None) -> str | None:
    return None if version is None else f"collm-adapter-{version}"


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """The text before the first stop sequence (OpenAI leaves the match out; the engine keeps it, as TGI does)."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(hits)] if hits else text


def usage(final: FinalEvent) -> dict:
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": final.generated_tokens, "total_tokens": final.prompt_tokens + final.generated_tokens}


def models_body(base_id: str, versions: list[tuple[str, float]], created: int) -> dict:
    data = [{"id": base_id, "object": "model", "created": created, "owned_by": "collm"}]
    data += [{"id": f"{base_id}@{label}", "object": "model", "created": int(at), "owned_by": "collm", "parent": base_id} for label, at in versions]
    return {"object": "list", "data": data}


class ResponseBuilder:
    """The bodies of one answer: the non-streaming object, or stream chunks from engine events."""

    def __init__(self, req: OpenAIRequest, model: str) -> None:
        self.req, self.model = req, model
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self._sent, self._pending, self._stopped = "", "", False

    def _envelope(self, obj: str, choice: dict, version: str | None) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": fingerprint(version), "choices": [choice]}

    def body(self, final: FinalEvent) -> dict:
        text = cut_at_stop(final.generated_text, self.req.stop) if final.finish_reason is FinishReason.STOP_SEQUENCE else final.generated_text
        reason = finish_reason(final.finish_reason)
        if self.req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
            out = self._envelope("chat.completion", choice, final.adapter_version)
        else:
            out = self._envelope("text_completion", {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}, final.adapter_version)
        out["usage"] = usage(final)
        return out

    # -- streaming
    def _chunk(self, text: str | None, reason: str | None = None, version: str | None = None, *, role: bool = False) -> dict:
        if self.req.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            return self._envelope("chat.completion.chunk", {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}, version)
        return self._envelope("text_completion", {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}, version)

    def start(self) -> list[dict]:
        return [self._chunk("", role=True)] if self.req.chat else []

    def token(self, event: TokenEvent) -> list[dict]:
        text = self._safe_text(event.token.text)
        return [self._chunk(text)] if text else []

    def final(self, final: FinalEvent) -> list[dict]:
        if final.finish_reason is FinishReason.CANCELLED:
            return []
        if final.finish_reason is FinishReason.ERROR:
            return [error_body(final.error or "generation failed", type="server_error", code="generation_failed")]
        full = final.generated_text
        if final.finish_reason is FinishReason.STOP_SEQUENCE:
            full = cut_at_stop(full, self.req.stop)
        # The final text may hold a tail the detokenizer released only at the end.
        rest = full[len(self._sent) :] if full.startswith(self._sent) else ""
        chunks = [self._chunk(rest or (None if self.req.chat else ""), finish_reason(final.finish_reason), final.adapter_version)]
        if self.req.include_usage:
            chunks.append(
                {
                    **self._envelope("chat.completion.chunk" if self.req.chat else "text_completion", {}, final.adapter_version),
                    "choices": [],
                    "usage": usage(final),
                }
            )
        return chunks

    def _safe_text(self, text: str) -> str:
        """The part of the new text that cannot belong to a stop sequence; the rest waits for the next token."""
        if self._stopped:
            return ""
        pending = self._pending + text
        stop = self.req.stop
        hits = [i for i in (pending.find(s) for s in stop) if i >= 0]
        if hits:  # a stop sequence is complete: the engine ends the request with this token
            keep, self._stopped = min(hits), True
        else:  # hold back the longest tail that may start a stop sequence
            keep = len(pending)
            longest = max((len(s) for s in stop), default=0)
            for i in range(max(0, len(pending) - longest + 1), len(pending)):
                if any(s.startswith(pending[i:]) for s in stop):
                    keep = i
                    break
        out, self._pending = pending[:keep], pending[keep:]
        self._sent += out
        return out


# -- response models ---------------------------------------------------------------------------
# As in schemas.py: the bodies are built as dicts above; these models describe them for the OpenAPI
# document (serving/openapi.py), strictly, so that the fuzzing test catches any drift.
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


FinishReasonName = Literal["stop", "length"]  # finish_reason()


class Usage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Body):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReasonName


class Completion(_Body):
    """The answer of POST /v1/completions; `system_fingerprint` is "collm-adapter-<version>"."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: Usage


class CompletionChunkChoice(_Body):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReasonName | None


class CompletionChunk(_Body):
    """A stream event of POST /v1/completions; the last one (with include_usage) has no choices and the usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ChatMessage(_Body):
    role: Literal["assistant"]
    content: str


class ChatChoice(_Body):
    index: int
    message: ChatMessage
    logprobs: None
    finish_reason: FinishReasonName


class ChatCompletion(_Body):
    """The answer of POST /v1/chat/completions."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Body):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Body):
    index: int
    delta: ChatDelta
    logprobs: None
    finish_reason: FinishReasonName | None


class ChatCompletionChunk(_Body):
    """A stream event of POST /v1/chat/completions; the first carries the role, the last (with include_usage) the usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Body):
    id: str  # the base model, or "<base>@<adapter version>"
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None


class ModelList(_Body):
    object: Literal["list"]
    data: list[ModelCard]


class OpenAIErrorDetail(_Body):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(_Body):
    """OpenAI's error body (also a stream event, before `[DONE]`, when a generation fails after its first token)."""

    error: OpenAIErrorDetail
