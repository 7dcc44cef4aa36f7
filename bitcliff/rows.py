"""Resumable row files: one JSON object per line, appended as each measurement finishes.

A long measurement (a sweep, a benchmark table) writes each row the moment it is done, so an
interrupted run loses at most the row in flight, and the same command run again skips every row
already there.  Reading names the file and line of any row that is not a JSON object (a line cut
short by a crash, or edited by hand), instead of a bare parser message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


class RowsError(ValueError):
    """A row file that cannot be read: the message names the file and the line."""


def read_rows(path: str | os.PathLike, check: Callable[[dict], None] | None = None) -> list[dict]:
    """Every row of ``path`` in the order written ([] when the file does not exist).

    ``check(row)`` may refuse a row that parses but cannot be used (a field missing or of the
    wrong kind) by raising ValueError; the refusal is reported with the file and line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise RowsError(f"{path}, line {number}: not a JSON row ({exc.args[0]}); remove or repair that line "
                            "and run the same command again") from None
        if not isinstance(row, dict):
            raise RowsError(f"{path}, line {number}: a row must be a JSON object, got {type(row).__name__}")
        if check is not None:
            try:
                check(row)
            except ValueError as exc:
                raise RowsError(f"{path}, line {number}: {exc}; remove or repair that line and run the same "
                                "command again") from None
        rows.append(row)
    return rows


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one line, flushed to disk before returning."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row) + "\n"  # serialized before the file is touched
    with path.open("a") as out:
        out.write(line)
        out.flush()
        os.fsync(out.fileno())


def done_keys(path: str | os.PathLike, fields: tuple[str, ...]) -> set[tuple]:
    """The ``fields`` of every row already in ``path``: the measurements a rerun skips."""
    return {tuple(row.get(f) for f in fields) for row in read_rows(path)}
