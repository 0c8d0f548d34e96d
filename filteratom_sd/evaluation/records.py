"""The small JSON records that let comparison sweeps resume: content keys and tolerant reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


def content_key(data: Any) -> str:
    """A short hash of JSON-able data: equal keys mean the same settings (order of keys ignored)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when it is missing, unreadable or not an object (then it is redone)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
