"""Export the JSON Schema of every event: `python -m contracts.schema [DIR]` (default contracts/schemas)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from contracts.envelope import EventEnvelope
from contracts.requests import LLMComparisonRequestV1
from contracts.results import (
    LLMCacheHitV1,
    LLMComparisonResultV1,
    LLMCostAlertV1,
    LLMCostTrackingV1,
    LLMProviderFailureV1,
)

EVENTS: tuple[type[BaseModel], ...] = (
    LLMComparisonRequestV1,
    LLMComparisonResultV1,
    LLMCacheHitV1,
    LLMProviderFailureV1,
    LLMCostTrackingV1,
    LLMCostAlertV1,
)


def schemas() -> dict[str, str]:
    """File name -> JSON text of the enveloped schema of each event."""
    out = {}
    for model in EVENTS:
        schema = EventEnvelope[model].model_json_schema()  # type: ignore[valid-type]
        out[f"{model.__name__}.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "schemas"
    target.mkdir(parents=True, exist_ok=True)
    for name, text in schemas().items():
        (target / name).write_text(text)
        print(target / name)


if __name__ == "__main__":
    main()
