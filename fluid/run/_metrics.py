"""A run's `metrics.jsonl`: one JSON line per step, each step once, durable at checkpoints.

Lines are flushed to the operating system every step and synced to disk before a
checkpoint is written, so every step a checkpoint holds has its line even after a power cut.
A run that resumes from step `s` first drops the lines after `s` (steps trained after the last
checkpoint, which are trained again) and any line cut short by a crash.
"""

import json
import os
from pathlib import Path
from typing import Any


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`, in file order; a line that does not parse (cut short
    by a crash) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep the records of steps `1..step`, each once (the last written), in step order.

    Rewritten through a temporary file and a rename, so a crash here loses nothing.
    """
    path = Path(path)
    if not path.exists():
        return
    kept: dict[int, dict[str, Any]] = {}
    for record in read_metrics(path):
        if record["step"] <= step:
            kept[record["step"]] = record
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(kept[s]) + "\n" for s in sorted(kept))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class MetricsLog:
    """Appends step records to `metrics.jsonl`.

    **Arguments:**

    - `path`: the file; created if missing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; it reaches the operating system at once (a killed process
        loses nothing written), and the disk at the next `sync`."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Make every record written so far durable (called before a checkpoint)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
