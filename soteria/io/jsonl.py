"""JSON Lines: one JSON value a line, blank lines skipped, a bad line named by ``where:line``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["json_lines"]


def json_lines(lines: Iterable[str], where: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line; ValueError ``"{where}:{n}: not valid JSON (...)"``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}:{n}: not valid JSON ({e.msg})") from None
