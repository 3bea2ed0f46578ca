"""Decoding requests, and the deterministic mock provider."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import pytest

from contracts import EventEnvelope, LLMComparisonRequestV1, Topics
from worker.errors import ProviderError
from worker.providers.base import ComparisonCall
from worker.providers.mock import MockProvider
from worker.settings import MockSettings
from worker.validate import Invalid, Unparseable, decode_request

DEFAULT_TOPIC = "results"


def _envelope(**data: object) -> bytes:
    env = EventEnvelope[LLMComparisonRequestV1](
        correlation_id=uuid.uuid4(), data=LLMComparisonRequestV1(user_prompt="p", **data)
    )
    return env.model_dump_json().encode()


def test_request_id_defaults_to_the_envelope_event_id() -> None:
    raw = _envelope()
    job = decode_request(raw, None, DEFAULT_TOPIC)
    assert job.request_id == json.loads(raw)["event_id"]
    assert job.callback_topic == DEFAULT_TOPIC


def test_caller_request_id_and_callback_topic_are_kept() -> None:
    job = decode_request(_envelope(request_id="abc", callback_topic="mine"), None, DEFAULT_TOPIC)
    assert (job.request_id, job.callback_topic) == ("abc", "mine")


def test_non_json_is_unparseable_with_the_header_correlation_id() -> None:
    cid = str(uuid.uuid4())
    with pytest.raises(Unparseable) as err:
        decode_request(b"{{{", [("correlation_id", cid.encode())], DEFAULT_TOPIC)
    assert err.value.reason == "not JSON"
    assert str(err.value.correlation_id) == cid


def test_json_without_envelope_is_unparseable() -> None:
    with pytest.raises(Unparseable, match="not an envelope"):
        decode_request(b'{"data": {"user_prompt": "p"}}', None, DEFAULT_TOPIC)


def test_schema_violation_is_invalid_and_names_the_fields() -> None:
    doc = json.loads(_envelope(request_id="r9", callback_topic="cb"))
    doc["data"]["cache"] = "sometimes"
    doc["data"]["user_prompt"] = "x" * 300_000
    with pytest.raises(Invalid) as err:
        decode_request(json.dumps(doc).encode(), None, DEFAULT_TOPIC)
    assert err.value.fields == ["cache", "user_prompt"]
    assert (err.value.request_id, err.value.callback_topic) == ("r9", "cb")


@pytest.mark.parametrize("topic", ["no such topic!", "results/other", ".", "..", "é", "x" * 250, "foo\n"])
def test_a_callback_topic_kafka_would_refuse_is_invalid_and_its_result_goes_to_the_default_topic(
    topic: str,
) -> None:
    doc = json.loads(_envelope(request_id="r10"))
    doc["data"]["callback_topic"] = topic
    with pytest.raises(Invalid) as err:
        decode_request(json.dumps(doc).encode(), None, DEFAULT_TOPIC)
    assert err.value.fields == ["callback_topic"]
    assert (err.value.request_id, err.value.callback_topic) == ("r10", DEFAULT_TOPIC)


@pytest.mark.parametrize("topic", ["a", "team.results_v1-eu", "...", "x" * 249])
def test_legal_callback_topic_names_are_accepted(topic: str) -> None:
    assert decode_request(_envelope(callback_topic=topic), None, DEFAULT_TOPIC).callback_topic == topic


def test_an_empty_callback_topic_still_means_the_default_topic() -> None:
    assert decode_request(_envelope(callback_topic=""), None, DEFAULT_TOPIC).callback_topic == DEFAULT_TOPIC


def test_an_invalid_request_id_too_long_to_key_a_result_is_replaced_by_the_event_id() -> None:
    event_id = uuid.uuid4()
    raw = json.dumps(
        {
            "event_id": str(event_id).upper(),
            "correlation_id": str(uuid.uuid4()),
            "data": {"request_id": "r" * 600_000, "user_prompt": "Essay A or B?"},
        }
    ).encode()
    with pytest.raises(Invalid) as caught:
        decode_request(raw, None, DEFAULT_TOPIC)
    assert caught.value.request_id == str(event_id) and caught.value.fields == ["request_id"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metadata", {"n": [1e9] * 90_000}),  # 360 KB in, 1.1 MB as the result's JSON
        ("metadata", {"text": "m" * 70_000}),
        ("user_id", "u" * 201),
        ("organization_id", "o" * 201),
    ],
    ids=["metadata that grows as JSON", "large metadata", "user_id", "organization_id"],
)
def test_request_fields_echoed_in_results_are_bounded(field: str, value: object) -> None:
    data = {"user_prompt": "Essay A or B?", field: value}
    raw = json.dumps({"event_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4()), "data": data})
    with pytest.raises(Invalid) as caught:
        decode_request(raw.encode(), None, DEFAULT_TOPIC)
    assert caught.value.fields == [field]


def test_an_integer_too_long_for_python_keeps_the_requests_correlation_id() -> None:
    cid, request_id = uuid.uuid4(), "r-long-int"
    data = f'"request_id": "{request_id}", "user_prompt": "Essay A or B?", "metadata": {{"n": {"9" * 5000}}}'
    raw = f'{{"correlation_id": "{cid}", "data": {{{data}}}}}'.encode()
    with pytest.raises(Unparseable) as caught:  # JSON pydantic refuses: dead-lettered, with a failure event
        decode_request(raw, None, DEFAULT_TOPIC)
    assert caught.value.correlation_id == cid  # before: "not JSON" and no correlation id
    assert str(caught.value) == "not an envelope: invalid json_invalid"


def test_ordinary_metadata_is_kept() -> None:
    metadata = {"essay_a_id": "e1", "essay_b_id": "e2", "round": 3, "weights": [0.5, 1e9]}
    job = decode_request(_envelope(metadata=metadata), None, DEFAULT_TOPIC)
    assert job.request.metadata == metadata


@pytest.mark.parametrize(
    "raw",
    [b"[" * 5000, b'{"correlation_id": ' + b"[" * 5000, b"{" * 3000 + b"}" * 3000],
    ids=["nested arrays", "nested in an object", "nested objects"],
)
def test_documents_nested_too_deep_for_json_are_unparseable_not_a_crash(raw: bytes) -> None:
    with pytest.raises(Unparseable):
        decode_request(raw, None, DEFAULT_TOPIC)


def test_a_provider_override_of_the_wrong_type_is_invalid_not_a_crash() -> None:
    doc = json.loads(_envelope(request_id="r11"))
    doc["data"]["llm_config_overrides"] = {"provider_override": ["openai"]}
    with pytest.raises(Invalid) as err:
        decode_request(json.dumps(doc).encode(), None, DEFAULT_TOPIC)
    assert err.value.fields == ["llm_config_overrides.provider_override"]
    assert err.value.provider is None


CALL = ComparisonCall(
    provider="mock", model="mock-comparator-1", system_prompt="s", user_prompt="Essay A vs B"
)


def _answer_in_subprocess(seed: int) -> str:
    code = (
        "import asyncio\n"
        "from worker.providers.mock import MockProvider\n"
        "from worker.settings import MockSettings\n"
        "from worker.providers.base import ComparisonCall\n"
        "call = ComparisonCall(provider='mock', model='mock-comparator-1', system_prompt='s',"
        " user_prompt='Essay A vs B')\n"
        f"a = asyncio.run(MockProvider(MockSettings(mock_seed={seed})).compare(call))\n"
        "print(a.winner, a.confidence, a.justification, a.usage.total_tokens)\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout


def test_mock_answer_is_identical_across_processes() -> None:
    a = asyncio.run(MockProvider(MockSettings(mock_seed=7)).compare(CALL))
    here = f"{a.winner} {a.confidence} {a.justification} {a.usage.total_tokens}\n"
    assert _answer_in_subprocess(7) == here
    assert 1.0 <= a.confidence <= 5.0


def test_mock_answers_vary_with_content_and_seed() -> None:
    winners = {
        asyncio.run(MockProvider(MockSettings(mock_seed=seed)).compare(CALL)).winner for seed in range(20)
    }
    assert winners == {"Essay A", "Essay B"}


def test_mock_answers_with_the_same_token_counts_share_one_usage_object() -> None:
    # Made once per token counts (validating a TokenUsage per call was a tenth of the mock's work); shared,
    # so nothing may change a usage in place.
    provider = MockProvider(MockSettings())
    first = asyncio.run(provider.compare(CALL))
    again = asyncio.run(provider.compare(CALL))
    assert again.usage is first.usage
    assert first.usage.total_tokens == first.usage.prompt_tokens + first.usage.completion_tokens


def test_mock_winner_profile_forces_the_winner() -> None:
    provider = MockProvider(MockSettings(mock_winner="Essay B"))
    for seed in range(5):
        call = ComparisonCall("mock", "m", "s", f"prompt {seed}")
        assert asyncio.run(provider.compare(call)).winner == "Essay B"


def test_mock_error_rate_one_always_fails_with_a_retryable_error() -> None:
    provider = MockProvider(MockSettings(mock_error_rate=1.0))
    with pytest.raises(ProviderError) as err:
        asyncio.run(provider.compare(CALL))
    assert err.value.retryable


def test_a_request_without_request_id_or_event_id_is_keyed_the_same_on_every_decode() -> None:
    # The envelope model makes a new event_id when none is sent: a key from it would differ on redelivery.
    raw = json.dumps({"correlation_id": str(uuid.uuid4()), "data": {"user_prompt": "p"}}).encode()
    first, again = decode_request(raw, None, DEFAULT_TOPIC), decode_request(raw, None, DEFAULT_TOPIC)
    assert first.request_id == again.request_id and first.request_id.startswith("sha256:")
    other = json.dumps({"correlation_id": str(uuid.uuid4()), "data": {"user_prompt": "p"}}).encode()
    assert decode_request(other, None, DEFAULT_TOPIC).request_id != first.request_id


def test_a_naive_event_timestamp_is_taken_as_utc() -> None:
    # As a producer's datetime.utcnow() writes it: the result's requested_at must carry its zone.
    doc = {
        "correlation_id": str(uuid.uuid4()),
        "event_timestamp": "2026-01-01T00:00:00",
        "data": {"user_prompt": "p"},
    }
    job = decode_request(json.dumps(doc).encode(), None, DEFAULT_TOPIC)
    assert job.requested_at == datetime(2026, 1, 1, tzinfo=UTC)


def test_an_output_token_cap_past_a_million_is_invalid_not_a_crash() -> None:
    # A cap of 10**309 overflowed the budget's cost estimate (float) into a poison request.
    overrides = f'{{"max_tokens_override": 1{"0" * 309}}}'
    data = f'{{"user_prompt": "p", "llm_config_overrides": {overrides}}}'
    raw = f'{{"correlation_id": "{uuid.uuid4()}", "data": {data}}}'
    with pytest.raises(Invalid) as caught:
        decode_request(raw.encode(), None, DEFAULT_TOPIC)
    assert caught.value.fields == ["llm_config_overrides.max_tokens_override"]


@pytest.mark.parametrize("event", ["comparison_request", "failure", "cost_tracking", "dlq"])
def test_a_callback_topic_of_the_services_own_is_invalid_and_answered_on_the_result_topic(event: str) -> None:
    # Its own request topic would have the service read its result as a request (a second result).
    topics = Topics()
    raw = _envelope(request_id="r-own", callback_topic=getattr(topics, event))
    with pytest.raises(Invalid) as caught:
        decode_request(raw, None, topics.comparison_result, topics.not_callbacks)
    assert caught.value.fields == ["callback_topic"]
    assert (caught.value.request_id, caught.value.callback_topic) == ("r-own", topics.comparison_result)
    raw = _envelope(callback_topic=topics.comparison_result)
    assert decode_request(raw, None, topics.comparison_result, topics.not_callbacks).callback_topic == (
        topics.comparison_result
    )


def test_an_unparseable_requests_id_that_no_json_writer_takes_is_left_out() -> None:
    # json.loads reads a lone surrogate the envelope parser refuses: the failure event naming it could not
    # be serialised, and the record went poison without it.
    raw = b'{"correlation_id": "%s", "data": {"request_id": "r-\\ud83d", "user_prompt": "x"}}' % (
        str(uuid.uuid4()).encode()
    )
    with pytest.raises(Unparseable) as caught:
        decode_request(raw, None, DEFAULT_TOPIC)
    assert caught.value.request_id == ""


def test_an_invalid_requests_event_time_is_kept_for_its_result() -> None:
    doc = {
        "correlation_id": str(uuid.uuid4()),
        "event_timestamp": "2026-01-01T10:00:00",  # naive: taken as UTC, as for a valid request
        "data": {"user_prompt": ""},
    }
    with pytest.raises(Invalid) as caught:
        decode_request(json.dumps(doc).encode(), None, DEFAULT_TOPIC)
    assert caught.value.requested_at == datetime(2026, 1, 1, 10, tzinfo=UTC)
    doc["event_timestamp"] = "not a time"
    with pytest.raises(Unparseable):  # an envelope field: not an envelope
        decode_request(json.dumps(doc).encode(), None, DEFAULT_TOPIC)
