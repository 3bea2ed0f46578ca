"""The hand-built envelope is exactly what the EventEnvelope contract parses."""

from __future__ import annotations

import json
import uuid

from contracts import EventEnvelope, LLMCostAlertV1
from worker.emit import Outgoing, make_event


def test_make_event_output_parses_as_the_envelope_contract() -> None:
    data = LLMCostAlertV1(
        scope="organization", organization_id='org "x"', window_s=60, spend_usd=2.5, threshold_usd=2.0
    )
    cid = uuid.uuid4()
    out = make_event("cost_alert", "topic", "key", data, cid, 'svc "quoted"')
    env = EventEnvelope[LLMCostAlertV1].model_validate_json(out.value)
    assert env.data == data
    assert env.correlation_id == cid
    assert env.event_type == "LLMCostAlertV1"
    assert env.source_service == 'svc "quoted"'
    assert env.event_timestamp.tzinfo is not None
    assert env.event_id.version == 4
    assert set(json.loads(out.value)) == set(EventEnvelope[LLMCostAlertV1].model_fields)
    assert (out.topic, out.key, out.correlation_id) == ("topic", "key", str(cid))


def test_outgoing_round_trips_through_its_stored_form() -> None:
    out = Outgoing("result", "t", None, b'{"a": 1}', "c")
    again = Outgoing.from_json(json.loads(json.dumps(out.to_json())))
    assert (again.kind, again.topic, again.key, again.value, again.correlation_id) == (
        "result",
        "t",
        None,
        b'{"a": 1}',
        "c",
    )
