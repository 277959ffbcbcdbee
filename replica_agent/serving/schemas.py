"""TGI's wire format, as pure functions: request validation and the JSON bodies sent back.

Requests: `parse_generate_request` turns a decoded JSON body into a `GenerateRequest` or raises
`InvalidRequest` with a message in TGI's words ("Input validation error: `temperature` must be
strictly positive"). Types are strict (`"max_new_tokens": "20"` is an error, as with TGI's serde);
unknown keys are ignored when null and rejected otherwise, so a parameter this server cannot honour
never passes silently. `best_of`, `typical_p`, `watermark`, `top_n_tokens`, `grammar`,
`frequency_penalty` and `adapter_id` are accepted only at their "off" values.

Responses: `generate_body` (POST /generate), `StreamFramer` (POST /generate_stream events) and
`error_body`. The shapes are TGI's, checked against `text_generation` 0.7.0's pydantic models,
plus `adapter_version` ("<cluster version>.<local revision>", e.g. "7.3") and `adapter_sha256`,
which those models ignore.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticError

from ..engine.requests import FinalEvent, FinishReason, SamplingParams, TokenEvent, TokenInfo

DEFAULT_MAX_NEW_TOKENS = 20  # TGI's client default; capped by the room left in max_total_tokens
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
MAX_SEED = 2**64 - 1  # TGI's seed is a u64
# Sampling below this temperature is greedy decoding in all but name, and logits divided by a
# smaller one overflow float32 (1e-300 made every probability NaN): such requests decode greedily.
MIN_TEMPERATURE = 1e-5
# The repetition penalty divides or multiplies logits; far from 1 they overflow to inf and the
# logprobs turn NaN, which no JSON parser reads (1e-300 did). Clients use 1 to 2.
MAX_REPETITION_PENALTY = 1e4

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request the client must fix; the message says what (HTTP 422, error_type validation)."""

    def __init__(self, message: str) -> None:
        super().__init__(message if message.startswith("Input validation error") else f"Input validation error: {message}")


# name -> (values that mean "off", what to tell the client)
_UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "best_of": ((None, 1), "`best_of` > 1 is not supported by this server; send several requests with different seeds"),
    "typical_p": ((None, 1.0), "`typical_p` is not supported by this server; use `top_p` or `top_k`"),
    "watermark": ((False,), "`watermark` is not supported by this server; leave it false"),
    "top_n_tokens": ((None, 0), "`top_n_tokens` is not supported by this server; leave it unset"),
    "frequency_penalty": ((None, 0.0), "`frequency_penalty` is not supported by this server; use `repetition_penalty`"),
    "grammar": ((None,), "`grammar` is not supported by this server; leave it unset"),
    "adapter_id": ((None,), "`adapter_id` is not supported: this replica serves its current adapter version (see GET /info)"),
}


def document_request(unsupported: dict[str, tuple[tuple, str]], *examples: dict) -> Callable[[dict[str, Any]], None]:
    """A request model's `json_schema_extra`: its JSON schema (the OpenAPI document's, serving/openapi.py)
    says what the parser enforces beyond the types, from the parser's own table: unknown keys are
    accepted only when null (`_reject_unknown`), unsupported parameters only at their "off" values.
    `examples` are shown on GET /docs and sent first by the fuzzing test."""

    def extra(schema: dict[str, Any]) -> None:
        schema["additionalProperties"] = {"type": "null"}
        if examples:
            schema["examples"] = list(examples)
        for name, (off, message) in unsupported.items():
            if name in schema["properties"]:
                values = [v for i, v in enumerate(off) if v not in off[:i]]  # 0 and 0.0 are one JSON value
                schema["properties"][name] = {"allOf": [schema["properties"][name], {"enum": values}], "description": message}

    return extra


class GenerateParameters(BaseModel):
    """TGI's generation parameters; the parser rejects what the types allow but TGI would not (422)."""

    model_config = ConfigDict(strict=True, extra="allow", json_schema_extra=document_request(_UNSUPPORTED))

    do_sample: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    truncate: int | None = None
    # Accepted only at their defaults (see _UNSUPPORTED).
    best_of: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    top_n_tokens: int | None = None
    frequency_penalty: float | None = None
    grammar: Any = None
    adapter_id: str | None = None


class GenerateRequest(BaseModel):
    """The body of POST /generate, /generate_stream and / (where `stream` picks the answer's form)."""

    model_config = ConfigDict(
        strict=True,
        extra="allow",
        json_schema_extra=document_request(
            {},
            {"inputs": "The Python language reference describes", "parameters": {"max_new_tokens": 8, "details": True}},
            {"inputs": "def fibonacci(n):", "parameters": {"max_new_tokens": 4, "do_sample": True, "seed": 7, "details": True}, "stream": True},
        ),
    )

    inputs: str
    parameters: GenerateParameters | None = None
    stream: bool = False

    @property
    def params(self) -> GenerateParameters:
        return self.parameters or GenerateParameters()


def parse_generate_request(body: Any, *, stream: bool | None = None) -> GenerateRequest:
    """Validate a decoded JSON body. `stream` forces streaming on or off (None: the body's `stream` decides)."""
    if not isinstance(body, dict):
        raise InvalidRequest('the body must be a JSON object like {"inputs": "...", "parameters": {"max_new_tokens": 20}}')
    try:
        req = GenerateRequest.model_validate(body)
    except PydanticError as exc:
        raise InvalidRequest(_explain(exc)) from None
    if stream is not None:
        req.stream = stream
    _reject_unknown(req.model_extra, "")
    p = req.params
    _reject_unknown(p.model_extra, "parameters.")
    if not req.inputs:
        raise InvalidRequest("`inputs` cannot be empty")
    for name, (off, message) in _UNSUPPORTED.items():
        if getattr(p, name) not in off:
            raise InvalidRequest(message)
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise InvalidRequest(f"`max_new_tokens` must be strictly positive. Given: {p.max_new_tokens}")
    for name in ("temperature", "repetition_penalty", "top_k", "truncate"):
        value = getattr(p, name)
        if value is not None and not 0 < value < math.inf:  # no float() of an int: 10**400 would overflow
            raise InvalidRequest(f"`{name}` must be strictly positive. Given: {value}")
    if p.repetition_penalty is not None and not 1 / MAX_REPETITION_PENALTY <= p.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequest(
            f"`repetition_penalty` must be between {1 / MAX_REPETITION_PENALTY:g} and {MAX_REPETITION_PENALTY:g}. Given: {p.repetition_penalty}"
        )
    if p.top_p is not None and not (0.0 < p.top_p <= 1.0):
        raise InvalidRequest(f"`top_p` must be > 0.0 and <= 1.0. Given: {p.top_p}")
    if p.seed is not None and not (0 <= p.seed <= MAX_SEED):
        raise InvalidRequest(f"`seed` must be between 0 and 2**64 - 1. Given: {p.seed}")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}")
    if any(not s for s in p.stop):
        raise InvalidRequest("`stop` sequences must not be empty strings")
    if req.stream and p.decoder_input_details:
        raise InvalidRequest("`decoder_input_details` == true is not supported when streaming tokens")
    return req


def _reject_unknown(extra: dict | None, prefix: str) -> None:
    for key, value in (extra or {}).items():
        if value is not None:
            raise InvalidRequest(f"unknown field `{prefix}{key}`; remove it (see TGI's /generate parameters)")


def _explain(exc: PydanticError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not str(p).endswith("]") and p not in ("none", "int", "float", "str")]
        where = ".".join(loc) or "body"
        if err["type"] == "missing":
            parts.append(f"`{where}` is required")
        else:
            parts.append(f"`{where}`: {err['msg']} (got {err.get('input')!r:.60})")
    return "; ".join(dict.fromkeys(parts))


def prompt_ids(ids: list[int], truncate: int | None, bos_token_id: int | None) -> list[int]:
    """Apply `truncate`: keep the last N tokens of the text; a leading BOS is kept and not counted."""
    if truncate is None:
        return ids
    has_bos = bool(ids) and bos_token_id is not None and ids[0] == bos_token_id
    body = ids[1:] if has_bos else ids
    kept = body[-truncate:]
    return [ids[0], *kept] if has_bos else kept


def sampling_params(p: GenerateParameters, prompt_tokens: int, max_total_tokens: int) -> SamplingParams:
    """The engine's parameters; an unset `max_new_tokens` is TGI's 20, shrunk to the room left, and
    a temperature below MIN_TEMPERATURE decodes greedily (the limit of sampling as it goes to 0)."""
    max_new = p.max_new_tokens
    if max_new is None:
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, max_total_tokens - prompt_tokens))
    greedy = p.temperature is not None and p.temperature < MIN_TEMPERATURE
    return SamplingParams(
        max_new_tokens=max_new,
        do_sample=p.do_sample and not greedy,
        temperature=None if greedy else p.temperature,
        top_k=None if greedy else p.top_k,
        top_p=None if greedy else p.top_p,
        repetition_penalty=p.repetition_penalty,
        seed=p.seed,
        stop=tuple(p.stop),
    )


# -- response bodies ---------------------------------------------------------------------------
def error_body(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def token_json(token: TokenInfo) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def prefill_json(token: TokenInfo) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob}


def generate_body(final: FinalEvent, *, details: bool, prefix: str = "") -> dict:
    """POST /generate's object (the `/` route wraps it in a list, as TGI does)."""
    body: dict = {"generated_text": prefix + final.generated_text}
    if details:
        body["details"] = {
            "finish_reason": final.finish_reason.value,
            "generated_tokens": final.generated_tokens,
            "seed": final.seed,
            "prefill": [prefill_json(t) for t in final.prefill],
            "tokens": [token_json(t) for t in final.tokens],
            "top_tokens": None,
            "best_of_sequences": None,
            "adapter_version": final.adapter_version,
            "adapter_sha256": final.adapter_sha256,
        }
    return body


class StreamFramer:
    """Engine events -> TGI stream events for one request.

    TGI's last token event is also the final one (it carries `generated_text` and `details`), but the
    engine reports the end just after the last token. The engine marks that token (its
    `finish_reason`), so it alone is held back until the FinalEvent; every other token goes out at
    once, and streaming adds no latency.
    """

    def __init__(self, *, details: bool, prefix: str = "") -> None:
        self.details, self.prefix = details, prefix
        self._held: TokenEvent | None = None
        self._last: TokenEvent | None = None
        self._sent_text = ""

    def token(self, event: TokenEvent) -> list[dict]:
        out = self._release()
        if event.finish_reason is not None:
            self._held = event
        else:
            out.append(self._frame(event.index, token_json(event.token)))
            self._sent_text += event.token.text
        self._last = event
        return out

    def final(self, final: FinalEvent) -> list[dict]:
        if final.finish_reason is FinishReason.CANCELLED:
            return []
        if final.finish_reason is FinishReason.ERROR:
            return self._release() + [error_body(final.error or "generation failed", "generation")]
        last = self._held or self._last
        if last is None:  # an ok final always follows at least one token
            raise RuntimeError("the engine finished a request without a token")
        token = token_json(last.token)
        if self._held is None:
            # Unreachable while the engine marks its last token; stay well-formed anyway.
            log.warning("stream of %d tokens ended on a token that was not held back; sending an empty final token", final.generated_tokens)
            token = {**token, "text": "", "special": True}
        # The final text may hold a tail the detokenizer released only at the end: give it to this token.
        sent = self._sent_text
        token["text"] = final.generated_text[len(sent) :] if final.generated_text.startswith(sent) else token["text"]
        details = None
        if self.details:
            details = {
                "finish_reason": final.finish_reason.value,
                "generated_tokens": final.generated_tokens,
                "seed": final.seed,
                "input_length": final.prompt_tokens,
                "adapter_version": final.adapter_version,
                "adapter_sha256": final.adapter_sha256,
            }
        frame = self._frame(last.index, token, generated_text=self.prefix + final.generated_text, details=details)
        frame["adapter_version"] = final.adapter_version
        frame["adapter_sha256"] = final.adapter_sha256
        self._held = None
        return [frame]

    def _release(self) -> list[dict]:
        if self._held is None:
            return []
        held, self._held = self._held, None
        self._sent_text += held.token.text
        return [self._frame(held.index, token_json(held.token))]

    @staticmethod
    def _frame(index: int, token: dict, *, generated_text: str | None = None, details: dict | None = None) -> dict:
        return {"index": index, "token": token, "top_tokens": None, "generated_text": generated_text, "details": details}


# -- response models ---------------------------------------------------------------------------
# The bodies above are built as dicts (a stream builds one per token: no model on that path). These
# models describe them for the OpenAPI document (serving/openapi.py); extra="forbid" makes the
# document strict, so the fuzzing test's conformance check (tests/serving/test_openapi_fuzz.py)
# fails on any key or type the builders add without saying so here.
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Token(_Body):
    id: int
    text: str
    logprob: float | None
    special: bool


class PrefillToken(_Body):
    id: int
    text: str
    logprob: float | None


class Details(_Body):
    """Present with `parameters.details`; `prefill` is filled with `decoder_input_details`."""

    finish_reason: FinishReason  # never cancelled or error in an answer
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: None
    best_of_sequences: None
    adapter_version: str | None
    adapter_sha256: str | None


class GenerateResponse(_Body):
    generated_text: str
    details: Details | None = None


class StreamDetails(_Body):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int
    adapter_version: str | None
    adapter_sha256: str | None


class StreamResponse(_Body):
    """One token event; the last one also carries `generated_text`, `details` (with `parameters.details`) and the adapter."""

    index: int
    token: Token
    top_tokens: None
    generated_text: str | None
    details: StreamDetails | None
    adapter_version: str | None = None
    adapter_sha256: str | None = None


class ErrorResponse(_Body):
    """TGI's error body (also a stream event when a generation fails after its first token)."""

    error: str
    error_type: str


class AdapterSummary(_Body):
    """An adapter version (AdapterVersion.summary())."""

    version: str  # "<cluster version>.<local revision>"
    cluster_version: int
    revision: int
    sha256: str
    step: int
    eval_loss: float | None


class Info(_Body):
    """TGI's Info, plus the replica and the adapter it serves now."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_input_length: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int | None
    max_client_batch_size: int
    validation_workers: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None
    replica_id: str
    adapter: AdapterSummary | None
    training: bool


class Health(_Body):
    status: Literal["ok"]
    adapter_version: str | None


class FeedbackRequest(BaseModel):
    """One served interaction to add to the local training data (append_feedback checks it: both non-empty strings)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "Say hello", "completion": "Hello!"}]})

    prompt: str
    completion: str


class FeedbackResponse(_Body):
    appended: Literal[True]
    path: str
