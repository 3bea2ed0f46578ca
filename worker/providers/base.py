"""The provider plug-in point: one Protocol, the call and answer value objects, the answer schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from contracts import ErrorCode, PromptBlock, TokenUsage, Winner
from worker.errors import ProviderError

DEFAULT_SYSTEM_PROMPT = (
    "You are an expert essay assessor doing comparative judgement. Read Essay A and Essay B and decide "
    "which is better. Answer with the winner ('Essay A' or 'Essay B'), a justification of at most 500 "
    "characters, and your confidence from 1 (guess) to 5 (certain)."
)

#: Version of the answer schema; part of the cache key.
SCHEMA_VERSION = 1

#: JSON Schema of an answer, sent to providers that support structured output.
COMPARISON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "winner": {"type": "string", "enum": ["Essay A", "Essay B"]},
        "justification": {"type": "string", "maxLength": 500},
        "confidence": {"type": "number", "minimum": 1, "maximum": 5},
    },
    "required": ["winner", "justification", "confidence"],
    "additionalProperties": False,
}


# The per-request value objects (ComparisonCall, Answer, Job, Attempt, Cost) are treated as immutable but not
# declared frozen: a frozen dataclass sets each field through object.__setattr__, about 1.1 us more per
# object (8 fields: 1.41 against 0.29 us), several times per request on the hot path.
@dataclass(slots=True)
class ComparisonCall:
    """What one provider call is asked: everything that changes the answer, nothing that doesn't."""

    provider: str
    model: str
    system_prompt: str
    user_prompt: str
    prompt_blocks: tuple[PromptBlock, ...] = ()
    temperature: float | None = None
    max_tokens: int | None = None
    reasoning_effort: str | None = None
    output_verbosity: str | None = None


@dataclass(slots=True)  # not frozen: see ComparisonCall
class Answer:
    """A validated comparison from a provider. Valid wherever one is made (parse_answer for the real
    providers, the mock by construction, CachedAnswer.from_bytes on decode): the result event of an answer
    is serialised from it without validating it again (handle.py, make_unchecked_event)."""

    winner: Winner
    justification: str
    confidence: float
    model: str
    usage: TokenUsage = field(default_factory=TokenUsage)
    #: Input tokens written to the provider's prompt cache (Anthropic bills them at a higher rate); they
    #: are inside usage.prompt_tokens too. Internal only: the wire TokenUsage has no such field.
    cache_write_tokens: int = 0
    #: Of those, the ones written for an hour (Anthropic's ttl "1h": billed at a higher rate than 5 minutes).
    cache_write_1h_tokens: int = 0


class Provider(Protocol):
    """An LLM backend. `compare` returns a validated Answer or raises ProviderError, never a default."""

    name: str
    default_model: str

    async def compare(self, call: ComparisonCall) -> Answer: ...

    async def aclose(self) -> None: ...


def parse_answer(obj: Any, model: str, usage: TokenUsage, provider: str) -> Answer:
    """Validate a provider's structured answer. Anything off is PARSING_ERROR: no default winner, no
    clamping or rescaling of confidence."""

    def bad(reason: str) -> ProviderError:
        return ProviderError(ErrorCode.PARSING_ERROR, f"invalid answer: {reason}", provider=provider)

    if not isinstance(obj, dict):
        raise bad("not an object")
    winner, justification, confidence = obj.get("winner"), obj.get("justification"), obj.get("confidence")
    if winner not in ("Essay A", "Essay B"):
        raise bad("winner is not 'Essay A' or 'Essay B'")
    if not isinstance(justification, str) or not justification.strip() or len(justification) > 500:
        raise bad("justification missing or longer than 500 characters")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float):
        raise bad("confidence is not a number")
    try:
        value = float(confidence)
    except OverflowError:  # an int too large for a float
        raise bad("confidence outside 1-5") from None
    if not 1.0 <= value <= 5.0:  # NaN included
        raise bad("confidence outside 1-5")
    return Answer(winner, justification, value, model, usage)
