"""Writing a JSON file so that a crash leaves the old one or the new one, never half of either."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
