"""Files a run writes, written atomically: a crash (or a kill mid-write) never leaves half a file behind.

Each writer fills `NAME.tmp` beside the target and renames it over the target, which POSIX makes atomic.
"""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """Write records one JSON object a line, atomically (a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)


def write_json(path: str | Path, value) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first `keep` lines of a JSON-lines file (what a resumed run had written by its checkpoint)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:keep]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
