"""Write the service's OpenAPI schema to docs/openapi.json (the API contract; a test keeps it current)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ryzanstein.config import Settings
from ryzanstein.service.app import create_app

OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def schema_text() -> str:
    return json.dumps(create_app(Settings(), token="unused").openapi(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    OUTPUT.write_text(schema_text())
    print(f"wrote {OUTPUT}", file=sys.stderr)
