"""A run's ``log.jsonl``: one JSON line per finished epoch (or step), rewritten atomically (never a half line)."""

from __future__ import annotations

import json
from pathlib import Path

from ..utils import jsonout
from ..utils.atomic import atomic_write


def read_log(path: Path) -> list[dict]:
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:  # a line cut short by an older, non-atomic writer
                continue
    return records


def write_log(path: Path, records: list[dict]) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(jsonout.dumps(r) + "\n" for r in records)))


def append_log(path: Path, record: dict) -> None:
    write_log(path, read_log(path) + [record])


def reconcile_log(path: Path, finished: int, last: dict | None, key: str = "epoch") -> None:
    """On resume: keep the log lines of the epochs (``key="step"``: steps) the checkpoint has finished, and
    add the line of its last epoch if the run died between writing the checkpoint and the log."""
    records = [r for r in read_log(path) if r.get(key, 0) <= finished]
    if last is not None and not any(r.get(key) == last.get(key) for r in records):
        records.append(last)
    if records or path.exists():
        write_log(path, records)
