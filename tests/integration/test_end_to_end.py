"""Issue 2: a request through the real broker and Redis yields one result and a cost event; bad input is
handled and the consumer keeps going."""

from __future__ import annotations

import asyncio
import base64
import json
from datetime import datetime

from tests.conftest import make_settings, request_envelope, running_worker


async def test_request_yields_one_result_and_one_cost_event(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    env = request_envelope(metadata={"essay_pair": "p1"}, user_id="u1", organization_id="org1")
    async with running_worker(settings):
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        [cost] = await kafka.wait_for(kafka.topics.cost_tracking, 1)
    data = result["data"]
    assert result["event_type"] == "LLMComparisonResultV1"
    assert result["correlation_id"] == str(env.correlation_id) == data["correlation_id"]
    assert data["request_id"] == env.data.request_id
    assert data["winner"] in ("Essay A", "Essay B")
    assert 1.0 <= data["confidence"] <= 5.0
    assert data["request_metadata"]["essay_pair"] == "p1"
    assert data["request_metadata"]["resolved_provider"] == "mock"
    assert data["token_usage"]["total_tokens"] > 0
    assert cost["data"]["request_id"] == env.data.request_id
    assert cost["data"]["service_name"] == "llm_provider_service"
    raw = kafka.raw[kafka.topics.comparison_result][0]
    assert raw.key == env.data.request_id.encode()
    assert dict(raw.headers)["correlation_id"] == str(env.correlation_id).encode()
    assert len(kafka.of(kafka.topics.comparison_result)) == 1


async def test_result_goes_to_the_callback_topic(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    elsewhere = make_settings(f"{prefix}-cb")  # another service's topics, read by a reader of their own
    await topics_for(elsewhere)
    other = await kafka_for(elsewhere)
    callback = other.topics.comparison_result
    env = request_envelope(callback_topic=callback)
    async with running_worker(settings):
        await kafka.send(env)
        found = await other.wait_for(callback, 1, where=lambda e: e["event_type"] == "LLMComparisonResultV1")
        await kafka.caught_up()
    assert found[0]["data"]["request_id"] == env.data.request_id
    assert kafka.of(kafka.topics.comparison_result) == []


async def test_unparseable_message_goes_to_dlq_and_the_next_request_completes(
    prefix, topics_for, kafka_for
) -> None:
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    cid = "7b0c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d"
    async with running_worker(settings):
        await kafka.send_raw(b"\x00not json at all", correlation_id=cid)
        await kafka.send_raw(b'{"hello": "world"}')
        env = request_envelope()
        await kafka.send(env)
        [result] = await kafka.wait_for(kafka.topics.comparison_result, 1)
        dlq = await kafka.wait_for(kafka.topics.dlq, 2)
        failures = await kafka.wait_for(kafka.topics.failure, 1)
    assert result["data"]["request_id"] == env.data.request_id
    assert base64.b64decode(dlq[0]["raw_base64"]) == b"\x00not json at all"
    assert dlq[0]["error"] == "not JSON"
    assert (dlq[0]["raw_bytes"], dlq[0]["raw_truncated"]) == (len(b"\x00not json at all"), False)
    assert ["correlation_id", base64.b64encode(cid.encode()).decode()] in dlq[0]["headers"]
    assert dlq[1]["error"].startswith("not an envelope")
    assert failures[0]["correlation_id"] == cid
    assert failures[0]["data"]["error_detail"]["error_code"] == "VALIDATION_ERROR"


async def test_an_unparseable_request_keeps_the_ids_its_body_names_on_its_dlq_record_and_failure(
    prefix, topics_for, kafka_for
) -> None:
    # No headers; the envelope is broken (its event_id), but its correlation id and request id are readable.
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    cid = "0f1e2d3c-4b5a-4978-8a69-5b4c3d2e1f00"
    body = {"event_id": "not-a-uuid", "correlation_id": cid, "data": {"user_prompt": "p", "request_id": "r1"}}
    async with running_worker(settings):
        await kafka.send_raw(json.dumps(body).encode())
        [dlq] = await kafka.wait_for(kafka.topics.dlq, 1)
        [failure] = await kafka.wait_for(kafka.topics.failure, 1)
    assert dlq["error"] == "not an envelope: invalid event_id"
    assert dict(kafka.raw[kafka.topics.dlq][0].headers)["correlation_id"] == cid.encode()
    assert failure["correlation_id"] == cid and failure["data"]["request_id"] == "r1"
    assert failure["data"]["error_detail"]["operation"] == "decode"
    assert "operation" not in failure["data"]["error_detail"]["details"]


async def test_schema_violation_yields_validation_error_naming_fields(prefix, topics_for, kafka_for) -> None:
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    good = request_envelope()
    bad = json.loads(good.model_dump_json())
    bad["data"]["request_id"] = "bad-1"
    bad["data"]["user_prompt"] = ""
    bad["data"]["llm_config_overrides"] = {"temperature_override": 7, "provider_override": "anthropic"}
    async with running_worker(settings):
        await kafka.send_raw(json.dumps(bad).encode(), key="bad-1")
        await kafka.send(request_envelope())
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
    failed = next(r["data"] for r in results if r["data"]["request_id"] == "bad-1")
    detail = failed["error_detail"]
    assert detail["error_code"] == "VALIDATION_ERROR"
    assert detail["details"]["retryable"] is False
    assert detail["operation"] == "validate" and "operation" not in detail["details"]
    assert datetime.fromisoformat(failed["requested_at"]) == good.event_timestamp  # not the failure's time
    assert set(detail["details"]["fields"]) == {"user_prompt", "llm_config_overrides.temperature_override"}
    assert failed["winner"] is None
    assert failed["provider"] == "anthropic"  # the upstream model only accepts real provider names
    assert sum(1 for r in results if r["data"]["winner"]) == 1


async def test_logs_are_json_and_never_contain_prompt_text(prefix, topics_for, kafka_for, capfd) -> None:
    import logging

    from worker.logs import setup_logging

    settings = make_settings(prefix, partitions=1, poison_max_attempts=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    secret = "TOP-SECRET-ESSAY-TEXT-4711"
    setup_logging("DEBUG")
    try:
        async with running_worker(settings) as runtime:
            real_run = runtime.orchestrator.run

            async def failing_run(call, *args, **kwargs):
                if secret in call.user_prompt and "two" in call.user_prompt:
                    raise RuntimeError("boom")
                return await real_run(call, *args, **kwargs)

            runtime.orchestrator.run = failing_run
            await kafka.send(request_envelope(user_prompt=f"{secret} one"))
            await kafka.send(request_envelope(request_id="fail-me", user_prompt=f"{secret} two"))
            await kafka.wait_for(kafka.topics.comparison_result, 2)
    finally:
        logging.getLogger().handlers.clear()
    err = capfd.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(line.get("request_id") == "fail-me" and "correlation_id" in line for line in lines)
    assert secret not in err


async def test_probe_endpoints_report_readiness_and_metrics(prefix, topics_for) -> None:
    import httpx

    from tests.conftest import free_port

    port = free_port()
    settings = make_settings(prefix, partitions=2, metrics_port=port)
    await topics_for(settings)
    async with (
        running_worker(settings) as runtime,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        ready = await http.get("/ready")
        live = await http.get("/live")
        metrics = await http.get("/metrics")
        runtime.loop.assigned.clear()  # as before it joined the group: not ready, whatever Redis says
        not_yet = await http.get("/ready")
    assert not_yet.status_code == 503 and not_yet.json()["status"] == "starting"
    assert ready.status_code == 200
    report = ready.json()
    assert report["status"] == "healthy"
    assert report["partitions"] == [0, 1]
    assert report["in_flight"] == 0
    assert live.json() == {"status": "alive"}
    assert "llm_worker_in_flight" in metrics.text


async def test_created_topics_have_a_leader_for_every_partition(prefix, topics_for) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    settings = make_settings(prefix)
    await topics_for(settings)  # returns only once every new partition is led
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics(settings.kafka.topics.all())
    finally:
        await admin.close()
    assert sorted(t["topic"] for t in described) == sorted(settings.kafka.topics.all())
    for topic in described:
        expected = (
            settings.kafka.request_topic_partitions
            if topic["topic"] == settings.kafka.topics.comparison_request
            else settings.kafka.topic_partitions
        )
        assert topic["error_code"] == 0
        led = sorted(p["partition"] for p in topic["partitions"] if p["leader"] >= 0)
        assert led == list(range(expected))


async def test_a_callback_topic_kafka_would_refuse_yields_a_validation_error_on_the_result_topic(
    prefix, topics_for, kafka_for
) -> None:
    # It used to reach the producer, which waited for metadata of the illegal name for ever.
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    bad = json.loads(request_envelope(request_id="bad-cb").model_dump_json())
    bad["data"]["callback_topic"] = "no such topic!"
    async with running_worker(settings):
        await kafka.send_raw(json.dumps(bad).encode(), key="bad-cb")
        await kafka.send(request_envelope())
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
    failed = next(r["data"] for r in results if r["data"]["request_id"] == "bad-cb")
    assert failed["error_detail"]["error_code"] == "VALIDATION_ERROR"
    assert failed["error_detail"]["details"]["fields"] == ["callback_topic"]


async def test_topics_the_broker_refuses_to_create_fail_at_once_with_its_reason(prefix, infra) -> None:
    import time

    import pytest

    from worker.cli import create_topics

    settings = make_settings(prefix, topic_replication_factor=3)  # one broker here
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"topics not created: .*replication factor"):
        await create_topics(settings.kafka)
    assert time.monotonic() - started < 10  # not the 30 s wait for leaders of topics that never came


async def test_topics_that_exist_with_fewer_partitions_than_configured_are_reported_not_passed(
    prefix, infra
) -> None:
    # As the broker's auto-creation makes them (num.partitions=1) when a client uses a topic first.
    import pytest
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from worker.cli import create_topics

    settings = make_settings(prefix, partitions=12)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka.kafka_bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(settings.kafka.topics.comparison_request, 1, 1)])
    finally:
        await admin.close()
    with pytest.raises(
        RuntimeError, match=r"fewer partitions than configured: .*comparison_request.* has 1, 12"
    ):
        await create_topics(settings.kafka)


async def test_a_request_naming_the_request_topic_as_its_callback_gets_one_validation_error(
    prefix, topics_for, kafka_for
) -> None:
    settings = make_settings(prefix, partitions=1)
    await topics_for(settings)
    kafka = await kafka_for(settings)
    looping = request_envelope(request_id="loop-1", callback_topic=kafka.topics.comparison_request)
    async with running_worker(settings):
        await kafka.send(looping)
        await kafka.send(request_envelope(request_id="after-1"))
        results = await kafka.wait_for(kafka.topics.comparison_result, 2)
        await asyncio.sleep(0.5)  # a result read back as a request would add a second one for loop-1
        await kafka.caught_up()
    mine = [
        r["data"] for r in kafka.of(kafka.topics.comparison_result) if r["data"]["request_id"] == "loop-1"
    ]
    assert len(mine) == 1 and mine[0]["error_detail"]["error_code"] == "VALIDATION_ERROR"
    assert mine[0]["error_detail"]["details"]["fields"] == ["callback_topic"]
    assert {r["data"]["request_id"] for r in results} == {"loop-1", "after-1"}
