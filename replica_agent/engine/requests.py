"""What a generation request asks for and what the engine streams back (no torch here)."""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    """TGI's finish reasons, plus the two ways a request ends without finishing."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"  # the client went away; never reported to a client
    ERROR = "error"  # the engine failed this request; the message says why


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request, already validated by the serving layer."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @property
    def sampling(self) -> bool:
        """TGI samples when asked to or when any warper is set (greedy otherwise)."""
        warpers = (
            (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k > 0)
            or (self.top_p is not None and self.top_p < 1.0)
        )
        return self.do_sample or warpers


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    logprob: float | None
    special: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `text` is the new text it completes (may be empty mid UTF-8 sequence).
    The request's last token carries the reason it ended (the FinalEvent follows it at once)."""

    token: TokenInfo
    index: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class FinalEvent:
    """The end of a request, always the last event of its stream."""

    finish_reason: FinishReason
    generated_text: str
    generated_tokens: int
    seed: int | None
    adapter_version: str | None  # the label of the version that served it, "<cluster version>.<local revision>"
    prompt_tokens: int
    prefill: tuple[TokenInfo, ...] = ()
    tokens: tuple[TokenInfo, ...] = ()
    ttft_s: float | None = None
    tpot_s: float | None = None
    queue_s: float | None = None
    error: str | None = None
    adapter_sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.finish_reason not in (FinishReason.CANCELLED, FinishReason.ERROR)

    def meets_slo(self, ttft_ms: float, tpot_ms: float) -> bool:
        """docs/design.md's SLO: TTFT <= ttftMilliseconds and mean TPOT <= tpotMilliseconds."""
        if self.ttft_s is None or self.ttft_s * 1000 > ttft_ms:
            return False
        return self.tpot_s is None or self.tpot_s * 1000 <= tpot_ms


@dataclass
class GenerationRequest:
    """A request as the engine holds it; `prompt_ids` are token ids, already length-checked."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    decoder_input_details: bool = False
    arrival: float = 0.0
    meta: dict = field(default_factory=dict)


def length_error(prompt_tokens: int, max_new_tokens: int, max_total_tokens: int) -> str | None:
    """Why a request cannot fit in `max_total_tokens` (TGI's words), or None when it fits."""
    if prompt_tokens == 0:
        return "`inputs` must not be empty"
    if prompt_tokens + max_new_tokens > max_total_tokens:
        return f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. Given: {prompt_tokens} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
    return None


def finish_reason(
    params: SamplingParams, token: int, delta: str, text: str, *, eos_token_ids: Collection[int], generated: int, context: int, max_total_tokens: int
) -> FinishReason | None:
    """Why a request ends with `token` (None: it goes on). `delta` is the text the token completes,
    `text` all generated text with it; `generated` tokens came before it and `context` positions
    (prompt included) are in the KV cache. The engine and the edge (collm-edge) both stop by this."""
    if token in eos_token_ids and not params.ignore_eos:
        return FinishReason.EOS_TOKEN
    if params.stop and delta and any(s in text[-(len(s) + len(delta)) :] for s in params.stop):
        return FinishReason.STOP_SEQUENCE
    if generated + 1 >= params.max_new_tokens or context + 1 >= max_total_tokens:
        return FinishReason.LENGTH
    return None
