"""What a generation request asks for and what the engine streams back (no torch here)."""

from __future__ import annotations

import enum
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
