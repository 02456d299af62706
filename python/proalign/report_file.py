"""Run, merge and salvage reports: JSON files written whole or not at all."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("proalign")


def write_report(path: str | os.PathLike, data: dict) -> Path:
    """Write `data` as JSON to `path` (a temporary file renamed into place). Where that fails (a full
    disk: reports sit beside the store that filled it), write it to the system's temporary folder
    instead, saying so, so the record of what was done survives. Returns the path written."""
    path = Path(path)
    try:
        _write(path, data)
        return path
    except OSError as e:
        fallback = Path(tempfile.gettempdir()) / f"proalign-{path.name}"
        log.warning("cannot write the report to %s (%s); writing it to %s", path, e, fallback)
        _write(fallback, data)
        return fallback


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
